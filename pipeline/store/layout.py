"""Where things live in a dataset root, and the two JSON documents that describe it (dataset.json, manifest.json).

    ROOT/dataset.json                                  DatasetMeta: identical for every task
    ROOT/tokenizer/                                    the tokenizer, saved once (reader's lookup decodes with it)
    ROOT/tasks/task-00000-of-00004/manifest.json       Manifest: the commit point of that task's shards
    ROOT/tasks/task-00000-of-00004/acts-000000.parquet one row per stored token
    ROOT/tasks/task-00000-of-00004/ctx-000000.parquet  the contexts of that shard
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StoreError

SCHEMA_VERSION = 2
DATASET_JSON = "dataset.json"
TOKENIZER_DIR = "tokenizer"
TASKS_DIR = "tasks"
MANIFEST_JSON = "manifest.json"
# The activation column layout new datasets get (codec.py implements it).
DEFAULT_LAYOUT = "bf16-lo-plane+hi-zstd"
# Keys allowed to differ between the tasks of one dataset (a task resumed by a newer build of the package).
META_KEYS_FREE_TO_DIFFER = frozenset({"created_with"})

_TASK_DIR_RE = re.compile(r"^task-(\d{5,})-of-(\d{5,})$")


def package_version() -> str:
    try:
        return f"saepipe {metadata.version('pipeline')}"
    except metadata.PackageNotFoundError:
        return "saepipe unknown"


def task_dir_name(task_id: int, num_tasks: int) -> str:
    return f"task-{task_id:05d}-of-{num_tasks:05d}"


def parse_task_dir_name(name: str) -> tuple[int, int] | None:
    m = _TASK_DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def acts_name(index: int) -> str:
    return f"acts-{index:06d}.parquet"


def ctx_name(index: int) -> str:
    return f"ctx-{index:06d}.parquet"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class DatasetMeta(BaseModel):
    """What every row of the dataset was computed from; tasks of one dataset must agree on all of it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    model: str
    revision: str | None = None
    layer: int = Field(ge=0)
    hook: str
    d_model: int = Field(gt=0)
    dtype: str = "bfloat16"  # storage dtype
    compute_dtype: str = "float32"
    layout: str = DEFAULT_LAYOUT
    tokenizer: dict[str, Any] = Field(default_factory=lambda: {"dir": TOKENIZER_DIR})
    ctx_len: int = Field(gt=1)
    exclude_first: int = Field(default=0, ge=0)
    bos_token_id: int | None = None
    corpus: dict[str, Any] = Field(default_factory=dict)
    partitioning: dict[str, Any] = Field(default_factory=dict)
    token_budget: int | None = None
    created_with: str = Field(default_factory=package_version)

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a StoreError naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read: {one_line(err)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def load_meta(path: Path) -> DatasetMeta:
    """Read dataset.json, checking the schema version before anything else so that a future format fails clearly."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = "; written by an older saepipe: extract again into a fresh root" if isinstance(version, int) and version < SCHEMA_VERSION else ""
        raise StoreError(f"{path}: schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION}){hint}")
    try:
        return DatasetMeta.model_validate(data)
    except ValidationError as err:
        raise StoreError(f"{path}: invalid dataset metadata: {_pydantic_one_line(err)}") from None


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard as the reader sees it: where its files are and where its rows fall in the dataset."""

    task_id: int
    index: int  # within its task
    acts_path: Path
    ctx_path: Path
    rows: int
    contexts: int
    row_groups: tuple[int, ...]
    row_offset: int  # global row index of its first row
    acts_bytes: int
    ctx_bytes: int
    acts_xxh3: str
    ctx_xxh3: str
    first_context_id: int | None
    last_context_id: int | None


class ShardEntry(BaseModel):
    """One committed shard of a task, as listed in its manifest."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    acts_file: str
    ctx_file: str
    rows: int = Field(ge=0)
    contexts: int = Field(ge=0)
    acts_bytes: int = Field(ge=0)
    ctx_bytes: int = Field(ge=0)
    acts_xxh3: str  # xxh3-64 of the file's bytes, 16 hex digits
    ctx_xxh3: str
    first_context_id: int | None
    last_context_id: int | None
    row_groups: list[int]  # row count of each row group, in order


class Manifest(BaseModel):
    """A task's commit log. A shard file not listed here does not exist for readers."""

    model_config = ConfigDict(extra="forbid")

    task_id: int = Field(ge=0)
    num_tasks: int = Field(gt=0)
    complete: bool = False
    shards: list[ShardEntry] = Field(default_factory=list)
    rows: int = 0
    contexts: int = 0
    bytes: int = 0
    # Cumulative counts of skipped input up to the last committed shard, by reason; the caller's numbers.
    skips: dict[str, int] = Field(default_factory=dict)
    # The caller's resume position after the last committed shard (opaque to the store).
    cursor: dict[str, Any] | None = None
    stats: dict[str, Any] = Field(default_factory=dict)

    def add(self, entry: ShardEntry) -> None:
        self.shards.append(entry)
        self.rows += entry.rows
        self.contexts += entry.contexts
        self.bytes += entry.acts_bytes + entry.ctx_bytes


def load_manifest(path: Path) -> Manifest:
    data = read_json(path)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise StoreError(f"{path}: invalid manifest: {_pydantic_one_line(err)}") from None
    for i, entry in enumerate(manifest.shards):
        if entry.index != i:
            raise StoreError(f"{path}: shard {i} is listed with index {entry.index}")
    return manifest


def _pydantic_one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return one_line("; ".join(parts))
