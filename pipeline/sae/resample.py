"""Dead-latent resampling of the 2023 ReLU recipe (Anthropic, "Towards Monosemanticity"; seed 002).

Latents that have not fired within a window get a new direction: an input the SAE reconstructs badly, drawn with
probability ∝ its squared loss. The decoder row becomes that input normalised; the encoder column the same direction
at 0.2 × the mean norm of the live encoder columns (so the new latent starts quiet); its bias is reset, and so is
its Adam state, whose stale moments would otherwise throw the fresh weights straight back.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from .base import SparseAutoencoder

log = logging.getLogger(__name__)


@torch.no_grad()
def resample_dead_latents(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer | None,
    dead: Tensor,
    inputs: Tensor,
    *,
    encoder_scale: float = 0.2,
    bias_value: float = 0.0,
    seed: int = 0,
    chunk_rows: int = 8192,
) -> int:
    """Resample the latents flagged in the bool mask `dead` [d_sae] from raw activations `inputs` [N, d_in].

    Deterministic in (weights, inputs, seed): data-parallel ranks that pass the same inputs and seed stay identical.
    Returns the number of latents resampled."""
    device = sae.W_dec.device
    dead = dead.to(device=device, dtype=torch.bool)
    if dead.shape != (sae.cfg.d_sae,):
        raise ValueError(f"resample: dead mask has shape {tuple(dead.shape)}, expected ({sae.cfg.d_sae},)")
    dead_idx = dead.nonzero().squeeze(1)
    n_dead = dead_idx.numel()
    if n_dead == 0:
        return 0
    inputs = inputs.reshape(-1, sae.cfg.d_in)

    scaled, losses = [], []
    for chunk in inputs.split(chunk_rows):
        xs = sae._scaled(chunk.to(device))
        x_hat_s = sae._decode_scaled(sae._encode_scaled(xs))
        scaled.append(xs)
        losses.append((x_hat_s - xs).pow(2).sum(dim=-1))
    xs_all, loss = torch.cat(scaled), torch.cat(losses)

    weights = loss.double().pow(2).cpu()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(weights, n_dead, replacement=True, generator=gen).to(device)

    # The encoder sees x - b_dec in the recipes that subtract it, so that is the direction a new latent should match.
    chosen = xs_all[picks]
    if sae.apply_b_dec_to_input:
        chosen = chosen - sae.b_dec
    directions = chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    live = ~dead
    live_norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0, device=device)
    sae.W_enc[:, dead_idx] = (directions * (encoder_scale * live_norm)).T
    sae.W_dec[dead_idx] = directions
    sae.b_enc[dead_idx] = bias_value

    if optimizer is not None:
        for param, dim in ((sae.W_enc, 1), (sae.W_dec, 0), (sae.b_enc, 0)):
            for value in optimizer.state.get(param, {}).values():
                # exp_avg, exp_avg_sq (and max_exp_avg_sq): same shape as the parameter; `step` is left alone.
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.index_fill_(dim, dead_idx, 0)
    log.info("resampled %d dead latents of %d", n_dead, sae.cfg.d_sae)
    return n_dead
