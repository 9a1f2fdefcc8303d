"""The activation layout on its own: every bf16 bit pattern survives, and a damaged high-plane frame is a StoreError."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from pipeline.store import StoreError
from pipeline.store.codec import ACT_HI_ZST, ACT_LO, PlaneDecoder, PlaneEncoder

D = 24


@pytest.fixture(params=["one slice", "slices of 5 rows"], autouse=True)
def decoder_slices(request, monkeypatch):
    # the decoder works through a row group in slices of CHUNK_BYTES: cover a single slice and many
    if request.param != "one slice":
        monkeypatch.setattr(PlaneDecoder, "CHUNK_BYTES", 5 * D)


def encode_table(bits: np.ndarray) -> pa.Table:
    hi, lo = PlaneEncoder(D, max(1, len(bits))).encode(bits)
    return pa.table({ACT_HI_ZST: hi, ACT_LO: lo})


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_every_bit_pattern_round_trips(rows):
    g = np.random.default_rng(rows)
    bits = g.integers(0, 1 << 16, (rows, D), dtype=np.uint16)
    bits.flat[:4] = [0x7FC1, 0xFFA5, 0x8000, 0x0001][: bits.size]  # NaN payloads, -0, a subnormal
    out = np.zeros((rows + 3, D), np.uint16)
    assert PlaneDecoder().decode(encode_table(bits), out, D, "t") == rows
    assert np.array_equal(out[:rows], bits)
    assert not out[rows:].any()


def test_the_frame_is_standard_zstd_on_the_first_row_only():
    bits = np.arange(5 * D, dtype=np.uint16).reshape(5, D)
    table = encode_table(bits)
    col = table.column(ACT_HI_ZST)
    assert col.null_count == 4 and col[0].is_valid
    plane = np.frombuffer(zstandard.ZstdDecompressor().decompress(col[0].as_py()), np.uint8).reshape(5, D)
    assert np.array_equal(plane, bits >> 8)


def replace_hi(table: pa.Table, values: list) -> pa.Table:
    return table.set_column(0, ACT_HI_ZST, pa.array(values, pa.binary()))


def test_damaged_frames_are_store_errors():
    bits = np.random.default_rng(0).integers(0, 1 << 16, (6, D), dtype=np.uint16)
    table = encode_table(bits)
    frame = table.column(ACT_HI_ZST)[0].as_py()
    out = np.empty((6, D), np.uint16)
    short = zstandard.ZstdCompressor().compress((bits[:5] >> 8).astype(np.uint8).tobytes())
    cases = {
        "not zstd": [b"not a zstd frame"] + [None] * 5,
        "too few bytes": [short] + [None] * 5,
        "frame not on the first row": [None, frame] + [None] * 4,
        "two frames": [frame, frame] + [None] * 4,
        "truncated": [frame[: len(frame) // 2]] + [None] * 5,
    }
    for name, values in cases.items():
        with pytest.raises(StoreError, match=r"^where: act_hi_zst"):
            PlaneDecoder().decode(replace_hi(table, values), out, D, "where")


# ---- the low plane read in place from the mapped file (pages.py), and the Arrow path when that does not apply -----

ROWS, GROUP = 50, 16


def write_shard_file(path, bits: np.ndarray, **options) -> None:
    import pyarrow.parquet as pq

    from pipeline.store.codec import acts_write_options

    encoder = PlaneEncoder(D, GROUP)
    schema = pa.schema([pa.field(ACT_HI_ZST, pa.binary()), pa.field(ACT_LO, pa.binary(D), nullable=False)])
    kwargs = {k: v for k, v in acts_write_options(1, GROUP).items() if k not in ("compression_level", "use_dictionary", "write_statistics")}
    kwargs["compression"] = {ACT_HI_ZST: "none", ACT_LO: "none"}
    kwargs.update(options)
    with pq.ParquetWriter(path, schema, use_dictionary=False, write_statistics=False, **kwargs) as pw:
        for start in range(0, len(bits), GROUP):
            hi, lo = encoder.encode(bits[start : start + GROUP])
            pw.write_table(pa.table([hi, lo], schema=schema), row_group_size=GROUP)


@pytest.mark.parametrize("variant", ["as written", "many pages", "compressed low plane", "data page v2"])
def test_low_plane_in_place_or_through_arrow(tmp_path, variant):
    from pipeline.store.files import ParquetCache, read_row_group_acts

    options = {
        "as written": {},
        "many pages": {"data_page_size": 64, "max_rows_per_page": 1},
        "compressed low plane": {"compression": {ACT_HI_ZST: "none", ACT_LO: "zstd"}},
        "data page v2": {"data_page_version": "2.0"},
    }[variant]
    bits = np.random.default_rng(7).integers(0, 1 << 16, (ROWS, D), dtype=np.uint16)
    path = tmp_path / "acts.parquet"
    write_shard_file(path, bits, **options)
    files = ParquetCache()
    groups = [min(GROUP, ROWS - s) for s in range(0, ROWS, GROUP)]
    in_place = [files.get(path).lo_plane(g, rows, D) is not None for g, rows in enumerate(groups)]
    assert in_place == [variant == "as written"] * len(groups)
    if variant == "as written":
        view = files.get(path).lo_plane(1, groups[1], D)
        assert np.array_equal(view, (bits[GROUP : 2 * GROUP] & 0xFF).astype(np.uint8)) and not view.flags.writeable
    out = np.zeros((ROWS, D), np.uint16)
    row = 0
    for g, rows in enumerate(groups):
        row += read_row_group_acts(files, path, g, out[row:], D, rows)
    assert np.array_equal(out, bits)
    files.close()


def test_page_header_parser_rejects_what_it_does_not_know():
    from pipeline.store.pages import _first_fields

    # type=0, sizes 10/10, then data_page_header {num_values=5, encoding=0}: compact protocol by hand
    zz = lambda v: bytes([v << 1])  # noqa: E731  (small non-negative ints: one zigzag byte)
    good = b"\x15" + zz(0) + b"\x15" + zz(10) + b"\x15" + zz(10) + b"\x2c" + b"\x15" + zz(5) + b"\x15" + zz(0)
    assert _first_fields(good) == (0, 10, 10, 5, 0)
    with_crc = b"\x15" + zz(0) + b"\x15" + zz(10) + b"\x15" + zz(10) + b"\x15" + zz(3) + b"\x1c" + b"\x15" + zz(5) + b"\x15" + zz(0)
    assert _first_fields(with_crc) == (0, 10, 10, 5, 0)
    for bad in (b"", good[:5], b"\x16" + good[1:], b"\x05" + good, b"\x15" + zz(0) + b"\x1c" + good[2:]):
        assert _first_fields(bad) is None
