"""Held-out quality of several SAE variants, trained one after another in this process, next to a PCA baseline on the
same rows (pipeline.eval.baselines)."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.load import apply_override, validate
from pipeline.config.train import TrainRunConfig
from pipeline.eval import PCABaseline, read_eval_rows, split_shards

from .data import fixed_sample, open_dataset
from .trainer import Trainer

log = logging.getLogger(__name__)


def compare_variants(base: TrainRunConfig, variants: dict[str, list[str]], run_root: str | Path,
                     pca_k: int | None = None, pca_train_rows: int = 65_536) -> dict[str, dict]:
    """Train each variant (a name and dotted overrides applied to `base`) in this process, each in run_root/<name>,
    and return {name: {fvu, l0, dead_pct, dense_pct, mse, pca_fvu_at_l0}} plus "pca_topk": {fvu, k}, all on the
    same held-out rows (k defaults to base.sae.k)."""
    dataset = open_dataset(base.data, base.sae.d_in)
    split = split_shards(dataset, base.data.eval_shards)
    pca = PCABaseline(fixed_sample(dataset, split.train, pca_train_rows, seed=base.train.seed),
                      read_eval_rows(dataset, split.eval, base.eval.max_rows))
    results: dict[str, dict] = {}
    for name, overrides in variants.items():
        data = base.model_dump(mode="json")
        data["run_dir"] = str(Path(run_root) / name)
        for assignment in overrides:
            apply_override(data, assignment)
        cfg = validate(TrainRunConfig, data, f"variant {name}")
        with Trainer(cfg) as trainer:
            result = trainer.fit()
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
