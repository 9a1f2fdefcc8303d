"""TaskWriter: one extraction task's shards, written by a thread pool and committed strictly in order.

Per shard: encode to Parquet straight into hidden temp files (ctx, then acts; checksummed (xxh3) as they are written), fsync,
rename ctx then acts, fsync the directory, and finally append the shard to manifest.json, rewritten atomically. The
manifest is the commit point: a restarted task deletes every shard file it does not list and resumes from the cursor
of its last listed shard, so a crash at any moment costs at most the shards in flight.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config.schema import StoreConfig
from pipeline.io import (
    Lease,
    atomic_create_bytes,
    atomic_create_dir,
    atomic_write_json,
    fsync_dir,
    is_tmp_name,
    json_bytes,
    remove_path,
    tmp_is_orphaned,
    tmp_path,
)
from pipeline.io.atomic import host_name, tmp_owner
from pipeline.io.lease import DEFAULT_TIMEOUT_S as DEFAULT_LEASE_TIMEOUT_S

from . import codec
from .layout import (
    DATASET_JSON,
    META_KEYS_FREE_TO_DIFFER,
    MANIFEST_JSON,
    TASKS_DIR,
    TOKENIZER_DIR,
    DatasetMeta,
    Manifest,
    ShardEntry,
    StoreError,
    acts_name,
    ctx_name,
    load_manifest,
    load_meta,
    parse_task_dir_name,
    task_dir_name,
)
from .sink import ChecksumFile

__all__ = ["ShardRows", "ContextRows", "TaskWriter", "WRITE_PHASES"]

log = logging.getLogger(__name__)

# Root-level temp files of another host may belong to a task starting right now; only old ones are litter there.
# (This build writes its root-level files through temp files in its own task directory, which its lease protects.)
_ROOT_TMP_MAX_AGE_S = 3600.0
LEASE_FILE = "lease.json"
# Where a shard is on its way to being committed; `on_phase(name, shard_index)` is called at each.
WRITE_PHASES = ("before_write", "tmp_written", "ctx_renamed", "acts_renamed", "manifest_written")


@dataclass
class ShardRows:
    """The stored tokens of one shard; every field has one entry per row. The writer keeps `acts` until the shard
    is written, so the caller must not modify it after write_shard."""

    context_id: np.ndarray  # int64, global
    pos: np.ndarray  # int32, position in the context (>= 1: BOS is never stored)
    token_id: np.ndarray  # int32
    doc_id: list[str] | np.ndarray
    subset: list[str] | np.ndarray
    acts: torch.Tensor  # [N, d] bfloat16, CPU, contiguous

    def __len__(self) -> int:
        return int(self.acts.shape[0])


@dataclass
class ContextRows:
    """The contexts of one shard, one entry each; token_ids include BOS at index 0."""

    context_id: np.ndarray
    doc_id: list[str]
    subset: list[str]
    doc_start: np.ndarray
    token_ids: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.context_id)


class _Aborted(Exception):
    """A shard not committed because an earlier one failed; the earlier error is the one reported."""


class TaskWriter:
    """Writes and commits one task's shards. Holds the task's lease (pipeline.io.Lease) from construction to close,
    so that a second process on the same task refuses to start instead of deleting this one's uncommitted files.

    `on_commit(entry)` is called after each shard's commit, `on_phase(name, shard_index)` at each of WRITE_PHASES;
    both run in a writer thread."""

    def __init__(self, root: str | Path, meta: DatasetMeta, task_id: int, num_tasks: int, cfg: StoreConfig,
                 save_tokenizer: Callable[[Path], None] | None = None, *,
                 on_commit: Callable[[ShardEntry], None] | None = None,
                 on_phase: Callable[[str, int], None] | None = None,
                 lease: Lease | None = None, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S):
        if not 0 <= task_id < num_tasks:
            raise ValueError(f"task_id {task_id} must be in [0, {num_tasks})")
        if meta.layout not in codec.LAYOUTS:
            raise ValueError(f"unknown activation layout {meta.layout!r} (known: {sorted(codec.LAYOUTS)})")
        self.root = Path(root)
        self.meta = meta
        self.task_id, self.num_tasks = task_id, num_tasks
        self.cfg = cfg
        self.d_model = meta.d_model
        self._on_commit, self._on_phase = on_commit, on_phase
        # Read-only checks first: a dataset this task does not belong to is refused before anything is written.
        check_task_fits(self.root, meta, num_tasks)

        self.task_dir = task_lease_path(self.root, task_id, num_tasks).parent
        self._own_lease = lease is None  # a caller that took the lease earlier (before loading a model) releases it
        if lease is None:
            lease = Lease(task_lease_path(self.root, task_id, num_tasks), what=task_description(self.root, task_id, num_tasks),
                          timeout_s=lease_timeout_s)
            self.task_dir.mkdir(parents=True, exist_ok=True)
            lease.acquire()
        elif lease.holder is None:
            raise ValueError("TaskWriter: the lease passed in is not held")
        self._lease = lease
        try:
            self._open(meta, num_tasks, save_tokenizer)
        except BaseException:
            if self._own_lease:
                self._lease.release()
            raise

        self._pool = ThreadPoolExecutor(cfg.writer_threads, thread_name_prefix=f"store-writer-{task_id}")
        self._in_flight: list[Future] = []
        self._cond = threading.Condition()
        self._next_commit = self.next_shard_index
        self._error: BaseException | None = None
        self._failed_index: int | None = None
        self._error_raised = False
        self._closed = False
        self._local = threading.local()  # per worker thread: a PlaneEncoder with its reusable buffers

    # ---- opening --------------------------------------------------------------------------------------------------

    def _open(self, meta: DatasetMeta, num_tasks: int, save_tokenizer: Callable[[Path], None] | None) -> None:
        """Under the lease: the root-level files (through temp files in this task's directory), then the manifest
        and the clean-up of what an earlier run of this task left uncommitted."""
        path = self.root / DATASET_JSON
        if not path.exists() and atomic_create_bytes(path, json_bytes(meta.to_json_dict()), tmp_dir=self.task_dir):
            log.info("created %s", path)
        check_task_fits(self.root, meta, num_tasks)  # again: another task may have created dataset.json meanwhile
        if save_tokenizer is not None and not (self.root / TOKENIZER_DIR).exists():
            if atomic_create_dir(self.root / TOKENIZER_DIR, save_tokenizer, tmp_dir=self.task_dir):
                log.info("saved the tokenizer to %s", self.root / TOKENIZER_DIR)
        self._remove_old_root_temps()
        self.manifest_path = self.task_dir / MANIFEST_JSON
        self.manifest = self._load_or_new_manifest()
        self._check_listed_files()
        self._remove_orphans()
        self.resume_cursor: dict | None = self.manifest.cursor if self.manifest.shards else None
        self.complete: bool = self.manifest.complete
        self.next_shard_index: int = len(self.manifest.shards)
        self.committed_rows: int = self.manifest.rows

    @property
    def pending_shards(self) -> int:
        """Shards queued or being written, not yet committed."""
        return sum(not f.done() for f in self._in_flight)

    def _remove_old_root_temps(self) -> None:
        """Root-level temp files whose writer is gone from this host, or that are older than an hour (other hosts)."""
        now = time.time()
        for entry in self.root.iterdir():
            if is_tmp_name(entry.name):
                try:
                    if tmp_is_orphaned(entry.name) or now - entry.lstat().st_mtime > _ROOT_TMP_MAX_AGE_S:
                        remove_path(entry)
                except FileNotFoundError:
                    pass

    def _load_or_new_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            return Manifest(task_id=self.task_id, num_tasks=self.num_tasks)
        manifest = load_manifest(self.manifest_path)
        if (manifest.task_id, manifest.num_tasks) != (self.task_id, self.num_tasks):
            raise StoreError(f"{self.manifest_path}: belongs to task {manifest.task_id} of {manifest.num_tasks}, "
                             f"not {self.task_id} of {self.num_tasks}")
        return manifest

    def _check_listed_files(self) -> None:
        """A committed shard that is missing or has the wrong size cannot be resumed around: stop, naming it."""
        for entry in self.manifest.shards:
            for name, size in ((entry.acts_file, entry.acts_bytes), (entry.ctx_file, entry.ctx_bytes)):
                path = self.task_dir / name
                try:
                    actual = path.stat().st_size
                except FileNotFoundError:
                    raise StoreError(f"{path}: listed in {self.manifest_path.name} but missing") from None
                if actual != size:
                    raise StoreError(f"{path}: {actual} bytes, but {self.manifest_path.name} lists {size} (truncated or overwritten)")

    def _remove_orphans(self) -> None:
        """Delete temp files and shard files the manifest does not list (left by a crash before their commit)."""
        listed = {f for e in self.manifest.shards for f in (e.acts_file, e.ctx_file)}
        removed = []
        for entry in self.task_dir.iterdir():
            name = entry.name
            orphan_shard = name.endswith(".parquet") and name.startswith(("acts-", "ctx-")) and name not in listed
            if (is_tmp_name(name) and not _own_tmp(name)) or orphan_shard:
                remove_path(entry)
                removed.append(name)
        if removed:
            fsync_dir(self.task_dir)
            log.warning("%s: removed %d uncommitted file(s) from an earlier run: %s", self.task_dir, len(removed), ", ".join(sorted(removed)))

    # ---- writing --------------------------------------------------------------------------------------------------

    def write_shard(self, rows: ShardRows, contexts: ContextRows, cursor: dict, skips: dict[str, int]) -> None:
        """Queue one shard; returns at once unless cfg.max_pending_shards are already in flight."""
        self._check_open()
        self._raise_pending_error()
        self._validate(rows, contexts)
        cursor = _plain_json(cursor)  # a private copy, and unserialisable input fails here, in the caller
        skips = {str(k): int(v) for k, v in skips.items()}
        index = self.next_shard_index
        while len(self._in_flight) >= self.cfg.max_pending_shards:
            wait(self._in_flight, return_when=FIRST_COMPLETED)
            self._prune_done()
            self._raise_pending_error()
        self._in_flight.append(self._pool.submit(self._write_and_commit, index, rows, contexts, cursor, skips))
        self.next_shard_index = index + 1

    def finish(self, skips: dict[str, int], stats: dict) -> dict:
        """Wait for every shard, mark the task complete and return the manifest (as a dict)."""
        self._check_open()
        self._drain()
        self._raise_pending_error()
        with self._cond:
            self._lease.check()
            self.manifest.complete = True
            self.manifest.skips = {str(k): int(v) for k, v in skips.items()}
            self.manifest.stats = _plain_json(stats)
            atomic_write_json(self.manifest_path, self.manifest.model_dump(mode="json"))
        self.complete = True
        self._shutdown()
        return self.manifest.model_dump(mode="json")

    def close(self, raise_errors: bool = False) -> None:
        """Wait for the shards in flight without marking the task complete (error paths). A worker's error not yet
        raised is logged, or raised with raise_errors=True."""
        if self._closed:
            return
        self._drain()
        self._shutdown()
        if self._error is not None and not self._error_raised:
            if raise_errors:
                self._error_raised = True
                raise self._error
            log.error("store writer: a shard failed while closing: %s", self._error)

    def __enter__(self) -> "TaskWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TaskWriter is closed")

    def _validate(self, rows: ShardRows, contexts: ContextRows) -> None:
        acts = rows.acts
        n = len(rows)
        if acts.dtype != torch.bfloat16 or acts.dim() != 2 or acts.shape[1] != self.d_model:
            raise ValueError(f"acts must be bfloat16 [N, {self.d_model}], got {acts.dtype} {list(acts.shape)}")
        if acts.device.type != "cpu" or not acts.is_contiguous():
            raise ValueError("acts must be a contiguous CPU tensor")
        for name in ("context_id", "pos", "token_id", "doc_id", "subset"):
            if len(getattr(rows, name)) != n:
                raise ValueError(f"ShardRows.{name} has {len(getattr(rows, name))} entries for {n} rows")
        for name in ("doc_id", "subset", "doc_start", "token_ids"):
            if len(getattr(contexts, name)) != len(contexts):
                raise ValueError(f"ContextRows.{name} has {len(getattr(contexts, name))} entries for {len(contexts)} contexts")
        if n and int(np.min(rows.pos)) < 1:
            raise ValueError("ShardRows.pos must be >= 1 (position 0 is BOS and never stored)")
        missing = np.setdiff1d(np.unique(np.asarray(rows.context_id)), np.asarray(contexts.context_id))
        if missing.size:
            raise ValueError(f"rows refer to context_id {int(missing[0])}, which is not among the shard's contexts")

    def _prune_done(self) -> None:
        self._in_flight = [f for f in self._in_flight if not f.done()]

    def _drain(self) -> None:
        if self._in_flight:
            wait(self._in_flight)
        self._in_flight = []

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise self._error

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        if self._own_lease:
            self._lease.release()
        self._closed = True

    # ---- in the pool ----------------------------------------------------------------------------------------------

    def _write_and_commit(self, index: int, rows: ShardRows, contexts: ContextRows, cursor: dict, skips: dict) -> None:
        acts_final, ctx_final = self.task_dir / acts_name(index), self.task_dir / ctx_name(index)
        acts_tmp, ctx_tmp = tmp_path(acts_final), tmp_path(ctx_final)
        try:
            self._phase("before_write", index)
            ctx_bytes, ctx_digest = self._write_ctx(ctx_tmp, contexts)
            acts_bytes, acts_digest, row_groups = self._write_acts(acts_tmp, rows)
            self._phase("tmp_written", index)
            os.replace(ctx_tmp, ctx_final)
            self._phase("ctx_renamed", index)
            os.replace(acts_tmp, acts_final)
            fsync_dir(self.task_dir)
            self._phase("acts_renamed", index)
        except BaseException as err:
            for p in (acts_tmp, ctx_tmp):
                p.unlink(missing_ok=True)
            self._fail(err, index)
            raise
        cids = np.asarray(contexts.context_id)
        entry = ShardEntry(
            index=index, acts_file=acts_final.name, ctx_file=ctx_final.name, rows=len(rows), contexts=len(contexts),
            acts_bytes=acts_bytes, ctx_bytes=ctx_bytes, acts_xxh3=acts_digest, ctx_xxh3=ctx_digest,
            first_context_id=int(cids[0]) if cids.size else None, last_context_id=int(cids[-1]) if cids.size else None,
            row_groups=row_groups,
        )
        with self._cond:
            while self._next_commit != index and not self._earlier_failed(index):
                self._cond.wait()
            if self._earlier_failed(index):
                for p in (acts_final, ctx_final):  # never to be listed: don't leave them for a restart to clean
                    p.unlink(missing_ok=True)
                raise _Aborted(f"shard {index} not committed: an earlier shard failed")
            try:
                self._lease.check()
                self.manifest.add(entry)
                self.manifest.cursor = cursor
                self.manifest.skips = skips
                self.manifest.complete = False
                atomic_write_json(self.manifest_path, self.manifest.model_dump(mode="json"))
            except BaseException as err:
                self._fail(err, index)
                raise
            self._next_commit = index + 1
            self.committed_rows = self.manifest.rows
            self._cond.notify_all()
        self._phase("manifest_written", index)
        if self._on_commit is not None:
            self._on_commit(entry)

    def _phase(self, name: str, index: int) -> None:
        if self._on_phase is not None:
            self._on_phase(name, index)

    def _fail(self, err: BaseException, index: int) -> None:
        """Record a shard's failure: shards before it still commit, shards after it never do."""
        with self._cond:
            if self._error is None:
                self._error = err
            if self._failed_index is None or index < self._failed_index:
                self._failed_index = index
            self._cond.notify_all()

    def _earlier_failed(self, index: int) -> bool:
        return self._failed_index is not None and self._failed_index < index

    def _encoder(self) -> codec.PlaneEncoder:
        enc = getattr(self._local, "encoder", None)
        if enc is None:
            enc = self._local.encoder = codec.PlaneEncoder(self.d_model, self.cfg.row_group_rows)
        return enc

    def _write_acts(self, path: Path, rows: ShardRows) -> tuple[int, str, list[int]]:
        n, d, group = len(rows), self.d_model, self.cfg.row_group_rows
        bits = rows.acts.view(torch.int16).numpy().view(np.uint16)
        meta_arrays = [
            pa.array(np.asarray(rows.context_id, dtype=np.int64)),
            pa.array(np.asarray(rows.pos, dtype=np.int32)),
            pa.array(np.asarray(rows.token_id, dtype=np.int32)),
            _dictionary(rows.doc_id),
            _dictionary(rows.subset),
        ]
        schema = codec.acts_schema(d)
        encoder = self._encoder()
        row_groups = []
        sink = ChecksumFile(path)
        try:
            with pq.ParquetWriter(sink, schema, **codec.acts_write_options(self.cfg.zstd_level, group)) as pw:
                for start in range(0, n, group):
                    m = min(group, n - start)
                    hi, lo = encoder.encode(bits[start : start + m])
                    table = pa.Table.from_arrays([a.slice(start, m) for a in meta_arrays] + [hi, lo], schema=schema)
                    pw.write_table(table, row_group_size=group)
                    row_groups.append(m)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        return sink.size, sink.digest(), row_groups

    def _write_ctx(self, path: Path, contexts: ContextRows) -> tuple[int, str]:
        lengths = np.array([len(t) for t in contexts.token_ids], dtype=np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in contexts.token_ids]) if len(lengths) else np.empty(0, np.int32)
        table = pa.Table.from_arrays(
            [
                pa.array(np.asarray(contexts.context_id, dtype=np.int64)),
                pa.array(list(contexts.doc_id), pa.string()),
                pa.array(list(contexts.subset), pa.string()),
                pa.array(np.asarray(contexts.doc_start, dtype=np.int32)),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            ],
            schema=codec.CTX_SCHEMA,
        )
        sink = ChecksumFile(path)
        try:
            pq.write_table(table, sink, **codec.ctx_write_options(self.cfg.zstd_level))
            sink.finish()
        except BaseException:
            sink.abort()
            raise
        return sink.size, sink.digest()


