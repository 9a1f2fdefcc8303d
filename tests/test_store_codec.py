"""The activation layout on its own: every bf16 bit pattern survives, and a damaged high-plane frame is a StoreError."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from pipeline.store import StoreError
from pipeline.store.codec import ACT_HI_ZST, ACT_LO, PlaneDecoder, PlaneEncoder

D = 24


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
