"""Data-dependent initialisation: the input scale factor and the decoder bias from a sample of activations."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def input_scale_factor(x: Tensor) -> float:
    """The constant s with E||s·x|| = sqrt(d): one scalar for the whole run (April 2024 recipe), so that
    hyperparameters such as λ transfer between layers and models whose activations differ in magnitude."""
    mean_norm = x.float().norm(dim=-1).double().mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot scale inputs: mean activation norm is {mean_norm}")
    return math.sqrt(x.shape[-1]) / mean_norm


def geometric_median(x: Tensor, iters: int = 30, eps: float = 1e-6, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x [N, d].

    Unlike the mean it is not dragged by a few outlier rows (attention-sink tokens reach norms of 10^4).
    Each iteration costs one pass over x; a sample of ~10^4-10^5 rows is plenty."""
    points = x.float()
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights @ points) / weights.sum()
        shift = ((new - median).norm() / median.norm().clamp_min(eps)).item()
        median = new
        if shift < tol:
            break
    return median.to(x.dtype)


def decoder_bias_init(x: Tensor, method: str) -> Tensor:
    if method == "geometric_median":
        return geometric_median(x)
    if method == "mean":
        return x.mean(dim=0, dtype=torch.float64).to(x.dtype)
    if method == "zeros":
        return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    raise ValueError(f"sae.b_dec_init: unknown method {method!r}")
