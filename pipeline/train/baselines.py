"""Held-out quality of several SAE variants next to a PCA baseline on the same rows.

PCA with the top k principal components is the best any k-dimensional *linear* code can do; an SAE with L0 = k that
does not beat it has not learned a useful sparse code."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config.load import apply_override, validate
from pipeline.config.train import TrainRunConfig

from .data import fixed_sample, open_dataset, split_shards
from .evaluate import read_eval_rows
from .trainer import Trainer

log = logging.getLogger(__name__)


class PCABaseline:
    """Principal components fitted on training rows; `fvu(k)` scores the top-k projection on held-out rows with the
    SAE's definition, sum ||x - x_hat||² / sum ||x - mean(eval)||²."""

    def __init__(self, train_rows: torch.Tensor, eval_rows: torch.Tensor) -> None:
        x = train_rows.double()
        self.mean = x.mean(0)
        cov = (x - self.mean).T @ (x - self.mean) / max(x.shape[0] - 1, 1)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.components = vectors.flip(1)  # largest first
        self.eval_rows = eval_rows.double()
        self.total = (self.eval_rows - self.eval_rows.mean(0)).pow(2).sum()

    def fvu(self, k: int) -> float:
        top = self.components[:, : max(k, 0)]
        centred = self.eval_rows - self.mean
        x_hat = self.mean + (centred @ top) @ top.T
        return float((self.eval_rows - x_hat).pow(2).sum() / self.total)


def pca_topk_fvu(train_rows: torch.Tensor, eval_rows: torch.Tensor, k: int) -> float:
    return PCABaseline(train_rows, eval_rows).fvu(k)


def compare_variants(base: TrainRunConfig, variants: dict[str, list[str]], run_root: str | Path,
                     pca_k: int | None = None, pca_train_rows: int = 65_536) -> dict[str, dict]:
    """Train each variant (a name and dotted overrides applied to `base`) in this process, each in run_root/<name>,
    and return {name: {fvu, l0, dead_pct, dense_pct, mse, pca_fvu_at_l0}} plus "pca_topk": {fvu, k}, all on the
    same held-out rows (k defaults to base.sae.k)."""
    dataset = open_dataset(base.data, base.sae.d_in)
    split = split_shards(dataset, base.data)
    pca = PCABaseline(fixed_sample(dataset, split.train, pca_train_rows, seed=base.train.seed),
                      read_eval_rows(dataset, split.eval, base.eval.max_rows))
    results: dict[str, dict] = {}
    for name, overrides in variants.items():
        data = base.model_dump(mode="json")
        data["run_dir"] = str(Path(run_root) / name)
        for assignment in overrides:
            apply_override(data, assignment)
        cfg = validate(TrainRunConfig, data, f"variant {name}")
        result = Trainer(cfg).fit()
        if result.eval is None:
            raise RuntimeError(f"variant {name}: training stopped early ({result.status})")
        metrics = {key: result.eval[key] for key in ("fvu", "l0", "dead_pct", "dense_pct", "mse")}
        # PCA given as many components as the variant uses latents per token: the like-for-like linear baseline.
        metrics["pca_fvu_at_l0"] = pca.fvu(round(metrics["l0"]))
        results[name] = metrics
        log.info("variant %s: %s", name, metrics)
    k = pca_k if pca_k is not None else base.sae.k
    results["pca_topk"] = {"fvu": pca.fvu(k), "k": k}
    return results
