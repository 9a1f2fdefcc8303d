"""The linear baseline an SAE must beat: PCA with as many components as the SAE has active latents.

PCA with the top k principal components is the best any k-dimensional *linear* code can do; an SAE with L0 = k that
does not beat it has not learned a useful sparse code."""
from __future__ import annotations

import torch


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
