"""Training data: the held-out split, the size checks, and the partitioned global batch.

The global batch of B rows is made of P fixed partitions of B/P rows each; partition p is the store reader with
rank=p, world_size=P over the training shards. Rank r of W owns partitions p = r (mod W) and feeds the concatenation
of its partitions, so the global batch (and with a mean loss, the averaged gradient) does not depend on W, and a
rank only ever reads its own partitions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config.train import DataConfig
from pipeline.store import ActivationDataset


@dataclass(frozen=True)
class Split:
    train: list[int]  # shard indices
    eval: list[int]


def open_dataset(cfg: DataConfig, d_in: int) -> ActivationDataset:
    dataset = ActivationDataset.open(cfg.root)
    if dataset.d_model != d_in:  # checked here rather than by the store, so the message names the config key
        raise ValueError(f"sae.d_in is {d_in}, but the dataset at {cfg.root} has d_model {dataset.d_model}")
    return dataset


def split_shards(dataset: ActivationDataset, cfg: DataConfig) -> Split:
    """`eval_shards` shards spread evenly over the dataset are held out: the middle shard of each of that many equal
    stretches. Shards follow the corpus stream (task by task), so the last few would all come from its end, and on a
    corpus that is not shuffled (the demo sample) from a narrower mix of sources than training sees."""
    n = dataset.num_shards
    if n == 0:
        raise ValueError(f"data.root {cfg.root}: the dataset has no shards")
    if n <= cfg.eval_shards:
        raise ValueError(
            f"data.eval_shards: holding out {cfg.eval_shards} of {n} shards in {cfg.root} leaves none for training"
        )
    held_out = held_out_shards(n, cfg.eval_shards)
    return Split(train=[s for s in range(n) if s not in held_out], eval=held_out)


def held_out_shards(n: int, k: int) -> list[int]:
    """k of n shard indices, 0 < k < n: the shard holding the middle of each of k equal stretches (distinct: the
    middles are n/k >= 1 apart)."""
    return [int((i + 0.5) * n / k) for i in range(k)]


def check_enough_rows(dataset: ActivationDataset, split: Split, batch_size: int, root: str) -> None:
    rows = sum(dataset.shards[s].rows for s in split.train)
    if rows < batch_size:
        raise ValueError(
            f"data.root {root}: {rows} training rows (after holding out {len(split.eval)} eval shards) "
            f"is fewer than one global batch of train.batch_size={batch_size}"
        )


def owned_partitions(partitions: int, rank: int, world_size: int) -> list[int]:
    if partitions % world_size:
        raise ValueError(f"data.partitions {partitions} must be a multiple of the number of processes {world_size}")
    return [p for p in range(partitions) if p % world_size == rank]


class PartitionedBatches:
    """This rank's slice of every global batch: its partitions' batches concatenated in partition order."""

    def __init__(
        self,
        dataset: ActivationDataset,
        shards: list[int],
        *,
        global_batch: int,
        partitions: int,
        rank: int,
        world_size: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
    ) -> None:
        self.owned = owned_partitions(partitions, rank, world_size)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        rows = global_batch // partitions
        # Pinned memory for the host-to-GPU copy: the reader's own batch if it is the whole local batch, else the
        # concatenation's output.
        pin_parts = self.pin_memory and len(self.owned) == 1
        try:
            self.readers = {
                p: dataset.batches(rows, seed=seed, rank=p, world_size=partitions, dtype=dtype, shards=shards, loop=True,
                                   pin_memory=pin_parts)
                for p in self.owned
            }
        except ValueError:  # the reader deals whole row groups to partitions: one can come up short of a batch
            raise ValueError(
                f"data.partitions: the training row groups cannot give each of {partitions} partitions its {rows} rows "
                "of a batch; lower data.partitions or train.batch_size"
            ) from None
        self.local_rows = rows * len(self.owned)

    def __iter__(self) -> "PartitionedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        parts = [next(self.readers[p]) for p in self.owned]
        if len(parts) == 1:
            return parts[0]
        out = torch.empty((self.local_rows, parts[0].shape[1]), dtype=parts[0].dtype, pin_memory=self.pin_memory)
        return torch.cat(parts, out=out)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def state_dict(self) -> dict[int, dict]:
        return {p: reader.state_dict() for p, reader in self.readers.items()}

    def load_state_dict(self, states: dict[int, dict]) -> None:
        missing = [p for p in self.owned if p not in states]
        if missing:
            raise ValueError(f"checkpoint has no reader state for data partitions {missing}")
        for p, reader in self.readers.items():
            reader.load_state_dict(states[p])


def fixed_sample(dataset: ActivationDataset, shards: list[int], rows: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same rows on every rank whatever the world size: init_from_sample and resampling depend on nothing else.
    Capped at the rows available."""
    rows = min(rows, sum(dataset.shards[s].rows for s in shards))
    reader = dataset.batches(rows, seed=seed, rank=0, world_size=1, dtype=dtype, shards=shards, loop=False, prefetch_batches=1)
    try:
        return next(reader)
    finally:
        reader.close()
