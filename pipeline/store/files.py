"""Reading shard files: open handles and a decoder per thread, row groups decoded straight into caller buffers."""
from __future__ import annotations

import mmap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import ACT_COLUMNS, ACT_HI_ZST, ACT_LO, PlaneDecoder
from .layout import StoreError, one_line
from .pages import plain_values_offset


class OpenShard:
    """One acts file: its ParquetFile (footer parsed once), its bytes mapped read-only, and where each row group's
    low plane lies in them (None: read that group through Arrow)."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # One mapping serves both: Arrow reads the file through it, and the low planes are views of it.
            self.pf = pq.ParquetFile(pa.BufferReader(pa.py_buffer(self._map)))
        except (OSError, ValueError, pa.ArrowException) as err:
            raise StoreError(f"{path}: cannot open as Parquet: {one_line(err)}") from None
        self.bytes = np.frombuffer(self._map, np.uint8)
        self._lo_column = self.pf.schema_arrow.get_field_index(ACT_LO)
        self._lo_offsets: dict[int, int | None] = {}

    def lo_plane(self, group: int, rows: int, d: int) -> np.ndarray | None:
        """Zero-copy read-only uint8 [rows, d] view of the group's act_lo values, or None."""
        if group not in self._lo_offsets:
            offset = None
            if self._lo_column >= 0:
                offset = plain_values_offset(self.pf.metadata, self.bytes, group, self._lo_column, rows, d)
            self._lo_offsets[group] = offset
        offset = self._lo_offsets[group]
        return None if offset is None else self.bytes[offset : offset + rows * d].reshape(rows, d)

    def close(self) -> None:
        self.pf.close()
        # Views handed out may still exist; the map is released with the last of them.
        self.bytes = None
        self._map = None


class ParquetCache:
    """A few open shards, least recently used closed first, and the activation decoder with its scratch buffer.
    One per thread."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.decoder = PlaneDecoder()
        self._files: OrderedDict[Path, OpenShard] = OrderedDict()

    def get(self, path: Path) -> OpenShard:
        shard = self._files.get(path)
        if shard is not None:
            self._files.move_to_end(path)
            return shard
        shard = self._files[path] = OpenShard(path)
        if len(self._files) > self.capacity:
            _, old = self._files.popitem(last=False)
            old.close()
        return shard

    def close(self) -> None:
        for shard in self._files.values():
            shard.close()
        self._files.clear()


def read_row_group_acts(files: ParquetCache, path: Path, group: int, out: np.ndarray, d: int, expected_rows: int) -> int:
    """Decode the activations of one row group into out[:rows] (uint16 bits); returns the row count."""
    shard = files.get(path)
    lo = shard.lo_plane(group, expected_rows, d)
    try:
        table = shard.pf.read_row_group(group, columns=[ACT_HI_ZST] if lo is not None else ACT_COLUMNS, use_threads=False)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: row group {group} unreadable: {one_line(err)}") from None
    if table.num_rows != expected_rows:
        raise StoreError(f"{path}: row group {group} has {table.num_rows} rows, the manifest lists {expected_rows}")
    return files.decoder.decode(table, out, d, f"{path}: row group {group}", lo=lo)
