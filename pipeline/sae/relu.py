"""ReLU SAEs trained with an L1 penalty: the 2023 recipe and Anthropic's April 2024 update."""
from __future__ import annotations

import torch
from torch import Tensor

from .autograd import ReluEncodeDecode
from .base import SAEOutput, SparseAutoencoder


class ReluSAE2023(SparseAutoencoder):
    """Towards Monosemanticity (2023): encoder sees x - b_dec, unit-norm decoder rows, loss = MSE + λ·L1.
    Dead latents are revived by pipeline.sae.resample, which the trainer calls."""

    arch = "relu_2023"
    saelens_architecture = "standard"

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return self._pre_activation(xs).relu()

    def _l1_weight(self, progress: float) -> float:
        return self.cfg.l1_coefficient

    def _l1_latent_weights(self) -> Tensor | None:
        return None  # plain L1: z >= 0, so Σ_j z_j is the L1 norm

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        x_hat_s, penalty, l0, fired = ReluEncodeDecode.apply(
            xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self._l1_latent_weights(), self.apply_b_dec_to_input)
        mse, fvu = self._reconstruction_terms(xs, x_hat_s)
        lam = self._l1_weight(progress)
        terms = {
            "recon_loss": mse.detach(),
            "fvu": fvu,
            "l1_loss": penalty.detach(),
            "lambda": torch.tensor(lam, device=xs.device),
            "l0": l0,
        }
        return SAEOutput(x_hat=x_hat_s, loss=mse + lam * penalty, terms=terms, fired=fired)


class ReluSAE2024(ReluSAE2023):
    """April 2024 update: no decoder constraint, so the L1 term weights each latent by its decoder norm (otherwise
    the model would shrink z and grow W_dec); decoder rows start at norm 0.1 with W_enc = W_decᵀ; λ warms up
    linearly; the encoder sees x itself, not x - b_dec."""

    arch = "relu_2024"
    apply_b_dec_to_input = False
    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def _l1_weight(self, progress: float) -> float:
        warmup = self.cfg.l1_warmup_frac
        ramp = 1.0 if warmup <= 0 else min(1.0, max(0.0, progress) / warmup)
        return self.cfg.l1_coefficient * ramp

    def _l1_latent_weights(self) -> Tensor | None:
        return self.W_dec.norm(dim=1)
