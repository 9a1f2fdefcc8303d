"""The file pyarrow writes a shard into: checksummed as the bytes pass, streamed to disk early, fsynced at the end."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import xxhash


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these dirty pages now, without waiting (Linux); elsewhere a no-op.

    Streaming the file to disk while later bytes are still being encoded leaves little for the final fsync.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class ChecksumFile:
    """A write-only file for pyarrow: xxh3-64 of the bytes as they pass (no re-read; 3x the speed of crc32 here),
    early writeback, fsync at the end."""

    WRITEBACK_BYTES = 8 << 20

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self._hash = xxhash.xxh3_64()
        self.size = 0
        self._written_back = 0
        self.closed = False

    def write(self, data) -> int:
        self._hash.update(data)
        self._f.write(data)
        n = len(data)
        self.size += n
        if self.size - self._written_back >= self.WRITEBACK_BYTES:
            self._f.flush()
            start_writeback(self._f.fileno(), self._written_back, self.size - self._written_back)
            self._written_back = self.size
        return n

    def digest(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        self._f.flush()

    def finish(self) -> None:
        """Flush, fsync and close."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.closed = True

    def abort(self) -> None:
        if not self.closed:
            self._f.close()
            self.closed = True
