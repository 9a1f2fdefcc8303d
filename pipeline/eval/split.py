"""Which shards of a store are held out for evaluation: the same choice for the trainer, its evaluation and every
later analysis of the run, so that nothing is scored on rows it was trained on."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.store import ActivationDataset


@dataclass(frozen=True)
class Split:
    train: list[int]  # shard indices
    eval: list[int]


def held_out_shards(n: int, k: int) -> list[int]:
    """k of n shard indices, 0 < k < n: the shard holding the middle of each of k equal stretches (distinct: the
    middles are n/k >= 1 apart)."""
    return [int((i + 0.5) * n / k) for i in range(k)]


def split_shards(dataset: ActivationDataset, eval_shards: int) -> Split:
    """`eval_shards` shards spread evenly over the dataset are held out: the middle shard of each of that many equal
    stretches. Shards follow the corpus stream (task by task), so the last few would all come from its end, and on a
    corpus that is not shuffled (the demo sample) from a narrower mix of sources than training sees."""
    n = dataset.num_shards
    if n == 0:
        raise ConfigError(f"data.root {dataset.root}: the dataset has no shards")
    if n <= eval_shards:
        raise ConfigError(
            f"data.eval_shards: holding out {eval_shards} of {n} shards in {dataset.root} leaves none for training"
        )
    held_out = held_out_shards(n, eval_shards)
    return Split(train=[s for s in range(n) if s not in held_out], eval=held_out)
