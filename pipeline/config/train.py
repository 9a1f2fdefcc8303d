"""What `saepipe train` reads: the activation store, the SAE, the optimiser, held-out evaluation and checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .sae import SAEConfig
from .schema import Strict


class DataConfig(Strict):
    # Root of an activation store written by `saepipe extract` (pipeline.store).
    root: str
    # This many shards, spread evenly over the store, are held out for evaluation and never trained on.
    eval_shards: int = Field(default=1, ge=1)
    # Fixed number of data partitions: partition p reads its own slice of the training shards and contributes
    # batch_size / partitions rows to every step. Rank r of W owns partitions p = r (mod W), so the global batch is
    # the same whatever the world size (which must divide it).
    partitions: int = Field(default=8, gt=0)
    # Rows read (identically on every rank) for the SAE's data-dependent init: b_dec and the input scale.
    init_rows: int = Field(default=8192, gt=0)


class TrainConfig(Strict):
    batch_size: int = Field(default=4096, gt=0)  # global rows (tokens) per optimiser step
    # Length of the run: give exactly one. `tokens` is rounded up to whole steps.
    tokens: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=6.25e-10, gt=0)  # OpenAI TopK paper; torch's 1e-8 is large next to tiny second moments
    warmup_steps: int = Field(default=1000, ge=0)
    # LR shape after warmup: constant, then (from decay_start * steps on) linear or cosine decay to min_lr_ratio * lr.
    decay: Literal["none", "linear", "cosine"] = "linear"
    decay_start: float = Field(default=0.8, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    log_every: int = Field(default=50, gt=0)
    # "auto": bf16 autocast on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, gt=0)  # torch intra-op threads per process; None keeps torch's choice
    # torch.use_deterministic_algorithms (warn-only). Resume is bit-exact on CPU with fixed `threads` either way; on
    # GPU, scatter-style kernels (embedding_bag / index_add backward) need this to repeat bit for bit.
    deterministic: bool = False

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
    every_steps: int = Field(default=0, ge=0)  # 0: only after the last step
    max_rows: int = Field(default=65_536, gt=0)  # held-out rows read per evaluation (the dead/dense window)
    batch_size: int = Field(default=4096, gt=0)
    # A latent firing on more than this fraction of held-out tokens counts as dense.
    dense_threshold: float = Field(default=0.1, gt=0.0, le=1.0)
    histogram: bool = True  # feature-density histogram PNG next to the metrics


class CheckpointConfig(Strict):
    every_steps: int = Field(default=1000, gt=0)
    keep_last: int = Field(default=3, gt=0)


class TrainRunConfig(Strict):
    """What `saepipe train` reads."""

    run_dir: str
    # "auto": continue from the newest valid checkpoint in run_dir/checkpoints if there is one.
    resume: Literal["never", "auto"] = "never"
    data: DataConfig
    sae: SAEConfig
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainRunConfig":
        if self.train.batch_size % self.data.partitions:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} must be a multiple of data.partitions {self.data.partitions}"
            )
        return self
