"""Held-out evaluation on shards the trainer never reads: reconstruction (MSE, FVU), sparsity (L0), dead and dense
latents over the evaluated window of tokens, and a feature-density histogram."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.errors import StoreError
from pipeline.io import atomic_write_json, save_png
from pipeline.store import ActivationDataset

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    rows: int
    mse: float  # mean squared error per element, in the activations' own units
    fvu: float  # fraction of variance unexplained: sum ||x - x_hat||² / sum ||x - mean(x)||²
    l0: float  # mean active latents per row
    dead_pct: float  # latents that never fired in the window
    dense_pct: float  # latents firing on more than dense_threshold of the window
    density: torch.Tensor  # [d_sae] firing frequency per latent

    def metrics(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("density")
        return d


def read_eval_rows(dataset: ActivationDataset, shards: list[int], max_rows: int) -> torch.Tensor:
    """Up to max_rows held-out rows in storage dtype (bf16 halves the memory of the window), shard by shard."""
    parts, have = [], 0
    for shard in shards:
        acts = dataset.read_acts(shard, dtype=torch.bfloat16)
        parts.append(acts[: max_rows - have])
        have += parts[-1].shape[0]
        if have >= max_rows:
            break
    if not parts or have == 0:
        raise StoreError(f"{dataset.root}: the held-out shards {shards} have no rows to evaluate on")
    return torch.cat(parts)


@torch.no_grad()
def evaluate(sae: torch.nn.Module, rows: torch.Tensor, *, batch_size: int, dense_threshold: float, device: torch.device) -> EvalResult:
    """`sae` needs encode/decode with inference semantics; `rows` are raw activations [N, d_in]."""
    was_training = sae.training
    sae.eval()
    n = rows.shape[0]
    # Two passes: the mean first, so the variance is not a difference of two large sums.
    mean = torch.zeros(rows.shape[1], dtype=torch.float64, device=device)
    for start in range(0, n, batch_size):
        mean += rows[start : start + batch_size].to(device, torch.float64).sum(0)
    mean /= n
    sq_err = total_var = active = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
    for start in range(0, n, batch_size):
        x = rows[start : start + batch_size].to(device, torch.float32)
        z = sae.encode(x)
        x_hat = sae.decode(z).float()
        sq_err += (x - x_hat).double().pow(2).sum().item()
        total_var += (x.double() - mean).pow(2).sum().item()
        nonzero = z != 0
        active += nonzero.sum().item()
        fired += nonzero.sum(0)
    sae.train(was_training)
    density = (fired.double() / n).cpu()
    return EvalResult(
        rows=n,
        mse=sq_err / (n * rows.shape[1]),
        fvu=sq_err / total_var if total_var > 0 else math.nan,
        l0=active / n,
        dead_pct=100.0 * (density == 0).double().mean().item(),
        dense_pct=100.0 * (density > dense_threshold).double().mean().item(),
        density=density,
    )


def save_density_histogram(density: torch.Tensor, path: Path, title: str = "") -> None:
    """log10 firing frequency of the live latents; dead ones (frequency 0) are counted in the title."""
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=60, color="tab:blue")
    ax.set_xlabel("log10 feature density (fraction of tokens)")
    ax.set_ylabel("latents")
    dead = int((density == 0).sum())
    ax.set_title(f"{title}  dead: {dead}/{density.numel()}".strip())
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_png(fig, path, dpi=100)
    finally:
        plt.close(fig)


def write_eval(result: EvalResult, directory: Path, *, step: int, histogram: bool) -> dict:
    """eval.json (and density.png) under `directory`; returns the metrics written."""
    directory.mkdir(parents=True, exist_ok=True)
    metrics = {"step": step, **result.metrics()}
    atomic_write_json(directory / "eval.json", metrics)
    if histogram:
        save_density_histogram(result.density, directory / "density.png", title=f"step {step}")
    return metrics
