"""The activation store: Parquet shards written crash-safely by extraction tasks, read back for training and analysis."""
from .atomic import atomic_write_bytes, atomic_write_json, crash_point
from .codec import LAYOUT, LAYOUTS
from .layout import SCHEMA_VERSION, DatasetMeta, Manifest, ShardEntry, StoreError
from .lookup import Lookup
from .reader import ActivationDataset, ShardInfo
from .shuffle import BatchIterator
from .writer import ContextRows, ShardRows, TaskWriter

__all__ = [
    "ActivationDataset",
    "BatchIterator",
    "ContextRows",
    "DatasetMeta",
    "LAYOUT",
    "LAYOUTS",
    "Lookup",
    "Manifest",
    "SCHEMA_VERSION",
    "ShardEntry",
    "ShardInfo",
    "ShardRows",
    "StoreError",
    "TaskWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "crash_point",
]
