"""ActivationDataset: a validated, read-only view of a dataset root.

Only shards listed in the task manifests exist for the reader. The global row index is the concatenation of the
shards in (task, shard index) order, which is also the sorted order of `tasks/*/acts-*.parquet`.
"""
from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash

from . import codec
from .files import ParquetCache, read_row_group_acts
from .layout import (
    DATASET_JSON,
    MANIFEST_JSON,
    TASKS_DIR,
    TOKENIZER_DIR,
    DatasetMeta,
    Manifest,
    ShardEntry,
    ShardInfo,
    StoreError,
    load_manifest,
    load_meta,
    one_line,
    parse_task_dir_name,
    task_dir_name,
)
from .lookup import Lookup, make_lookup
from .shuffle import BatchIterator

__all__ = ["ActivationDataset", "ShardInfo", "StoreError", "Lookup"]

log = logging.getLogger(__name__)

_CHECKSUM_CHUNK = 16 << 20


class ActivationDataset:
    def __init__(self, root: Path, meta: DatasetMeta, shards: list[ShardInfo], manifests: dict[int, Manifest],
                 incomplete: list[str] | None = None):
        self.root = root
        self.incomplete = incomplete or []  # why the dataset is not complete (tasks missing or unfinished)
        self.meta = meta
        self.d_model = meta.d_model
        self.shards = shards
        self.manifests = manifests
        self.num_shards = len(shards)
        self.num_rows = sum(s.rows for s in shards)
        self._offsets = [s.row_offset for s in shards]
        self._lock = threading.Lock()
        self._files = ParquetCache()
        self._meta_cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._ctx_cache: OrderedDict[int, tuple[dict[int, int], pa.Table]] = OrderedDict()
        self._tokenizer = None

    # ---- opening --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, *, expected_d_model: int | None = None, verify: bool = False,
             require_complete: bool = False) -> "ActivationDataset":
        root = Path(root)
        meta_path = root / DATASET_JSON
        meta = load_meta(meta_path)
        if meta.layout not in codec.LAYOUTS:
            raise StoreError(f"{meta_path}: activation layout {meta.layout!r} is unknown to this build (known: {', '.join(sorted(codec.LAYOUTS))})")
        if meta.dtype != "bfloat16":
            raise StoreError(f"{meta_path}: storage dtype {meta.dtype!r} is not supported (bfloat16 only)")
        if expected_d_model is not None and expected_d_model != meta.d_model:
            raise StoreError(f"{meta_path}: d_model is {meta.d_model}, but {expected_d_model} was expected")

        manifests, problems = _load_manifests(root, meta)
        if problems:
            message = f"{root / TASKS_DIR}: incomplete dataset: " + "; ".join(problems)
            if require_complete:
                raise StoreError(message)
            log.warning("%s", message)

        acts_schema = codec.acts_schema(meta.d_model)
        shards: list[ShardInfo] = []
        offset = 0
        for task_id in sorted(manifests):
            task_dir = root / TASKS_DIR / task_dir_name(task_id, manifests[task_id].num_tasks)
            for entry in manifests[task_id].shards:
                info = _shard_info(task_id, task_dir, entry, offset)
                _check_shard(info, entry, acts_schema, verify)
                shards.append(info)
                offset += info.rows
        return cls(root, meta, shards, manifests, problems)

    # ---- reading --------------------------------------------------------------------------------------------------

    def read_acts(self, shard: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The whole shard's activations, contiguous [rows, d_model]."""
        info = self.shards[shard]
        bits = np.empty((info.rows, self.d_model), np.uint16)
        with self._lock:
            row = 0
            for group, rows in enumerate(info.row_groups):
                row += read_row_group_acts(self._files, info.acts_path, group, bits[row:], self.d_model, rows)
        acts = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        return acts if dtype == torch.bfloat16 else acts.to(dtype)

    def read_metadata(self, shard: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """The metadata columns (no activations) of one shard, or of all shards concatenated in row order."""
        columns = list(columns) if columns is not None else list(codec.META_COLUMNS)
        unknown = [c for c in columns if c not in codec.META_COLUMNS]
        if unknown:
            raise ValueError(f"unknown metadata column(s) {unknown}; known: {codec.META_COLUMNS}")
        if shard is not None:
            return self._read_table(self.shards[shard].acts_path, columns)
        if not self.shards:
            return codec.acts_schema(self.d_model).empty_table().select(columns)
        return pa.concat_tables([self._read_table(s.acts_path, columns) for s in self.shards])

    def read_contexts(self, shard: int) -> pa.Table:
        return self._read_table(self.shards[shard].ctx_path, None)

    def locate(self, row: int) -> tuple[int, int]:
        """(shard, row within the shard) of a global row index."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} out of range [0, {self.num_rows})")
        shard = bisect.bisect_right(self._offsets, row) - 1
        while self.shards[shard].rows == 0 or row - self._offsets[shard] >= self.shards[shard].rows:
            shard += 1  # skip empty shards sharing an offset
        return shard, row - self._offsets[shard]

    def lookup(self, row: int, *, context_tokens: int | None = None) -> Lookup:
        """The token behind a global row, decoded in its context (the whole context, or `context_tokens` each side)."""
        shard, local = self.locate(row)
        info = self.shards[shard]
        meta = self._shard_metadata(shard)
        context_id = meta.column("context_id")[local].as_py()
        pos = meta.column("pos")[local].as_py()
        token_id = meta.column("token_id")[local].as_py()
        index, ctx = self._shard_contexts(shard)
        if context_id not in index:
            raise StoreError(f"{info.ctx_path}: context {context_id} (row {row}) is missing")
        token_ids = ctx.column("token_ids")[index[context_id]].values.to_numpy().tolist()
        if not 0 < pos < len(token_ids) or token_ids[pos] != token_id:
            raise StoreError(f"{info.ctx_path}: context {context_id} disagrees with {info.acts_path.name} at pos {pos} (row {row})")
        tok = self.tokenizer
        return make_lookup(row, context_id, pos, token_ids, meta.column("doc_id")[local].as_py(),
                           meta.column("subset")[local].as_py(), tok.decode, context_tokens)

    @property
    def tokenizer(self):
        """The dataset's tokenizer (ROOT/tokenizer), loaded on first use."""
        with self._lock:
            if self._tokenizer is None:
                path = self.root / TOKENIZER_DIR
                if not path.is_dir():
                    raise StoreError(f"{path}: missing; the tokenizer is needed to decode tokens")
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(str(path))
                except (OSError, ValueError) as err:
                    raise StoreError(f"{path}: cannot load the tokenizer: {one_line(err)}") from None
            return self._tokenizer

    def batches(self, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                shards: Sequence[int] | None = None, shuffle: bool = True, window_row_groups: int = 8, loop: bool = True,
                equal_batches: bool = True, prefetch_batches: int = 4, pin_memory: bool = False) -> BatchIterator:
        """Shuffled [batch_size, d_model] batches; see shuffle.py for the order and the resumable position."""
        return BatchIterator(self.shards, self.d_model, batch_size, seed=seed, rank=rank, world_size=world_size, dtype=dtype, shards=shards,
                             shuffle=shuffle, window_row_groups=window_row_groups, loop=loop, equal_batches=equal_batches,
                             prefetch_batches=prefetch_batches, pin_memory=pin_memory)

    def checksum_problem(self, shard: int) -> str | None:
        """None if both files of the shard match the xxh3 checksums their manifest lists, else what differs."""
        info = self.shards[shard]
        for path, digest in ((info.acts_path, info.acts_xxh3), (info.ctx_path, info.ctx_xxh3)):
            try:
                got = _xxh3_file(path)
            except OSError as err:
                return f"{path}: unreadable: {one_line(err)}"
            if got != digest:
                return f"{path}: xxh3 checksum {got} differs from the manifest's {digest} (corrupt)"
        return None

    def verify(self, shards: Sequence[int] | None = None, *, progress: bool = False) -> list[str]:
        """Check the checksums of the given shards (default all); returns the problems found, one line each."""
        from tqdm import tqdm

        selected = list(range(self.num_shards)) if shards is None else list(shards)
        total = sum(self.shards[i].acts_bytes + self.shards[i].ctx_bytes for i in selected)
        problems = []
        # delay: a store read in a second or two shows no bar at all
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress, delay=2.0) as bar:
            for i in selected:
                problem = self.checksum_problem(i)
                if problem is not None:
                    problems.append(problem)
                bar.update(self.shards[i].acts_bytes + self.shards[i].ctx_bytes)
        return problems

    def close(self) -> None:
        with self._lock:
            self._files.close()

    # ---- helpers --------------------------------------------------------------------------------------------------

    def _read_table(self, path: Path, columns: list[str] | None) -> pa.Table:
        try:
            return pq.read_table(path, columns=columns, use_threads=False)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: unreadable: {one_line(err)}") from None

    def _shard_metadata(self, shard: int) -> pa.Table:
        with self._lock:
            table = self._meta_cache.get(shard)
        if table is None:
            table = self._read_table(self.shards[shard].acts_path, list(codec.META_COLUMNS))
            with self._lock:
                _remember(self._meta_cache, shard, table)
        return table

    def _shard_contexts(self, shard: int) -> tuple[dict[int, int], pa.Table]:
        with self._lock:
            hit = self._ctx_cache.get(shard)
        if hit is None:
            table = self.read_contexts(shard)
            hit = ({int(c): i for i, c in enumerate(table.column("context_id").to_numpy())}, table)
            with self._lock:
                _remember(self._ctx_cache, shard, hit)
        return hit


def _remember(cache: OrderedDict, key, value, capacity: int = 4) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > capacity:
        cache.popitem(last=False)


def _load_manifests(root: Path, meta: DatasetMeta) -> tuple[dict[int, Manifest], list[str]]:
    """Every task's manifest, and what makes the dataset incomplete (missing tasks or manifests, unfinished tasks)."""
    tasks_dir = root / TASKS_DIR
    found: dict[int, tuple[int, Path]] = {}
    if tasks_dir.is_dir():
        for entry in sorted(tasks_dir.iterdir()):
            parsed = parse_task_dir_name(entry.name)
            if parsed and entry.is_dir():
                found[parsed[0]] = (parsed[1], entry)
    counts = {n for n, _ in found.values()}
    declared = meta.partitioning.get("num_tasks")
    if declared is not None:
        counts.add(int(declared))
    if len(counts) > 1:
        raise StoreError(f"{tasks_dir}: task directories disagree on the number of tasks ({sorted(counts)})")
    num_tasks = counts.pop() if counts else 0
    manifests: dict[int, Manifest] = {}
    problems: list[str] = []
    missing = [t for t in range(num_tasks) if t not in found]
    if missing:
        problems.append(f"no directory for task(s) {_ranges(missing)} of {num_tasks}")
    for task_id, (n, task_dir) in sorted(found.items()):
        path = task_dir / MANIFEST_JSON
        if task_id >= n:
            raise StoreError(f"{task_dir}: task id {task_id} is out of range for {n} tasks")
        if not path.exists():
            problems.append(f"{task_dir.name} has no {MANIFEST_JSON} yet")
            continue
        manifest = load_manifest(path)
        if (manifest.task_id, manifest.num_tasks) != (task_id, n):
            raise StoreError(f"{path}: says task {manifest.task_id} of {manifest.num_tasks}, but lives in {task_dir.name}")
        if not manifest.complete:
            problems.append(f"{task_dir.name} is not complete ({len(manifest.shards)} shards so far)")
        manifests[task_id] = manifest
    return manifests, problems


def _ranges(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def _shard_info(task_id: int, task_dir: Path, entry: ShardEntry, offset: int) -> ShardInfo:
    return ShardInfo(task_id=task_id, index=entry.index, acts_path=task_dir / entry.acts_file, ctx_path=task_dir / entry.ctx_file,
                     rows=entry.rows, contexts=entry.contexts, row_groups=tuple(entry.row_groups), row_offset=offset,
                     acts_bytes=entry.acts_bytes, ctx_bytes=entry.ctx_bytes, acts_xxh3=entry.acts_xxh3, ctx_xxh3=entry.ctx_xxh3,
                     first_context_id=entry.first_context_id, last_context_id=entry.last_context_id)


def _check_shard(info: ShardInfo, entry: ShardEntry, acts_schema: pa.Schema, verify: bool) -> None:
    if sum(info.row_groups) != info.rows:
        raise StoreError(f"{info.acts_path}: the manifest's row groups sum to {sum(info.row_groups)}, not {info.rows} rows")
    for path, size, digest, schema, rows, groups in (
        (info.acts_path, info.acts_bytes, info.acts_xxh3, acts_schema, info.rows, list(info.row_groups)),
        (info.ctx_path, info.ctx_bytes, info.ctx_xxh3, codec.CTX_SCHEMA, info.contexts, None),
    ):
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{path}: missing (listed in its task's {MANIFEST_JSON})") from None
        if actual != size:
            raise StoreError(f"{path}: {actual} bytes, but the manifest lists {size} (truncated or overwritten)")
        try:
            md = pq.read_metadata(path)
            file_schema = md.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: unreadable Parquet footer: {one_line(err)}") from None
        if _schema_key(file_schema) != _schema_key(schema):
            raise StoreError(f"{path}: schema {_schema_text(file_schema)} differs from the expected {_schema_text(schema)}")
        if md.num_rows != rows:
            raise StoreError(f"{path}: {md.num_rows} rows, but the manifest lists {rows}")
        if groups is not None and [md.row_group(i).num_rows for i in range(md.num_row_groups)] != groups:
            raise StoreError(f"{path}: row groups differ from the manifest's")
        if verify:
            got = _xxh3_file(path)
            if got != digest:
                raise StoreError(f"{path}: xxh3 checksum {got} differs from the manifest's {digest} (corrupt)")


def _schema_key(schema: pa.Schema) -> list[tuple[str, str]]:
    """Names and types, ignoring nullability, metadata and the name of a list's item field (writers differ there)."""
    key = []
    for f in schema:
        t = f.type
        key.append((f.name, f"list<{t.value_type}>" if pa.types.is_list(t) or pa.types.is_large_list(t) else str(t)))
    return key


def _schema_text(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def _xxh3_file(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHECKSUM_CHUNK):
            h.update(chunk)
    return h.hexdigest()
