"""Prometheus file-based discovery: each exporter announces itself as one JSON target file in a directory that the
jobs and Prometheus share, written atomically (Prometheus re-reads the directory every few seconds and must never
see half a file).

A file holds `[{"targets": ["host:port"], "labels": {...}}]`. Its owner's host, pid and process start time ride
along as labels starting with `__`, which Prometheus drops after relabelling: they let anyone tell a live owner
from a dead one. A target is stale when its process is gone (same host: the pid is dead or belongs to a newer
process) or when its file has not been refreshed for `stale_after_s` (another host: the owner refreshes the file's
mtime every heartbeat). Every exporter sweeps stale targets when it starts and at each heartbeat, and so does
`saepipe monitor`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil

from pipeline.io import atomic_write_json

from .labels import short_host

log = logging.getLogger(__name__)

OWNER_HOST, OWNER_PID, OWNER_STARTED = "__saepipe_host", "__saepipe_pid", "__saepipe_started"


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class TargetFile:
    """This process's target: written at start, refreshed by heartbeats, removed at the end."""

    def __init__(self, directory: str | Path, address: str, port: int, labels: dict[str, str]) -> None:
        self.directory = Path(directory).expanduser()
        pid = os.getpid()
        name = "-".join(labels.get(k, "") or "x" for k in ("run", "stage", "task", "rank")).replace("/", "_")
        self.path = self.directory / f"{name}-{short_host()}-{pid}-{port}.json"
        owner = {OWNER_HOST: short_host(), OWNER_PID: str(pid), OWNER_STARTED: f"{_process_started(pid) or 0:.2f}"}
        self.content = [{"targets": [f"{address}:{port}"], "labels": {**labels, **owner}}]

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.content)

    def refresh(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:  # swept by mistake (a clock far off) or deleted by hand: announce again
            self.write()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def is_stale(path: Path, stale_after_s: float, now: float | None = None) -> bool:
    try:
        data = json.loads(path.read_text())
        labels = data[0]["labels"]
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return True  # not a target anyone can use
    if labels.get(OWNER_HOST) == short_host():
        try:
            pid, started = int(labels[OWNER_PID]), float(labels[OWNER_STARTED])
        except (KeyError, ValueError):
            return age > stale_after_s
        actual = _process_started(pid)
        return actual is None or abs(actual - started) > 1.0
    return age > stale_after_s


def sweep_stale(directory: str | Path, stale_after_s: float) -> list[Path]:
    """Remove the stale targets in `directory`; returns them. Safe to run from many processes at once."""
    removed = []
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return removed
    for path in sorted(directory.glob("*.json")):
        if is_stale(path, stale_after_s):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
            log.warning("removed the stale Prometheus target %s (its job is gone)", path.name)
    return removed


def list_targets(directory: str | Path) -> list[dict]:
    out = []
    for path in sorted(Path(directory).expanduser().glob("*.json")):
        try:
            entry = json.loads(path.read_text())[0]
        except (OSError, ValueError, KeyError, IndexError):
            continue
        out.append({"file": path.name, "target": entry["targets"][0],
                    "labels": {k: v for k, v in entry["labels"].items() if not k.startswith("__")}})
    return out
