"""Build the SAE class that a config's `arch` names."""
from __future__ import annotations

import torch

from pipeline.config.sae import SAEConfig

from .base import SparseAutoencoder
from .relu import ReluSAE2023, ReluSAE2024
from .topk import BatchTopKSAE, TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.arch: cls for cls in (ReluSAE2023, ReluSAE2024, TopKSAE, BatchTopKSAE)
}


def make_sae(cfg: SAEConfig, device: str | torch.device | None = None) -> SparseAutoencoder:
    try:
        cls = ARCHITECTURES[cfg.arch]
    except KeyError:
        known = sorted(ARCHITECTURES)
        raise ValueError(f"sae.arch: unknown architecture {cfg.arch!r}; choose one of {known}") from None
    sae = cls(cfg)
    return sae.to(device) if device is not None else sae
