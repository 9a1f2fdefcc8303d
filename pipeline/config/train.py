"""What `saepipe train` reads: the activation store, the SAE, the optimiser, held-out evaluation and checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .cluster import SlurmConfig
from .sae import SAEConfig
from .strict import Strict
from .telemetry import TelemetryConfig


class DataConfig(Strict):
    root: str = Field(description="root of an activation store written by `saepipe extract`")
    eval_shards: int = Field(default=1, ge=1, description=(
        "shards held out for evaluation, spread evenly over the store, never trained on"))
    partitions: int = Field(default=8, gt=0, description=(
        "fixed data partitions of the global batch: partition p reads its own slice of the training shards and gives "
        "batch_size / partitions rows to every step; rank r of W owns partitions p = r (mod W), so the global batch "
        "is the same whatever the world size (which must divide it)"))
    init_rows: int = Field(default=8192, gt=0, description=(
        "rows read (identically on every rank) for the data-dependent init: b_dec and the input scale"))
    allow_incomplete: bool = Field(default=False, description=(
        "train on a store whose extraction tasks are not all complete (otherwise refused)"))
    verify_checksums: bool = Field(default=True, description=(
        "check every shard's xxh3 checksum before the first step (shards verified before for this run_dir and "
        "unchanged since are skipped)"))


class TrainConfig(Strict):
    batch_size: int = Field(default=4096, gt=0, description="global rows (tokens) per optimiser step")
    tokens: int | None = Field(default=None, gt=0, description="run length in tokens, rounded up to whole steps (or `steps`)")
    steps: int | None = Field(default=None, gt=0, description="run length in steps (or `tokens`)")
    lr: float = Field(default=2e-4, gt=0, description="Adam learning rate")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam betas")
    eps: float = Field(default=6.25e-10, gt=0, description=(
        "Adam epsilon (OpenAI's TopK paper; torch's 1e-8 is large next to tiny second moments)"))
    warmup_steps: int = Field(default=1000, ge=0, description="linear learning-rate warmup")
    decay: Literal["none", "linear", "cosine"] = Field(default="linear", description=(
        "learning-rate shape after warmup: constant, then from `decay_start` on linear or cosine decay"))
    decay_start: float = Field(default=0.8, ge=0.0, le=1.0, description="fraction of the run where the decay starts")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="the decay ends at min_lr_ratio * lr")
    grad_clip: float | None = Field(default=1.0, gt=0, description="gradient-norm clip; unset: none")
    seed: int = Field(default=0, description="data order")
    log_every: int = Field(default=50, gt=0, description="metrics interval (progress bar, metrics.jsonl, callbacks)")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description=(
        "`auto`: bf16 autocast on GPU, fp32 on CPU; parameters and Adam state stay fp32"))
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="training device")
    threads: int | None = Field(default=None, gt=0, description="torch intra-op threads per process; unset keeps torch's choice")
    deterministic: bool = Field(default=False, description=(
        "torch.use_deterministic_algorithms (warn-only). Resume is bit-exact on CPU with fixed `threads` either way; "
        "on GPU, scatter-style kernels (embedding_bag / index_add backward) need this to repeat bit for bit"))

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("train: give exactly one of `tokens` or `steps`")
        return self

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return -(-self.tokens // self.batch_size)


class EvalConfig(Strict):
    every_steps: int = Field(default=0, ge=0, description="held-out evaluation interval; 0: only after the last step")
    max_rows: int = Field(default=65_536, gt=0, description="held-out rows read per evaluation (the dead/dense window)")
    batch_size: int = Field(default=4096, gt=0, description="rows per evaluation batch")
    dense_threshold: float = Field(default=0.1, gt=0.0, le=1.0, description=(
        "a latent firing on more than this fraction of held-out tokens counts as dense"))
    histogram: bool = Field(default=True, description="feature-density histogram PNG next to the metrics")


class CheckpointConfig(Strict):
    every_steps: int = Field(default=1000, gt=0, description="checkpoint interval (and one on every stop signal)")
    keep_last: int = Field(default=3, gt=0, description="checkpoints kept")


class TrainRunConfig(Strict):
    """What `saepipe train` reads."""

    run_dir: str = Field(description="checkpoints, metrics, evaluation, export")
    resume: Literal["never", "auto"] = Field(default="never", description=(
        "`auto`: continue from the newest valid checkpoint in run_dir/checkpoints if there is one (`--resume`)"))
    lease_timeout_s: float = Field(default=600.0, gt=0, description=(
        "the run directory's lease counts as stale after this long without a heartbeat"))
    data: DataConfig
    sae: SAEConfig
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = Field(default_factory=lambda: SlurmConfig(cpus_per_task=8), description=(
        "resources when submitted as a Slurm job (one task per GPU)"))
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="the job's Prometheus exporter")

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainRunConfig":
        if self.train.batch_size % self.data.partitions:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} must be a multiple of data.partitions {self.data.partitions}"
            )
        return self
