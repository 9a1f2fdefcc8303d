"""Waiting for a submitted run to end (the local executor, `saepipe submit --wait`)."""
from __future__ import annotations

import time
from pathlib import Path

from .record import load_submission
from .state import ACTIVE, job_state


def wait_for_run(run_dir: str | Path, poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    sub = load_submission(run_dir)
    start = time.time()
    while True:
        active = [j for stage in sub.jobs.values() for job in stage for j in (job["tasks"].values() or [job["job_id"]])
                  if job_state(sub.cluster, j, job["folder"]) in ACTIVE]
        if not active or (timeout_s is not None and time.time() - start > timeout_s):
            return
        time.sleep(poll_s)
