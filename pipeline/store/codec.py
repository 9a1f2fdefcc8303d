"""Arrow schemas of the shard files and the lossless bf16 activation layout.

Layout "bf16-lo-plane+hi-zstd" (schema version 2). The bf16 bit pattern of each activation is split into two byte planes:
  - `act_lo` (bits 7..0: the last exponent bit and the mantissa) is close to noise: one FixedSizeBinary(d) value per
    row, stored uncompressed, which saves zstd's time on both sides at the same file size;
  - the high plane (bits 15..8: sign and 7 exponent bits) holds the redundancy, about 2.6x. It is compressed once per row
    group into one zstd frame, stored in `act_hi_zst` on the group's first row (null on the others).

Why a frame per row group rather than a Parquet-compressed column: Parquet only exposes zstd's level, and at level 1
the match finder spends its time on the short, useless matches of exponent bytes (0.37 GB/s of plane). With a long
minimum match and a small hash table zstd codes that plane almost purely with Huffman literals, 2.5x as fast, at a
slightly better ratio, and decodes faster too. The frames are standard zstd: any decoder reads them.

Whole rows of bytes (FixedSizeBinary) avoid the per-value repetition levels that cap FixedSizeList near 200 MB/s,
and map zero-copy to numpy on read. Encoding and decoding run one row group at a time, reusing per-thread buffers.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import zstandard

from .layout import DEFAULT_LAYOUT, StoreError

LAYOUT = DEFAULT_LAYOUT
LAYOUTS = frozenset({LAYOUT})
ACT_HI_ZST, ACT_LO = "act_hi_zst", "act_lo"
ACT_COLUMNS = [ACT_HI_ZST, ACT_LO]
META_COLUMNS = ["context_id", "pos", "token_id", "doc_id", "subset"]
DICT_COLUMNS = ["doc_id", "subset"]
CTX_COLUMNS = ["context_id", "doc_id", "subset", "doc_start", "token_ids"]

# zstd level 1 with a 7-byte minimum match, a 1 Ki-entry hash table and one search probe: on exponent bytes
# this is 2.5x as fast as plain level 1 and compresses 3% better (benchmarks/store.py; FACTS.md for plain level 1).
HI_PLANE_ZSTD = dict(compression_level=1, min_match=7, hash_log=10, search_log=1, window_log=17)

_DICT_STRING = pa.dictionary(pa.int32(), pa.string())


def acts_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("context_id", pa.int64(), nullable=False),
            pa.field("pos", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("doc_id", _DICT_STRING, nullable=False),
            pa.field("subset", _DICT_STRING, nullable=False),
            pa.field(ACT_HI_ZST, pa.binary(), nullable=True),
            pa.field(ACT_LO, pa.binary(d_model), nullable=False),
        ],
        metadata={"saepipe.layout": LAYOUT, "saepipe.d_model": str(d_model)},
    )


CTX_SCHEMA = pa.schema(
    [
        pa.field("context_id", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("doc_start", pa.int32(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    ]
)


def acts_write_options(zstd_level: int, row_group_rows: int) -> dict:
    """ParquetWriter keyword arguments: zstd on the metadata only (the activation bytes are either noise or
    compressed already), dictionaries and statistics only on the metadata (slow and useless on activation bytes),
    and one data page per column chunk, so that a row group's low plane is one run of bytes in the file that the
    reader can use in place (pages.py)."""
    return {
        "compression": {**{c: "zstd" for c in META_COLUMNS}, ACT_HI_ZST: "none", ACT_LO: "none"},
        "compression_level": {c: zstd_level for c in META_COLUMNS},
        "use_dictionary": DICT_COLUMNS,
        "write_statistics": META_COLUMNS,
        "data_page_size": 1 << 40,
        "max_rows_per_page": row_group_rows,
    }


def ctx_write_options(zstd_level: int) -> dict:
    return {"compression": "zstd", "compression_level": zstd_level, "use_dictionary": ["doc_id", "subset"]}


class PlaneEncoder:
    """Turns bf16 rows into the two activation columns of one row group, reusing its buffers between row groups.
    Not thread-safe (nor is its zstd context): one per writer thread."""

    def __init__(self, d_model: int, max_rows: int):
        self.d = d_model
        self.hi = np.empty((max_rows, d_model), np.uint8)
        self.lo = np.empty((max_rows, d_model), np.uint8)
        self._zstd = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**HI_PLANE_ZSTD))

    def encode(self, bits: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """`bits`: uint16 [m, d] (the bf16 bit patterns), m >= 1. Returns (act_hi_zst, act_lo); act_lo views this
        encoder's buffer and is valid until the next call."""
        m = bits.shape[0]
        hi, lo = self.hi[:m], self.lo[:m]
        np.right_shift(bits, 8, out=hi, casting="unsafe")
        np.copyto(lo, bits, casting="unsafe")  # keeps the low byte
        frame = self._zstd.compress(hi)
        return _first_row_only(frame, m), _binary_column(lo, self.d)


