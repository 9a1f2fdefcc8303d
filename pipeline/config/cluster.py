"""What a stage asks of the cluster when it is submitted (`saepipe submit`): Slurm resources per task, requeue limits,
and the lead time of the requeue signal. The `slurm:` section of an extraction or training config; ignored by the
local commands."""
from __future__ import annotations

from pydantic import Field

from .strict import Strict


class SlurmConfig(Strict):
    partition: str | None = Field(default=None, description="Slurm partition (`--partition`); unset: the cluster's default")
    account: str | None = Field(default=None, description="Slurm account (`--account`)")
    qos: str | None = Field(default=None, description="quality of service (`--qos`)")
    constraint: str | None = Field(default=None, description="node features (`--constraint`), e.g. `h100`")
    nodes: int = Field(default=1, gt=0, description="nodes per job (training; an extraction task uses one)")
    gpus_per_node: int = Field(default=1, ge=0, description=(
        "GPUs per node; a training job runs one task (rank) per GPU, an extraction task uses one GPU"))
    tasks_per_node: int | None = Field(default=None, gt=0, description=(
        "training ranks per node; unset: gpus_per_node (one rank per GPU), or 1 on nodes without GPUs"))
    cpus_per_task: int = Field(default=8, gt=0, description="CPUs per task (tokenizer, store writers, data loading)")
    mem_gb: float | None = Field(default=None, gt=0, description="memory per node in GB; unset: the cluster's default")
    time_min: int = Field(default=240, gt=0, description=(
        "time limit per job in minutes; a task that reaches it checkpoints and is requeued"))
    array_parallelism: int = Field(default=64, gt=0, description="extraction tasks running at once")
    max_requeues: int = Field(default=20, ge=0, description=(
        "requeues after a time-out before a task gives up (preemptions do not count)"))
    signal_delay_s: int = Field(default=180, gt=0, description=(
        "seconds before the time limit Slurm sends USR2 (submitit's requeue signal): the window to commit shards or "
        "save a checkpoint (6 GB for the production SAE with Adam state, ~15 s at 390 MB/s of fsync'd disk)"))
    setup: list[str] = Field(default_factory=list, description=(
        "shell lines run before the task in the batch script (module loads, environment activation)"))
    additional_parameters: dict[str, str | int | bool] = Field(default_factory=dict, description=(
        "further sbatch parameters, as submitit passes them (`{mail_type: END}` becomes `--mail-type=END`)"))
    job_name: str | None = Field(default=None, description="job name; unset: saepipe-<stage>")
