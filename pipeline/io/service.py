"""Waiting for a server this process started (Prometheus, Alertmanager, `transformers serve`) to answer over HTTP."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def answering(url: str, timeout_s: float = 1.0) -> bool:
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def wait_answering(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path, *, poll_s: float = 0.1,
                   request_timeout_s: float = 1.0) -> str | None:
    """Poll `url` until it answers 200: None then, else why not, in a few words (the process exited with its log's
    last line, or the deadline passed), for the caller's one-line error."""
    deadline = time.monotonic() + timeout_s
    while not answering(url, request_timeout_s):
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}: {_last_line(log_path)}"
        if time.monotonic() > deadline:
            return f"no answer from {url} within {timeout_s:g} s: {_last_line(log_path)}"
        time.sleep(poll_s)
    return None


def _last_line(log_path: Path) -> str:
    try:
        lines = Path(log_path).read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "no output"