def _first_row_only(value: bytes, rows: int) -> pa.Array:
    """A binary column of `rows` entries: `value` on the first, nulls after it."""
    validity = np.zeros((rows + 7) // 8, np.uint8)
    validity[0] = 1
    offsets = np.full(rows + 1, len(value), np.int32)
    offsets[0] = 0
    return pa.BinaryArray.from_buffers(pa.binary(), rows, [pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(value)],
                                       null_count=rows - 1)


def _binary_column(plane: np.ndarray, d: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(d), plane.shape[0], [None, pa.py_buffer(plane)])


def plane_view(chunk: pa.Array, d: int, where: str) -> np.ndarray:
    """Zero-copy read-only uint8 [rows, d] view of a FixedSizeBinary(d) chunk."""
    if chunk.null_count:
        raise StoreError(f"{where}: activation column {ACT_LO} has nulls")
    n = len(chunk)
    return np.frombuffer(chunk.buffers()[1], np.uint8, n * d, chunk.offset * d).reshape(n, d)


class PlaneDecoder:
    """Decodes the activation columns of row groups into caller buffers. Not thread-safe: one per reading thread.

    The high plane is decompressed a slice of rows at a time into a small scratch buffer and merged with the low plane
    while the slice is still in cache: 5% faster than decompressing the whole group first, and the scratch stays at
    CHUNK_BYTES whatever the width (a whole group's plane would be 25 MB at d=3072)."""

    CHUNK_BYTES = 256 << 10

    def __init__(self):
        self._zstd = zstandard.ZstdDecompressor()
        self._scratch = np.empty(self.CHUNK_BYTES, np.uint8)

    def decode(self, table: pa.Table, out: np.ndarray, d: int, where: str, lo: np.ndarray | None = None) -> int:
        """Decode the activation columns of one row group's `table` into `out` (uint16 [>= rows, d]); returns the
        rows. `lo`: the low plane (uint8 [rows, d]) when the caller has it already; else `table` holds act_lo."""
        m = table.num_rows
        if m == 0:
            return 0
        frame = _the_frame(table.column(ACT_HI_ZST).combine_chunks(), where)
        if lo is None:
            lo_col = table.column(ACT_LO)
            lo = plane_view(lo_col.chunk(0) if lo_col.num_chunks == 1 else lo_col.combine_chunks(), d, where)
        elif lo.shape != (m, d):
            raise ValueError(f"{where}: low plane of shape {lo.shape}, expected {(m, d)}")
        step = max(1, self.CHUNK_BYTES // d)
        if self._scratch.size < step * d:
            self._scratch = np.empty(step * d, np.uint8)
        try:
            reader = self._zstd.stream_reader(frame, read_across_frames=False)
            for start in range(0, m, step):
                n = min(step, m - start)
                hi = self._scratch[: n * d]
                got = _read_exactly(reader, hi)
                if got != hi.size:
                    raise StoreError(f"{where}: {ACT_HI_ZST} frame holds {start * d + got} bytes, not {m * d}")
                rows = out[start : start + n]
                np.left_shift(hi.reshape(n, d), 8, out=rows, dtype=np.uint16)
                np.bitwise_or(rows, lo[start : start + n], out=rows)
            if reader.read(1):
                raise StoreError(f"{where}: {ACT_HI_ZST} frame holds more than {m * d} bytes")
        except zstandard.ZstdError as err:
            raise StoreError(f"{where}: {ACT_HI_ZST} frame does not decode: {err}") from None
        return m


def _read_exactly(reader, into: np.ndarray) -> int:
    """Fill `into` from a zstd stream reader; fewer bytes only at the end of the frame."""
    view, got = memoryview(into), 0
    while got < into.size:
        n = reader.readinto(view[got:])
        if n == 0:
            break
        got += n
    return got


def _the_frame(col: pa.Array, where: str) -> pa.Buffer:
    """The one non-null value of a row group's act_hi_zst column, which must be on its first row."""
    if len(col) == 0 or not col[0].is_valid or col.null_count != len(col) - 1:
        raise StoreError(f"{where}: {ACT_HI_ZST} must hold one frame on the row group's first row and nulls after it")
    offsets = np.frombuffer(col.buffers()[1], np.int32, 2, col.offset * 4)
    return col.buffers()[2][int(offsets[0]) : int(offsets[1])]
