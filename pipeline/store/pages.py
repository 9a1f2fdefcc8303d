"""Where a row group's `act_lo` values lie in its file, so the reader can use them in place.

The writer gives each row group's column chunk a single data page (codec.acts_write_options). For a required,
uncompressed, PLAIN-encoded FixedSizeBinary column, such a page is the page header followed by the rows' bytes
back to back (no definition or repetition levels), so the low plane of a row group is the last rows·d bytes of its
column chunk: a view of the memory-mapped file, with no copy through Arrow (a quarter of the read time).

That is checked, not assumed: the first page header (Thrift compact protocol) must be a v1 data page with
PLAIN-encoded values holding all the group's rows in exactly rows·d bytes, so there is no other page. Anything else
(a file written by another tool, say) returns None and the reader takes the Arrow path.
"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

_DATA_PAGE = 0  # PageType.DATA_PAGE
_PLAIN = 0  # Encoding.PLAIN
_I32, _STRUCT = 5, 12  # compact-protocol field types
_HEADER_PEEK = 64  # bytes enough for the fields read below


def plain_values_offset(md: pq.FileMetaData, mapped: np.ndarray, group: int, column: int, rows: int, width: int) -> int | None:
    """File offset of the `rows`·`width` value bytes of row group `group`, column `column`, or None when that column
    chunk is not one uncompressed PLAIN v1 data page holding exactly those bytes."""
    chunk = md.row_group(group).column(column)
    if chunk.compression != "UNCOMPRESSED" or chunk.dictionary_page_offset is not None:
        return None
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    nbytes = rows * width
    if start < 0 or size <= nbytes or start + size > len(mapped):
        return None
    header = _first_fields(mapped[start : start + min(_HEADER_PEEK, size)].tobytes())
    if header != (_DATA_PAGE, nbytes, nbytes, rows, _PLAIN):
        return None
    return start + size - nbytes


def _first_fields(buf: bytes) -> tuple[int, ...] | None:
    """(type, uncompressed_page_size, compressed_page_size, data_page_header.num_values, data_page_header.encoding)
    of a PageHeader, skipping the optional crc; None for anything unexpected."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while pos < len(buf):
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (result >> 1) ^ -(result & 1)  # zigzag
            shift += 7
        raise ValueError("truncated varint")

    def field(last: int) -> tuple[int, int]:
        nonlocal pos
        if pos >= len(buf):
            raise ValueError("truncated header")
        byte = buf[pos]
        pos += 1
        delta, kind = byte >> 4, byte & 0x0F
        if delta == 0:  # long-form field id: not written by Arrow for these fields
            raise ValueError("long-form field header")
        return last + delta, kind

    try:
        values: dict[int, int] = {}
        fid = 0
        while True:
            fid, kind = field(fid)
            if kind == _STRUCT and fid == 5:  # data_page_header
                break
            if kind != _I32 or fid > 4:
                return None
            values[fid] = varint()
        inner, inner_values = 0, {}
        for _ in range(2):  # num_values, encoding
            inner, kind = field(inner)
            if kind != _I32:
                return None
            inner_values[inner] = varint()
    except ValueError:
        return None
    if sorted(values) not in ([1, 2, 3], [1, 2, 3, 4]) or sorted(inner_values) != [1, 2]:
        return None
    return values[1], values[2], values[3], inner_values[1], inner_values[2]
