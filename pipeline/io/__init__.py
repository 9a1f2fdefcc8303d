"""Shared file-system primitives: atomic writes with temp names unique across hosts, and leases on units of work."""
from .atomic import (
    TMP_PREFIX,
    atomic_create_bytes,
    atomic_create_dir,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fill_dir_synced,
    fsync_dir,
    install_dir,
    is_tmp_name,
    json_bytes,
    remove_path,
    tmp_is_orphaned,
    tmp_path,
    write_synced,
)
from .lease import Lease, read_holder
from .records import read_jsonl, save_png

__all__ = [
    "TMP_PREFIX", "Lease", "atomic_create_bytes", "atomic_create_dir", "atomic_replace_dir", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "fill_dir_synced", "fsync_dir", "install_dir", "is_tmp_name", "json_bytes", "read_holder", "remove_path",
    "tmp_is_orphaned", "tmp_path", "write_synced", "read_jsonl", "save_png",
]
