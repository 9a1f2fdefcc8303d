"""BatchIterator: shuffled, rank-partitioned, exactly resumable batches of activations.

Order. The units are the (shard, row group) pairs of the selected shards. Epoch e permutes all units with an RNG
seeded by (seed, e), the same on every rank, and rank r takes units perm[r::world_size]: the ranks' rows are disjoint
and together are every row. A rank reads its units in windows of `window_row_groups` (row groups of several shards),
permutes each window's rows with an RNG seeded by (seed, e, r, window), and concatenates the windows into its epoch
stream; batch k is rows [k*B, (k+1)*B) of that stream, so a batch may span two windows. Rows after the last whole batch
are dropped; with equal_batches every rank yields the same number of batches per epoch (DDP collectives need that),
the smallest any rank can fill.

Position. (epoch, offset in the epoch stream) is all the state there is: restoring it reads the one window that holds
the offset and goes on from there, yielding exactly what an uninterrupted iterator would have.

Speed. A background thread assembles batches (gather of the permuted rows, cast to the output dtype) while a second
one reads and decodes the next window, so the consumer only dequeues finished tensors.
"""
from __future__ import annotations

import bisect
import os
import queue
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .files import ParquetCache, read_row_group_acts
from .layout import ShardInfo, StoreError

STATE_VERSION = 1
READER_NICE = 10  # nice value of the reader threads (the process default is 0)
_STATE_KEYS = ("batch_size", "seed", "rank", "world_size", "shuffle", "window_row_groups", "equal_batches", "units", "units_crc32")


class BatchSizeError(StoreError):
    """The batch is larger than what one rank's share of the selected shards holds in an epoch."""


@dataclass(frozen=True)
class _Unit:
    shard: int
    group: int
    rows: int


@dataclass(frozen=True)
class _EpochPlan:
    windows: list[list[_Unit]]
    starts: list[int]  # stream offset of each window's first row
    batches: int  # batches this rank yields in the epoch

    def window_at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1


@dataclass
class _Item:
    batch: torch.Tensor
    epoch: int  # the position after this batch
    offset: int


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Schedule:
    """Everything about the order, and the producer that follows it. The background thread holds this object, never the
    BatchIterator, so an iterator dropped mid-epoch is collected and its __del__ stops the thread."""

    def __init__(self, shard_infos: Sequence[ShardInfo], d_model: int, units: list[_Unit], batch_size: int, seed: int, rank: int, world_size: int,
                 dtype: torch.dtype, shuffle: bool, window_row_groups: int, loop: bool, equal_batches: bool, pin_memory: bool):
        self.shards = shard_infos
        self.d_model = d_model
        self.units = units
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.dtype, self.shuffle, self.window_row_groups = dtype, shuffle, window_row_groups
        self.loop, self.equal_batches, self.pin_memory = loop, equal_batches, pin_memory
        self._plans: dict[int, _EpochPlan] = {}
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> _EpochPlan:
        with self._lock:
            plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        order = list(range(len(self.units)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units)).tolist()
        per_rank = [[self.units[i] for i in order[r :: self.world_size]] for r in range(self.world_size)]
        mine = per_rank[self.rank]
        windows = [mine[i : i + self.window_row_groups] for i in range(0, len(mine), self.window_row_groups)]
        starts = np.cumsum([0] + [sum(u.rows for u in w) for w in windows]).tolist()
        rank_rows = [sum(u.rows for u in units) for units in per_rank]
        usable = min(rank_rows) if self.equal_batches else rank_rows[self.rank]
        plan = _EpochPlan(windows, starts[:-1], usable // self.batch_size)
        with self._lock:  # the producer and the window reader may be one epoch apart: keep two
            self._plans[epoch] = plan
            for old in sorted(self._plans)[:-2]:
                del self._plans[old]
        return plan

    def epoch_end(self, epoch: int) -> int:
        return self.plan(epoch).batches * self.batch_size

    # ---- in the background thread ---------------------------------------------------------------------------------

    def produce(self, epoch: int, offset: int, stop: threading.Event, out: queue.Queue) -> None:
        _lower_priority()
        reader = ThreadPoolExecutor(1, thread_name_prefix="store-window", initializer=_lower_priority)
        files = ParquetCache()
        try:
            for item in self._stream(epoch, offset, reader, files):
                if not _put(out, item, stop):
                    return
            _put(out, _End(), stop)
        except BaseException as err:  # handed to the consumer, raised by __next__
            _put(out, _Failure(err), stop)
        finally:
            reader.shutdown(wait=True, cancel_futures=True)
            files.close()

    def _windows_from(self, epoch: int, window: int) -> Iterator[tuple[int, int]]:
        """(epoch, window) in stream order from a start, across epochs when looping; only windows whose rows end up
        in batches."""
        while True:
            plan, end = self.plan(epoch), self.epoch_end(epoch)
            while window < len(plan.windows) and plan.starts[window] < end:
                yield epoch, window
                window += 1
            if not self.loop:
                return
            epoch, window = epoch + 1, 0

    def _stream(self, epoch: int, offset: int, reader: ThreadPoolExecutor, files: ParquetCache) -> Iterator[_Item]:
        if offset >= self.epoch_end(epoch):  # a position at the very end of an epoch
            if not self.loop:
                return
            epoch, offset = epoch + 1, 0
        # two window buffers: one being cut into batches, one being filled by the reader (batches are copies)
        buffers = [self._new_buffer(), self._new_buffer()]
        schedule = self._windows_from(epoch, self.plan(epoch).window_at(offset))
        nxt = next(schedule, None)
        pending: Future | None = reader.submit(self._load_window, *nxt, buffers[0], files) if nxt else None
        slot = 0
        pieces: list[torch.Tensor] = []
        need = self.batch_size
        while pending is not None:
            win_epoch, win_index, rows, perm = pending.result()
            nxt = next(schedule, None)
            slot ^= 1
            pending = reader.submit(self._load_window, *nxt, buffers[slot], files) if nxt else None
            if win_epoch != epoch:
                epoch, offset = win_epoch, 0
            start, end = self.plan(epoch).starts[win_index], self.epoch_end(epoch)
            local = offset - start
            stop_at = min(len(perm), end - start)
            while local < stop_at:
                take = min(need, stop_at - local)
                pieces.append(rows.index_select(0, perm[local : local + take]))
                local += take
                need -= take
                if need == 0:
                    batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                    if self.dtype != torch.bfloat16:
                        batch = batch.to(self.dtype)
                    if self.pin_memory:
                        batch = batch.pin_memory()
                    pieces, need = [], self.batch_size
                    pos = start + local
                    yield _Item(batch, *((epoch, pos) if pos < end else (epoch + 1, 0)))
            offset = start + local

    def _new_buffer(self) -> np.ndarray:
        biggest = max((u.rows for u in self.units), default=0)
        return np.empty((biggest * self.window_row_groups, self.d_model), np.uint16)

    def _load_window(self, epoch: int, window: int, buffer: np.ndarray, files: ParquetCache):
        row = 0
        for unit in self.plan(epoch).windows[window]:
            info = self.shards[unit.shard]
            row += read_row_group_acts(files, info.acts_path, unit.group, buffer[row:], self.d_model, unit.rows)
        rows = torch.from_numpy(buffer[:row].view(np.int16)).view(torch.bfloat16)
        if self.shuffle:
            perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, self.rank, window]).permutation(row))
        else:
            perm = torch.arange(row)
        return epoch, window, rows, perm


