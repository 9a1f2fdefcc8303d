"""SAE architecture config: which recipe, its sizes and its loss knobs. Training-loop settings live with the trainer."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .strict import Strict

Arch = Literal["relu_2023", "relu_2024", "topk", "batchtopk"]


class ResampleConfig(Strict):
    """Dead-latent resampling of the 2023 ReLU recipe (Anthropic, "Towards Monosemanticity")."""

    every_steps: int = Field(default=25_000, gt=0, description="resampling interval")
    window_steps: int = Field(default=12_500, gt=0, description=(
        "a latent is resampled when it has not fired within this many most recent steps"))
    sample_inputs: int = Field(default=65_536, gt=0, description=(
        "inputs whose loss is measured; new directions are drawn from them with p ∝ loss²"))
    encoder_scale: float = Field(default=0.2, gt=0, description=(
        "new encoder rows get this fraction of the mean norm of the live encoder rows"))
    bias_value: float = Field(default=0.0, description="value the resampled latents' encoder bias is reset to")
    max_rounds: int | None = Field(default=4, gt=0, description=(
        "stop resampling after this many rounds (the 2023 recipe resampled 4 times); unset: never stop"))


class SAEConfig(Strict):
    arch: Arch = Field(description="`relu_2023`, `relu_2024`, `topk` or `batchtopk`")
    d_in: int = Field(gt=0, description="input width (must equal the store's d_model)")
    d_sae: int = Field(gt=0, description="number of latents")
    k: int = Field(default=32, gt=0, description="topk / batchtopk: active latents per row (batchtopk: on average)")
    l1_coefficient: float = Field(default=5.0, ge=0, description=(
        "ReLU recipes' L1 penalty λ. Loss units are the per-row squared error summed over d_in on inputs scaled to "
        "E‖x‖ = √d_in (the April 2024 convention, so its λ=5 carries over; the 2023 recipe uses the same units)"))
    l1_warmup_frac: float = Field(default=0.05, ge=0, le=1, description="relu_2024: λ ramps up linearly over this fraction")
    normalize_input: bool = Field(default=True, description="scale inputs by one constant so that E‖x‖ = √d_in")
    dead_tokens: int = Field(default=10_000_000, gt=0, description="a latent is dead after this many tokens without firing (AuxK)")
    aux_k: int | None = Field(default=None, gt=0, description="AuxK latents per row; unset: d_in // 2 (from d_in, not d_sae)")
    aux_coefficient: float = Field(default=1 / 32, ge=0, description="AuxK loss weight")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(default="geometric_median", description=(
        "decoder-bias initialisation from a sample of activations"))
    resample: ResampleConfig | None = Field(default=None, description="relu_2023 only: dead-latent resampling")
    threshold_momentum: float = Field(default=0.99, ge=0, lt=1, description=(
        "batchtopk: EMA of the smallest selected activation during training (calibrated at the end)"))
    seed: int = Field(default=0, description=(
        "weight initialisation; equal on every rank so that data-parallel replicas start identical"))

    @property
    def resolved_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    @model_validator(mode="after")
    def _consistent(self) -> "SAEConfig":
        if self.arch in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(f"sae.k: {self.k} must be <= d_sae {self.d_sae}")
        if self.resample is not None and self.arch != "relu_2023":
            raise ValueError(f"sae.resample: only the relu_2023 recipe resamples, not {self.arch}")
        return self
