"""glibc malloc settings for CPU training.

glibc serves every allocation above its mmap threshold (at most 32 MB) with fresh pages from mmap and unmaps them on
free, so each [batch, d_sae] temporary of a CPU step (150 MB at the demo size) page-faults its way in again, every
step: about 15% of a ReLU SAE step at d=576, d_sae=9,216 on 2 cores. Turning mmap-ed allocations and heap trimming off
lets freed blocks be reused in place. The heap then keeps its high-water mark, which for a training loop that
allocates the same shapes every step is the working set anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory_on_heap() -> bool:
    """Returns whether the settings took effect (False where the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 40))
    log.debug("glibc mallopt (no mmap, no trim): %s", ok)
    return ok
