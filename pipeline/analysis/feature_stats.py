"""Per-feature statistics accumulated over a stream of sparse codes, in memory that depends on d_sae and K only.

- RunningStats: firing count, activation sum and max per feature.
- GroupedSmallest: per group, the m entries with the smallest (key, row), merged batch by batch; exact whatever the
  batching. With the activation's order reversed as key (TopK) it is the exact top-m of each feature, ties going to
  the lower row; with a seeded hash of (feature, row) as key it is a uniform random sample without replacement of
  each group (the m smallest of i.i.d. uniform keys), reproducible and independent of the batching.
- bin_index: equal-width bins over [0, max] with the edges stored in float32, so that a value lies in the bin its
  stored edges say (what np.histogram computes with those edges: half-open bins, the last one closed).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_NO_ROW = torch.iinfo(torch.int64).max


class RunningStats:
    def __init__(self, d_sae: int, device: torch.device):
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)

    def update(self, features: Tensor, values: Tensor) -> None:
        """`values` > 0, one per (row, feature) that fired."""
        self.count += torch.bincount(features, minlength=self.count.numel())
        self.sum.index_add_(0, features, values.to(torch.float64))
        self.max.scatter_reduce_(0, features, values.float(), reduce="amax")


class GroupedSmallest:
    """Per group, the m entries with the smallest (key, row); keys are integers in [0, 2**32 - 1). Table rows are
    sorted ascending, empty slots (key 2**32 - 1, row int64 max) at the end.

    Offered entries are pruned against the table at once but merged into it lazily, once the pending ones are as many
    as the table holds: while the table fills up nearly every entry is a candidate, and merging each batch would
    re-sort the whole table each time. Pruning against a table that is behind is still exact (its m-th only moves
    down). Call flush() before reading the table."""

    EMPTY_KEY = (1 << 32) - 1

    def __init__(self, groups: int, m: int, device: torch.device | str = "cpu"):
        self.groups, self.m = groups, m
        self.key = torch.full((groups, m), self.EMPTY_KEY, dtype=torch.int64, device=device)
        self.row = torch.full((groups, m), _NO_ROW, dtype=torch.int64, device=device)
        self.value = torch.zeros((groups, m), dtype=torch.float32, device=device)
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._pending_n = 0
        self._flush_at = max(groups * m, 1 << 16)

    def offer(self, group: Tensor, key: Tensor, row: Tensor, value: Tensor) -> None:
        last_key, last_row = self.key[group, -1], self.row[group, -1]
        better = (key < last_key) | ((key == last_key) & (row < last_row))
        n = int(better.sum())
        if n == 0:
            return
        self._pending.append((group[better], key[better], row[better], value[better].float()))
        self._pending_n += n
        if self._pending_n >= self._flush_at:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        group, key, row, value = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_n = [], 0
        touched = torch.bincount(group, minlength=self.groups).nonzero().squeeze(1)
        old_key, old_row, old_value = self.key[touched], self.row[touched], self.value[touched]
        filled = old_row != _NO_ROW
        m = self.m
        all_group = torch.cat([touched.repeat_interleave(m).view(-1, m)[filled], group])
        all_key = torch.cat([old_key[filled], key])
        all_row = torch.cat([old_row[filled], row])
        all_value = torch.cat([old_value[filled], value])
        composite = (all_group << 32) | all_key
        order = torch.argsort(composite, stable=True)
        # Equal (group, key) must end in row order. The stable sort keeps the input's order, table entries first: row
        # order whenever rows are offered in ascending order, as the analysis does. Otherwise sort by row first.
        # (Pruned-in entries that a pending one then beats are dropped here: the merge is over all of them.)
        c, r = composite[order], all_row[order]
        if bool(((c[1:] == c[:-1]) & (r[1:] < r[:-1])).any()):
            order = torch.argsort(all_row, stable=True)
            order = order[torch.argsort(composite[order], stable=True)]
        counts = torch.bincount(all_group, minlength=self.groups)[touched]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(counts)
        keep = rank < m
        self.key[touched] = self.EMPTY_KEY
        self.row[touched] = _NO_ROW
        self.value[touched] = 0
        sel = order[keep]
        g, rk = all_group[sel], rank[keep]
        self.key[g, rk] = all_key[sel]
        self.row[g, rk] = all_row[sel]
        self.value[g, rk] = all_value[sel]

    def filled(self) -> Tensor:
        self.flush()
        return self.row != _NO_ROW


class TopK(GroupedSmallest):
    """The exact top-k rows of each feature by activation, ties to the lower row."""

    def __init__(self, d_sae: int, k: int, device: torch.device | str = "cpu"):
        super().__init__(d_sae, k, device)

    def update(self, features: Tensor, values: Tensor, rows: Tensor) -> None:
        """`values` > 0 (float32): their bit patterns order like the values, so 2**31 - 1 - bits orders them
        strongest first."""
        values = values.float()
        self.offer(features, 0x7FFFFFFF - values.view(torch.int32).to(torch.int64), rows, values)


def sample_keys(seed: int, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A pseudo-random key in [0, 2**31) per (feature, row): splitmix64 of the three, so that a sample depends on the
    seed and the data only, not on batch sizes or the order shards are read in."""
    with np.errstate(over="ignore"):
        x = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (features.astype(np.uint64) << np.uint64(40))
        x ^= np.uint64((seed * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(33)).astype(np.int64)  # 31 bits: GroupedSmallest keys


def equal_width_edges(max_act: np.ndarray, bins: int) -> np.ndarray:
    """[d_sae, bins + 1] float32 edges over [0, max_act] per feature; the last edge is max_act itself."""
    steps = np.arange(bins + 1, dtype=np.float64) / bins
    edges = (max_act.astype(np.float64)[:, None] * steps[None, :]).astype(np.float32)
    edges[:, -1] = max_act
    return edges


def bin_index(values: np.ndarray, features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value among its feature's float32 edges: edges[j] <= v < edges[j+1], the last bin closed."""
    bins = edges.shape[1] - 1
    top = edges[features, -1].astype(np.float64)
    guess = np.floor(values.astype(np.float64) / np.where(top > 0, top, 1.0) * bins)
    b = np.clip(guess, 0, bins - 1).astype(np.int64)
    # The float64 guess can sit one bin off the float32 edges near a boundary; settle it against the stored edges.
    for _ in range(4):
        down = (b > 0) & (values < edges[features, b])
        up = (b < bins - 1) & (values >= edges[features, np.minimum(b + 1, bins)])
        if not (down.any() or up.any()):
            break
        b = b - down + up
    return b


class Binned:
    """Per-feature counts in equal-width bins over [0, max_act]."""

    def __init__(self, max_act: np.ndarray, bins: int):
        self.edges = equal_width_edges(max_act, bins)
        self.counts = np.zeros((len(max_act), bins), dtype=np.int64)

    def add(self, features: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Count the entries in; returns each one's bin."""
        b = bin_index(values, features, self.edges)
        bins = self.counts.shape[1]
        flat = np.bincount(features.astype(np.int64) * bins + b, minlength=self.counts.size)
        self.counts += flat.reshape(self.counts.shape)
        return b


class IntervalSampler:
    """Up to `per_interval` uniform random firing tokens of each equal-width activation interval of each feature."""

    def __init__(self, max_act: np.ndarray, intervals: int, per_interval: int, seed: int):
        self.binned = Binned(max_act, intervals)
        self.seed = seed
        self.table = GroupedSmallest(len(max_act) * intervals, per_interval) if per_interval else None

    def add(self, features: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
        b = self.binned.add(features, values)
        if self.table is None:
            return
        intervals = self.binned.counts.shape[1]
        group = features.astype(np.int64) * intervals + b
        self.table.offer(torch.from_numpy(group), torch.from_numpy(sample_keys(self.seed, features, rows)),
                         torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(values.astype(np.float32)))

    @property
    def edges(self) -> np.ndarray:
        return self.binned.edges

    @property
    def counts(self) -> np.ndarray:
        return self.binned.counts
