"""Who a job is, as Prometheus labels: the run, the stage, the Slurm job and array task, the rank, the host.
They go into the job's discovery target (Prometheus attaches them to every series it scrapes from the job) and
into `saepipe_job_info` on the exporter itself."""
from __future__ import annotations

import os
import socket
from pathlib import Path

# dcgm-exporter's per-job mapping labels GPU series with `hpc_job` = the Slurm job id; node-exporter series carry
# `instance`/`host`. A job's series carry both `hpc_job` (= slurm_job_id) and `host`, so that PromQL can join them.
JOIN_LABEL = "hpc_job"


def short_host() -> str:
    return socket.gethostname().split(".")[0]


def job_labels(run: str, stage: str, task: int | None, rank: int) -> dict[str, str]:
    env = os.environ
    job_id = env.get("SLURM_JOB_ID", "")
    array_task = env.get("SLURM_ARRAY_TASK_ID", "")
    return {
        "run": run,
        "stage": stage,
        "task": "-" if task is None else str(task),
        "rank": str(rank),
        "host": short_host(),
        "slurm_job_id": job_id,
        "array_task_id": array_task,
        JOIN_LABEL: job_id,
    }


def run_name(configured: str | None, directory: str) -> str:
    return configured or Path(directory).resolve().name
