"""The tiny training setup that the resume and DDP tests share: a synthetic store and a config file around it."""
from __future__ import annotations

from pathlib import Path

import yaml

from helpers.synthetic import write_synthetic_dataset


def tiny_dataset(directory: Path) -> Path:
    return write_synthetic_dataset(directory / "acts", d=32, shards=5, rows_per_shard=1024)


def write_tiny_config(path: Path, dataset: Path, run_dir: Path, *, steps: int, log_every: int, eval_rows: int,
                      checkpoint: dict) -> Path:
    """A TopK run of `steps` steps of 128 rows on `dataset`; the tests switch the architecture with overrides."""
    cfg = {
        "run_dir": str(run_dir),
        "data": {"root": str(dataset), "eval_shards": 1, "partitions": 2, "init_rows": 512},
        "sae": {"arch": "topk", "d_in": 32, "d_sae": 256, "k": 2, "dead_tokens": 512},
        "train": {"batch_size": 128, "steps": steps, "lr": 3e-3, "warmup_steps": 3, "log_every": log_every, "threads": 1},
        "eval": {"max_rows": eval_rows, "batch_size": 256, "histogram": False},
        "checkpoint": checkpoint,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
