"""The activation store: Parquet shards written crash-safely by extraction tasks, read back for training and analysis.

The names below load their modules on first use, so that `pipeline.store.layout` (dataset.json and manifests) is
available without importing torch: `saepipe extract` answers for a finished task in well under two seconds."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LAYOUT": "codec", "LAYOUTS": "codec",
    "SCHEMA_VERSION": "layout", "DatasetMeta": "layout", "Manifest": "layout", "ShardEntry": "layout",
    "ShardInfo": "layout", "StoreError": "layout",
    "Lookup": "lookup",
    "ActivationDataset": "reader",
    "BatchIterator": "shuffle", "BatchSizeError": "shuffle",
    "WRITE_PHASES": "writer", "ContextRows": "writer", "ShardRows": "writer", "TaskWriter": "writer",
    "task_description": "writer", "task_lease_path": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
