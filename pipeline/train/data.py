"""Training data: the held-out split, the size checks, and the partitioned global batch.

The global batch of B rows is made of P fixed partitions of B/P rows each; partition p is the store reader with
rank=p, world_size=P over the training shards. Rank r of W owns partitions p = r (mod W) and feeds the concatenation
of its partitions, so the global batch (and with a mean loss, the averaged gradient) does not depend on W, and a
rank only ever reads its own partitions."""
from __future__ import annotations

import torch

from pipeline.config.train import DataConfig
from pipeline.errors import CheckpointError, ConfigError
from pipeline.eval import Split
from pipeline.store import ActivationDataset, BatchSizeError


def open_dataset(cfg: DataConfig, d_in: int) -> ActivationDataset:
    """The store, refusing an incomplete one unless data.allow_incomplete says so (a task still running or failed
    would otherwise leave a silent hole in the training data)."""
    dataset = ActivationDataset.open(cfg.root)
    if dataset.incomplete and not cfg.allow_incomplete:
        raise ConfigError(f"data.root {cfg.root}: the store is incomplete ({'; '.join(dataset.incomplete)}); finish "
                          "the extraction, or set data.allow_incomplete=true to train on what is there")
    if dataset.d_model != d_in:  # checked here rather than by the store, so the message names the config key
        raise ConfigError(f"sae.d_in is {d_in}, but the dataset at {cfg.root} has d_model {dataset.d_model}")
    return dataset


def check_enough_rows(dataset: ActivationDataset, split: Split, batch_size: int, root: str) -> None:
    """One global batch at least; a smaller store is a config mistake, not something to loop over silently."""
    rows = sum(dataset.shards[s].rows for s in split.train)
    if rows < batch_size:
        raise ConfigError(
            f"data.root {root}: {rows} training rows (after holding out {len(split.eval)} eval shards) "
            f"is fewer than one global batch of train.batch_size={batch_size}"
        )


def owned_partitions(partitions: int, rank: int, world_size: int) -> list[int]:
    if partitions % world_size:
        raise ConfigError(f"data.partitions {partitions} must be a multiple of the number of processes {world_size}")
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
        except BatchSizeError:  # the reader deals whole row groups to partitions: one can come up short of a batch
            raise ConfigError(
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
            raise CheckpointError(f"checkpoint has no reader state for data partitions {missing}")
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
