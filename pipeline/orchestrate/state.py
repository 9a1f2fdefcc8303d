"""A job's state as submitit sees it (sacct on Slurm; the process on the local executor)."""
from __future__ import annotations

from pathlib import Path

import submitit

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def job_state(cluster: str, job_id: str, folder: str | None, job=None) -> str:
    """One word: Slurm's state (CANCELLED by ... is CANCELLED), or the local executor's."""
    if job is None:
        if cluster == "slurm":
            job = submitit.SlurmJob(folder=Path(folder) / "%j", job_id=job_id)
        elif cluster == "local":
            job = submitit.LocalJob(folder=Path(folder) / "%j", job_id=job_id)
        else:
            return "UNKNOWN"
    try:
        state = str(job.state).split()[0].upper()
        if state == "FINISHED":  # the local executor's word for an ended process, whatever its outcome
            state = "FAILED" if job.exception() is not None else "COMPLETED"
    except Exception:  # noqa: BLE001 - sacct unreachable or the job forgotten: say so rather than fail
        return "UNKNOWN"
    return state
