"""What the analysis stage reads (`saepipe submit pipeline` runs it after training; `saepipe analyze`, `eval` and
`browse` take the same settings as options): the feature statistics pass, the spliced evaluation and the browser."""
from __future__ import annotations

from pydantic import Field

from .cluster import SlurmConfig
from .strict import Strict


class AnalysisRunConfig(Strict):
    run: str = Field(description=(
        "the trained SAE: a training run directory (its held-out shards are analysed) or a SAELens-format directory "
        "(then `store` is required); in a pipeline config it is set from train.run_dir"))
    store: str | None = Field(default=None, description=(
        "activation store to analyse; unset: the training run's data.root"))
    out: str | None = Field(default=None, description="analysis directory; unset: RUN/analysis")
    tokens: int | None = Field(default=None, gt=0, description=(
        "token budget of the statistics pass, taken shard by shard from the held-out shards; unset: all of them"))
    top_k: int = Field(default=20, gt=0, description="top-activating examples kept per feature (exact, not sampled)")
    n_intervals: int = Field(default=10, gt=0, description=(
        "equal-width activation intervals over [0, max] from which examples are sampled (as SAEDashboard does)"))
    samples_per_interval: int = Field(default=5, ge=0, description="random examples kept per interval")
    hist_bins: int = Field(default=40, gt=0, description="bins of each feature's activation histogram")
    window: int = Field(default=16, ge=0, description="tokens kept on each side of an example's activating token")
    batch_size: int = Field(default=4096, gt=0, description="rows encoded at once")
    device: str = Field(default="auto", description="`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`")
    spliced_eval: bool = Field(default=True, description=(
        "also measure CE loss and KL with the SAE spliced into the model (`saepipe eval`)"))
    eval_contexts: int = Field(default=64, gt=0, description="held-out contexts of the spliced evaluation")
    browser: bool = Field(default=True, description="also build the static feature browser (`saepipe browse`)")
    slurm: SlurmConfig = Field(default_factory=lambda: SlurmConfig(time_min=120), description=(
        "Slurm resources of the analysis job (one task, one GPU by default)"))