def _plain_json(obj):
    """A deep copy made of JSON types only; numpy scalars become Python numbers, anything else is a TypeError."""

    def convert(value):
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return json.loads(json.dumps(obj, default=convert))


def _dictionary(values) -> pa.DictionaryArray:
    arr = pa.array(values if isinstance(values, np.ndarray) else list(values), pa.string())
    return arr.dictionary_encode()


def task_lease_path(root: str | Path, task_id: int, num_tasks: int) -> Path:
    return Path(root) / TASKS_DIR / task_dir_name(task_id, num_tasks) / LEASE_FILE


def task_description(root: str | Path, task_id: int, num_tasks: int) -> str:
    return f"extraction task {task_id} of {num_tasks} of {root}"


def _own_tmp(name: str) -> bool:
    owner = tmp_owner(name)
    return owner is not None and owner == (host_name(), os.getpid())


def check_task_fits(root: Path, meta: DatasetMeta, num_tasks: int) -> None:
    """Refuse (StoreError) a task whose metadata or partitioning differs from the dataset at `root`, if there is one.
    Reads only; every differing key is named with both values in full."""
    path = root / DATASET_JSON
    if path.exists():
        stored = load_meta(path)
        diff = meta_differences(stored, meta)
        if diff:
            details = "; ".join(f"{k}: stored {v_stored} vs this task's {v_mine}" for k, v_stored, v_mine in diff)
            raise StoreError(f"{path}: this task's dataset metadata differs from the stored one: {details}")
        declared = stored.partitioning.get("num_tasks")
        if declared is not None and declared != num_tasks:
            raise StoreError(f"{path}: partitioning.num_tasks is {declared}, but this task is one of {num_tasks}")
    tasks = root / TASKS_DIR
    if tasks.is_dir():
        for entry in tasks.iterdir():
            parsed = parse_task_dir_name(entry.name)
            if parsed and parsed[1] != num_tasks:
                raise StoreError(f"{entry}: the dataset is split into {parsed[1]} tasks, but this task is one of {num_tasks}")


def meta_differences(stored: DatasetMeta, mine: DatasetMeta) -> list[tuple[str, str, str]]:
    """(dotted key, stored value, this value) for every leaf that differs, values as full JSON."""
    a, b = stored.model_dump(mode="json"), mine.model_dump(mode="json")
    out: list[tuple[str, str, str]] = []

    def walk(x, y, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif x != y:
            out.append((key, json.dumps(x, sort_keys=True), json.dumps(y, sort_keys=True)))

    walk({k: v for k, v in a.items() if k not in META_KEYS_FREE_TO_DIFFER},
         {k: v for k, v in b.items() if k not in META_KEYS_FREE_TO_DIFFER}, "")
    return out