class BatchIterator:
    """Iterator of [batch_size, d_model] tensors of `dtype`, contiguous; see the module docstring for the order."""

    def __init__(self, shard_infos: Sequence[ShardInfo], d_model: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, shards: Sequence[int] | None = None, shuffle: bool = True,
                 window_row_groups: int = 8, loop: bool = True, equal_batches: bool = True, prefetch_batches: int = 4,
                 pin_memory: bool = False):
        if batch_size <= 0 or window_row_groups <= 0 or prefetch_batches <= 0:
            raise ValueError("batch_size, window_row_groups and prefetch_batches must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        n_shards = len(shard_infos)
        selected = list(range(n_shards)) if shards is None else [int(s) for s in shards]
        if len(set(selected)) != len(selected) or any(not 0 <= s < n_shards for s in selected):
            raise ValueError(f"shards must be distinct indices in [0, {n_shards})")
        units = [_Unit(s, g, n) for s in selected for g, n in enumerate(shard_infos[s].row_groups) if n > 0]
        self._schedule = _Schedule(shard_infos, d_model, units, batch_size, seed, rank, world_size, dtype, shuffle, window_row_groups, loop,
                                   equal_batches, pin_memory and torch.cuda.is_available())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.dtype, self.shuffle, self.window_row_groups = dtype, shuffle, window_row_groups
        self.loop, self.equal_batches, self.prefetch_batches = loop, equal_batches, prefetch_batches
        self.shards = selected
        self._units_digest = zlib.crc32(np.array([(u.shard, u.group, u.rows) for u in units], dtype=np.int64).tobytes())
        self.batches_per_epoch = self._schedule.plan(0).batches
        if self.batches_per_epoch == 0:
            rows = sum(u.rows for w in self._schedule.plan(0).windows for u in w)
            raise BatchSizeError(f"batch_size {batch_size} is more than rank {rank} of {world_size} gets in an epoch ({rows} rows)")
        self.epoch = 0
        self.offset = 0  # rows of this epoch's stream already yielded
        self.rows_seen = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._finished = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, (_Failure, _End)):
            self._finished = True
            self._halt()
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        self.epoch, self.offset = item.epoch, item.offset
        self.rows_seen += item.batch.shape[0]
        return item.batch

    def state_dict(self) -> dict:
        """The position after the last batch returned, plus what must match on restore; JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "offset": self.offset,
            "rows_seen": self.rows_seen,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "window_row_groups": self.window_row_groups,
            "equal_batches": self.equal_batches,
            "units": len(self._schedule.units),
            "units_crc32": self._units_digest,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batches are exactly those an uninterrupted iterator would yield."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise StoreError(f"batch iterator state: version {state.get('version')!r} is not {STATE_VERSION}")
        for key in _STATE_KEYS:
            if state.get(key) != mine[key]:
                what = "the selected shards differ" if key.startswith("units") else f"{state.get(key)!r} vs this iterator's {mine[key]!r}"
                raise StoreError(f"batch iterator state: {key} does not match ({what})")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self._schedule.epoch_end(epoch) or offset % self.batch_size:
            raise StoreError(f"batch iterator state: epoch {epoch} offset {offset} is not a batch boundary")
        self._halt()
        self.epoch, self.offset, self.rows_seen = epoch, offset, int(state["rows_seen"])
        self._finished = False

    def close(self) -> None:
        """Stop the background threads (they also stop when the iterator is garbage-collected)."""
        self._halt()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()  # no join here: the collector may run in any thread

    # testing and tooling look at the plan
    def _plan(self, epoch: int) -> _EpochPlan:
        return self._schedule.plan(epoch)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch_batches)
        self._thread = threading.Thread(target=self._schedule.produce, args=(self.epoch, self.offset, self._stop, self._queue),
                                        name="store-batches", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting to put
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _lower_priority() -> None:
    """Run this thread (on Linux a thread has its own nice value) behind the training threads: prefetching has slack,
    and a reader thread that preempts one of the BLAS threads stalls the whole GEMM at its next barrier."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
