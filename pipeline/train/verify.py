"""Checksums of the store, checked before the first step: a flipped bit in a shard would otherwise train silently.

Ranks share the work (rank r checks shards s = r mod W), and shards already verified for this run, unchanged since
(same size, mtime and inode), are not read again, so a requeued job starts at once. The record is
run_dir/verified-shards.json."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.io import atomic_write_json
from pipeline.store import ActivationDataset

from .collectives import Control

log = logging.getLogger(__name__)

RECORD = "verified-shards.json"


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _key(dataset: ActivationDataset, shard: int) -> tuple[str, list]:
    info = dataset.shards[shard]
    return (f"{info.acts_path.parent.name}/{info.acts_path.name}",
            [info.acts_xxh3, info.ctx_xxh3, _stamp(info.acts_path), _stamp(info.ctx_path)])


def verify_store(dataset: ActivationDataset, run_dir: Path, control: Control, rank: int, world: int,
                 progress: bool) -> int:
    """Raise StoreError on every rank if any shard fails its checksum; returns the shards read here."""
    record_path = run_dir / RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    except (OSError, json.JSONDecodeError):
        record = {}
    keys = [_key(dataset, s) for s in range(dataset.num_shards)]
    todo = [s for s, (name, stamp) in enumerate(keys) if record.get(name) != stamp]
    mine = todo[rank::world]
    problems = dataset.verify(mine, progress=progress and rank == 0)
    failed = control.all_sum(len(problems))
    if failed:
        if problems:
            raise StoreError(f"{dataset.root}: {failed} shard file(s) fail their checksum, e.g. {problems[0]}; "
                             "run `saepipe verify` for the list and re-extract the affected tasks")
        raise StoreError(f"{dataset.root}: {failed} shard file(s) fail their checksum (found by another rank)")
    if rank == 0 and todo:
        record = {name: stamp for name, stamp in keys}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path, record)
        log.info("verified the checksums of %d shard(s) of %s", len(todo), dataset.root)
    control.barrier()
    return len(mine)
