"""Arrow schemas of the shard files and the lossless bf16 activation layout.

Layout "bf16-byteplanes": the bf16 bit pattern of each activation is split into two FixedSizeBinary(d) columns, `act_hi`
(bits 15..8: sign and 7 exponent bits) and `act_lo` (bits 7..0: last exponent bit and mantissa). The high plane
compresses about 2.6x with zstd-1; the low plane is close to noise, so it is stored uncompressed, which saves zstd's
time on both sides at the same file size. Whole rows of bytes (FixedSizeBinary) avoid the per-value repetition levels
that cap FixedSizeList near 200 MB/s, and map zero-copy to numpy on read.

Encoding and decoding run one row group at a time so that the intermediate planes stay in cache.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .layout import DEFAULT_LAYOUT, StoreError

LAYOUT = DEFAULT_LAYOUT
LAYOUTS = frozenset({LAYOUT})
ACT_HI, ACT_LO = "act_hi", "act_lo"
ACT_COLUMNS = [ACT_HI, ACT_LO]
META_COLUMNS = ["context_id", "pos", "token_id", "doc_id", "subset"]
DICT_COLUMNS = ["doc_id", "subset"]
CTX_COLUMNS = ["context_id", "doc_id", "subset", "doc_start", "token_ids"]

_DICT_STRING = pa.dictionary(pa.int32(), pa.string())


def acts_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("context_id", pa.int64(), nullable=False),
            pa.field("pos", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("doc_id", _DICT_STRING, nullable=False),
            pa.field("subset", _DICT_STRING, nullable=False),
            pa.field(ACT_HI, pa.binary(d_model), nullable=False),
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


def acts_write_options(zstd_level: int) -> dict:
    """ParquetWriter keyword arguments: zstd for everything but the low plane, dictionaries and statistics only
    on the metadata (both are slow and useless on the activation bytes)."""
    compressed = [c for c in META_COLUMNS] + [ACT_HI]
    return {
        "compression": {**{c: "zstd" for c in compressed}, ACT_LO: "none"},
        "compression_level": {c: zstd_level for c in compressed},
        "use_dictionary": DICT_COLUMNS,
        "write_statistics": META_COLUMNS,
    }


def ctx_write_options(zstd_level: int) -> dict:
    return {"compression": "zstd", "compression_level": zstd_level, "use_dictionary": ["doc_id", "subset"]}


class PlaneEncoder:
    """Splits bf16 rows into the two byte planes, reusing its buffers between row groups."""

    def __init__(self, d_model: int, max_rows: int):
        self.d = d_model
        self.hi = np.empty((max_rows, d_model), np.uint8)
        self.lo = np.empty((max_rows, d_model), np.uint8)

    def encode(self, bits: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """`bits`: uint16 [m, d] (the bf16 bit patterns). The arrays view this encoder's buffers: valid until the next call."""
        m = bits.shape[0]
        hi, lo = self.hi[:m], self.lo[:m]
        np.right_shift(bits, 8, out=hi, casting="unsafe")
        np.copyto(lo, bits, casting="unsafe")  # keeps the low byte
        return _binary_column(hi, self.d), _binary_column(lo, self.d)


def _binary_column(plane: np.ndarray, d: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(d), plane.shape[0], [None, pa.py_buffer(plane)])


def plane_view(chunk: pa.Array, d: int, where: str) -> np.ndarray:
    """Zero-copy read-only uint8 [rows, d] view of a FixedSizeBinary(d) chunk."""
    if chunk.null_count:
        raise StoreError(f"{where}: activation column has nulls")
    n = len(chunk)
    return np.frombuffer(chunk.buffers()[1], np.uint8, n * d, chunk.offset * d).reshape(n, d)


def decode_planes(hi: np.ndarray, lo: np.ndarray, out: np.ndarray) -> None:
    """bits = hi << 8 | lo, written into `out` (uint16 [m, d])."""
    np.left_shift(hi, 8, out=out, dtype=np.uint16)
    np.bitwise_or(out, lo, out=out)


def decode_table_into(table: pa.Table, out: np.ndarray, d: int, where: str) -> int:
    """Decode the activation columns of `table` into `out` (uint16 [>= rows, d]); returns the rows written."""
    row = 0
    hi_col, lo_col = table.column(ACT_HI), table.column(ACT_LO)
    if hi_col.num_chunks == lo_col.num_chunks and all(len(a) == len(b) for a, b in zip(hi_col.chunks, lo_col.chunks)):
        pairs = zip(hi_col.chunks, lo_col.chunks)
    else:  # chunking differs (not produced by our reader paths, but legal Arrow): align by combining
        pairs = [(hi_col.combine_chunks(), lo_col.combine_chunks())]
    for hi_chunk, lo_chunk in pairs:
        n = len(hi_chunk)
        if n:
            decode_planes(plane_view(hi_chunk, d, where), plane_view(lo_chunk, d, where), out[row : row + n])
        row += n
    return row
