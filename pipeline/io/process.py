"""Process-wide settings that only an entry point may make (the CLI, a submitit job): the stages never do, since a
library that installs signal handlers would, for instance, replace submitit's own and defeat its requeue.

- `signal_stop()`: SIGTERM / SIGUSR1 / SIGUSR2 set a StopFlag that the stages poll at their safe points.
- `keep_freed_memory_on_heap()`: glibc malloc settings for CPU training.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import signal
from typing import Iterator

from pipeline.hooks import StopFlag

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". A stage stopped by a signal has
# committed its work; relaunch (with --resume for training) to continue.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def signal_stop(signals=STOP_SIGNALS) -> Iterator[StopFlag]:
    """Install handlers that set the returned flag; the previous handlers come back on exit.

    Slurm sends SIGTERM on `scontrol requeue` and preemption, and the `--signal` signal (SIGUSR1 or SIGUSR2, which
    submitit uses) before the time limit: all of them mean "commit and exit"."""
    flag = StopFlag()
    previous = {}

    def handle(signum, frame) -> None:
        flag.set(f"signal {signal.Signals(signum).name}", signum)

    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handle)
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory_on_heap() -> bool:
    """glibc serves every allocation above its mmap threshold (at most 32 MB) with fresh pages from mmap and unmaps
    them on free, so each [batch, d_sae] temporary of a CPU training step (150 MB at the demo size) page-faults its
    way in again, every step: about 15% of a ReLU SAE step at d=576, d_sae=9,216 on 2 cores. Turning mmap-ed
    allocations and heap trimming off lets freed blocks be reused in place; the heap keeps its high-water mark, which
    for a loop allocating the same shapes every step is the working set anyway.

    Returns whether the settings took effect (False where the C library is not glibc)."""
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
