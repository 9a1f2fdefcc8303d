"""submitit executors from a stage's `slurm:` section: `slurm` (sbatch through submitit), `local` (processes on this
machine, same job code), `debug` (in this process, for stepping through with a debugger)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import submitit

from pipeline.config.cluster import SlurmConfig
from pipeline.errors import ConfigError

Cluster = Literal["slurm", "local", "debug"]
SUBMITIT_DIR = "submitit"


def make_executor(cluster: Cluster, run_dir: str | Path, slurm: SlurmConfig, *, stage: str, tasks_per_node: int = 1,
                  dependency: str | None = None) -> submitit.AutoExecutor:
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--cluster slurm: no `sbatch` on PATH (on a workstation: slurm/local-cluster/start.sh, then "
                          "export the SLURM_CONF it prints; or use --cluster local)")
    # max_num_timeout: a time-out counts against it, a preemption does not (submitit tells them apart by elapsed time)
    executor = submitit.AutoExecutor(folder=Path(run_dir) / SUBMITIT_DIR / "%j", cluster=cluster,
                                     slurm_max_num_timeout=slurm.max_requeues)
    params: dict = {
        "name": slurm.job_name or f"saepipe-{stage}",
        "timeout_min": slurm.time_min,
        "nodes": slurm.nodes if stage == "train" else 1,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node if stage == "train" else 1
    if slurm.mem_gb is not None:
        params["mem_gb"] = slurm.mem_gb
    if cluster == "slurm":
        extra = {k: v for k, v in {"slurm_partition": slurm.partition, "slurm_account": slurm.account,
                                    "slurm_qos": slurm.qos, "slurm_constraint": slurm.constraint}.items() if v}
        params.update(extra)
        params.update({
            "slurm_array_parallelism": slurm.array_parallelism,
            "slurm_signal_delay_s": slurm.signal_delay_s,
            "slurm_setup": list(slurm.setup),
            "slurm_additional_parameters": dict(slurm.additional_parameters),
        })
        if dependency:
            params["slurm_dependency"] = dependency
    executor.update_parameters(**params)
    return executor
