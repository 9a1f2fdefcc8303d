"""A lease on one unit of work (an extraction task, a training run) held by one process at a time, on a shared file
system.

The lease is a JSON file (host, pid, the pid's start time, Slurm job, heartbeat) created atomically with a hard
link, so that of two processes starting together exactly one gets it. The holder rewrites the heartbeat from a
background thread. Another process refuses to start while the lease is live, and takes it over, with a warning, when
it is stale:
  - its process is gone (same host: no such pid, or the pid now belongs to a process started later);
  - its Slurm job is this one, restarted (Slurm runs one instance of a job id at a time, so a requeued job's
    predecessor has ended, wherever it ran);
  - its heartbeat is older than the timeout (a host that died or a process that hangs).
A holder that finds its lease taken over (it hung past the timeout) marks itself `lost`; callers check that before
they commit anything.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import LeaseHeldError

from .atomic import atomic_create_bytes, atomic_write_bytes, host_name, json_bytes, pid_alive, tmp_path

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float | None  # the process's start time (psutil), to tell a reused pid apart
    job: str | None  # Slurm job id, "<array job>_<task>" for array tasks
    restarts: int  # SLURM_RESTART_COUNT: how often Slurm has requeued this job
    acquired: float
    heartbeat: float
    token: str

    def describe(self, now: float) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host}{job}, heartbeat {now - self.heartbeat:.0f} s ago"


def slurm_job() -> tuple[str | None, int]:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID") or None
    return job, int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil.NoSuchProcess / AccessDenied / not installed: unknown
        return None


class Lease:
    """`with Lease(path, what="task 3 of 16"):` holds the lease for the block (see the module docstring)."""

    def __init__(self, path: str | Path, *, what: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float | None = None, tmp_dir: str | Path | None = None):
        if timeout_s <= 0:
            raise ValueError("lease timeout must be positive")
        self.path = Path(path)
        self.what = what
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(30.0, timeout_s / 5))
        self.tmp_dir = tmp_dir
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_to: str | None = None

    # ---- holding ---------------------------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost_to is not None

    def check(self) -> None:
        """Raise if another process took the lease over (this one stalled past the timeout)."""
        if self._lost_to is not None:
            raise LeaseHeldError(f"{self.path}: lease on {self.what} was taken over by {self._lost_to} while this "
                                 f"process held it (no heartbeat for {self.timeout_s:.0f} s); stopping without committing")

    def acquire(self) -> "Lease":
        job, restarts = slurm_job()
        now = time.time()
        mine = Holder(host_name(), os.getpid(), process_start_time(os.getpid()), job, restarts, now, now,
                      secrets.token_hex(8))
        for _ in range(5):
            if atomic_create_bytes(self.path, json_bytes(asdict(mine)), tmp_dir=self.tmp_dir):
                self.holder = mine
                self._start_heartbeat()
                return self
            current = _read_holder(self.path)
            if current is None:  # released meanwhile, or unreadable: look again
                if self.path.exists() and _read_holder(self.path) is None:
                    log.warning("%s: unreadable lease file on %s; removing it", self.path, self.what)
                    self._remove_if_still(None)
                continue
            reason = self._stale_reason(current, mine)
            if reason is None:
                raise LeaseHeldError(
                    f"{self.what} is held by {current.describe(time.time())} ({self.path}); refusing to start a second "
                    f"process on it (a lease is taken over once its process is gone or after {self.timeout_s:.0f} s "
                    "without a heartbeat)")
            log.warning("%s: taking over the lease on %s from %s: %s", self.path, self.what,
                        current.describe(time.time()), reason)
            self._remove_if_still(current.token)
        raise LeaseHeldError(f"{self.path}: could not acquire the lease on {self.what}: other processes keep taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holder is not None and not self.lost:
            self._remove_if_still(self.holder.token)
        self.holder = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals -------------------------------------------------------------------------------------------------

    def _stale_reason(self, current: Holder, mine: Holder) -> str | None:
        now = time.time()
        if current.host == mine.host:
            if current.pid == mine.pid:
                return None if current.pid_started == mine.pid_started else "its pid now belongs to this process"
            if not pid_alive(current.pid):
                return "its process is gone"
            started = process_start_time(current.pid)
            if current.pid_started is not None and started is not None and abs(started - current.pid_started) > 1:
                return "its pid now belongs to another process"
        if current.job is not None and current.job == mine.job and mine.restarts > current.restarts:
            return f"it is this Slurm job's previous run (restart {current.restarts}, now {mine.restarts})"
        if now - current.heartbeat > self.timeout_s:
            return f"no heartbeat for {now - current.heartbeat:.0f} s (timeout {self.timeout_s:.0f} s)"
        return None

    def _remove_if_still(self, token: str | None) -> None:
        """Remove the lease file if it is still the one with `token` (None: any unreadable one). Renaming it aside
        first means a lease that someone else creates meanwhile is never deleted by mistake."""
        aside = tmp_path(self.path, self.tmp_dir)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read_holder(aside)
        if (moved.token if moved is not None else None) != token:
            try:  # not the one we judged: give it back (fails only if yet another lease appeared, which then wins)
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.parent.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read_holder(self.path)
            if current is None or current.token != self.holder.token:
                self._lost_to = current.describe(time.time()) if current is not None else "nobody (lease file removed)"
                log.error("%s: lost the lease on %s to %s", self.path, self.what, self._lost_to)
                return
            self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            try:
                atomic_write_bytes(self.path, json_bytes(asdict(self.holder)), sync_dir=False)
            except OSError as err:  # a hiccup of the shared file system: try again at the next beat
                log.warning("%s: heartbeat not written: %s", self.path, err)


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None


def read_holder(path: str | Path) -> Holder | None:
    """The holder recorded in a lease file, or None (no lease, or unreadable)."""
    return _read_holder(Path(path))
