"""Reading shard files: open handles and a decoder per thread, row groups decoded straight into caller buffers."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import ACT_COLUMNS, PlaneDecoder
from .layout import StoreError, one_line


class ParquetCache:
    """A few open ParquetFile handles (footer parsed once), least recently used closed first, and the activation
    decoder with its scratch buffer. One per thread."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.decoder = PlaneDecoder()
        self._files: OrderedDict[Path, pq.ParquetFile] = OrderedDict()

    def get(self, path: Path) -> pq.ParquetFile:
        pf = self._files.get(path)
        if pf is not None:
            self._files.move_to_end(path)
            return pf
        try:
            pf = pq.ParquetFile(path, memory_map=True)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: cannot open as Parquet: {one_line(err)}") from None
        self._files[path] = pf
        if len(self._files) > self.capacity:
            _, old = self._files.popitem(last=False)
            old.close()
        return pf

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()


def read_row_group_acts(files: ParquetCache, path: Path, group: int, out: np.ndarray, d: int, expected_rows: int) -> int:
    """Decode the activations of one row group into out[:rows] (uint16 bits); returns the row count."""
    pf = files.get(path)
    try:
        table = pf.read_row_group(group, columns=ACT_COLUMNS, use_threads=False)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: row group {group} unreadable: {one_line(err)}") from None
    if table.num_rows != expected_rows:
        raise StoreError(f"{path}: row group {group} has {table.num_rows} rows, the manifest lists {expected_rows}")
    return files.decoder.decode(table, out, d, f"{path}: row group {group}")
