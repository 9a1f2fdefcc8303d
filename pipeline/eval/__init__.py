"""Evaluation stage: the held-out split, reconstruction and sparsity metrics of an SAE on held-out rows, the PCA
baseline. The trainer calls it at its eval cadence; analysis (and `saepipe eval`) build on it."""
from .baselines import PCABaseline, pca_topk_fvu
from .evaluate import EvalResult, evaluate, read_eval_rows, save_density_histogram, write_eval
from .split import Split, held_out_shards, split_shards

__all__ = [
    "EvalResult", "PCABaseline", "Split", "evaluate", "held_out_shards", "pca_topk_fvu", "read_eval_rows",
    "save_density_histogram", "split_shards", "write_eval",
]
