"""The trainer's evaluation component: held-out rows read once, its own cadence, results under run_dir/eval/<tag>/."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config.train import EvalConfig
from pipeline.eval import evaluate, read_eval_rows, write_eval
from pipeline.store import ActivationDataset

log = logging.getLogger(__name__)


class HeldOutEval:
    def __init__(self, cfg: EvalConfig, dataset: ActivationDataset, shards: list[int], run_dir: Path,
                 device: torch.device) -> None:
        self.cfg, self.dataset, self.shards = cfg, dataset, shards
        self.out_dir = run_dir / "eval"
        self.device = device
        self._rows: torch.Tensor | None = None

    def due(self, step: int, total_steps: int) -> bool:
        """Periodic evaluations (the final one is the trainer's to call)."""
        every = self.cfg.every_steps
        return bool(every) and step % every == 0 and step < total_steps

    def run(self, sae: torch.nn.Module, step: int, tag: str) -> dict:
        if self._rows is None:
            self._rows = read_eval_rows(self.dataset, self.shards, self.cfg.max_rows)
        result = evaluate(sae, self._rows, batch_size=self.cfg.batch_size, dense_threshold=self.cfg.dense_threshold,
                          device=self.device)
        metrics = write_eval(result, self.out_dir / tag, step=step, histogram=self.cfg.histogram)
        log.info("eval %s: fvu %.4f, mse %.4g, l0 %.1f, dead %.1f%%, dense %.1f%%", tag, metrics["fvu"],
                 metrics["mse"], metrics["l0"], metrics["dead_pct"], metrics["dense_pct"])
        return metrics
