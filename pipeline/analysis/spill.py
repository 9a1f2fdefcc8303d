"""The sparse codes of the analysed tokens, spilled to disk shard by shard during the one encode pass.

Equal-width bins over [0, max] need each feature's max, which is known only at the end; the spill lets the histogram,
the interval samples and the examples' per-token activations be computed afterwards from the codes instead of
encoding everything a second time. One file per shard of 12-byte records (row within the shard, feature, value):
temp disk grows with tokens x L0, memory stays at one chunk.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

RECORD = np.dtype([("row", "<u4"), ("feature", "<i4"), ("value", "<f4")])


class Spill:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True)
        self._open: tuple[int, object] | None = None
        self.entries: dict[int, int] = {}

    def path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:06d}.codes"

    def append(self, shard: int, rows: np.ndarray, features: np.ndarray, values: np.ndarray) -> None:
        """Codes of rows (within the shard) of one batch; a shard's batches come one after another."""
        if self._open is None or self._open[0] != shard:
            self.close_file()
            self._open = (shard, open(self.path(shard), "ab"))
        rec = np.empty(len(rows), RECORD)
        rec["row"], rec["feature"], rec["value"] = rows, features, values
        rec.tofile(self._open[1])
        self.entries[shard] = self.entries.get(shard, 0) + len(rows)

    def close_file(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def chunks(self, shard: int, chunk_entries: int = 1 << 22) -> Iterator[np.ndarray]:
        """The shard's records in file order, `chunk_entries` at a time."""
        self.close_file()
        total = self.entries.get(shard, 0)
        for start in range(0, total, chunk_entries):
            yield np.fromfile(self.path(shard), RECORD, count=min(chunk_entries, total - start),
                              offset=start * RECORD.itemsize)

    def read(self, shard: int) -> np.ndarray:
        """All of one shard's records (a shard's worth: bounded by the store's shard size, not by the token count)."""
        self.close_file()
        if not self.entries.get(shard):
            return np.empty(0, RECORD)
        return np.fromfile(self.path(shard), RECORD)

    def remove(self) -> None:
        self.close_file()
        shutil.rmtree(self.dir, ignore_errors=True)
