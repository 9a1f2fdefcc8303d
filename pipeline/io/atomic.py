"""Crash-safe file primitives for a shared file system: write under a hidden temp name, fsync, rename, fsync the
directory.

A reader (or a glob like `acts-*.parquet`) never sees a half-written file: until the rename the bytes live under a
`.tmp-` name, and a rename within one file system is atomic on POSIX file systems (NFS and Lustre included). Temp
names carry the host, the pid and a random part, so that two processes, on one node or on two, never share one, and
so that a leftover temp file says whose it was (see `tmp_owner`).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

TMP_PREFIX = ".tmp-"
_SEP = "~"  # not in host names or pids; a file name may contain it, so the owner is parsed from the right


def host_name() -> str:
    return socket.gethostname().replace(_SEP, "-")


def tmp_path(path: str | Path, directory: str | Path | None = None) -> Path:
    """A fresh hidden temp name for `path`, in `directory` (default: next to it; must be on the same file system)."""
    path = Path(path)
    where = Path(directory) if directory is not None else path.parent
    return where / f"{TMP_PREFIX}{path.name}{_SEP}{host_name()}{_SEP}{os.getpid()}{_SEP}{secrets.token_hex(4)}"


def is_tmp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) encoded in a temp name made by `tmp_path`, or None for any other name."""
    if not is_tmp_name(name):
        return None
    parts = name.rsplit(_SEP, 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def tmp_is_orphaned(name: str) -> bool:
    """A temp file whose writer, on this host, is gone. Temp files of other hosts or of unknown owners are not judged."""
    owner = tmp_owner(name)
    return owner is not None and owner[0] == host_name() and owner[1] != os.getpid() and not pid_alive(owner[1])


def remove_orphaned_tmps(path: str | Path) -> list[Path]:
    """Remove the temp files and directories `tmp_path(path)` made next to `path` whose writer on this host is gone
    (a SIGKILL, the OOM killer); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if entry.name.startswith(f"{TMP_PREFIX}{path.name}{_SEP}") and tmp_is_orphaned(entry.name):
            remove_path(entry)
            removed.append(entry)
    return removed


def fsync_dir(path: str | Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` (created or truncated) and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` atomically: readers see the old bytes or the new ones, never a mixture."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_create_bytes(path: str | Path, data: bytes, *, tmp_dir: str | Path | None = None) -> bool:
    """Create `path` with `data` unless it exists; True if this call created it.

    Hard-linking the synced temp file is an atomic create-if-absent (NFS included), so two tasks starting together
    cannot both win. File systems without hard links fall back to a rename (last writer wins; callers compare the
    content afterwards). `tmp_dir` puts the temp file elsewhere on the same file system (a task's own directory)."""
    path = Path(path)
    tmp = tmp_path(path, tmp_dir)
    write_synced(tmp, data)
    try:
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError:  # no hard links here
            if path.exists():
                created = False
            else:
                os.replace(tmp, path)
                created = True
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return created


def fill_dir_synced(directory: Path, fill: Callable[[Path], None]) -> None:
    """Make `directory`, let `fill` write into it, then fsync every file and directory under it."""
    directory.mkdir(parents=True)
    fill(directory)
    for child in directory.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    for sub in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        fsync_dir(sub)


def atomic_create_dir(path: str | Path, fill: Callable[[Path], None], *, tmp_dir: str | Path | None = None) -> bool:
    """Create directory `path` by filling a temp directory and renaming it; True if this call created it.

    Renaming onto an existing non-empty directory fails, which makes this create-if-absent as well."""
    path = Path(path)
    if path.exists():
        return False
    tmp = tmp_path(path, tmp_dir)
    try:
        fill_dir_synced(tmp, fill)
        try:
            os.rename(tmp, path)
        except OSError:
            if path.is_dir():  # another task won the race
                return False
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)
    return True


def atomic_replace_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Write directory `path` anew: fill a temp directory, then put it in place of the old one (see install_dir)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        fill_dir_synced(tmp, fill)
        install_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_dir(complete: Path, path: str | Path) -> None:
    """Move the complete (synced) directory `complete` to `path`, replacing what is there. The old directory stays
    whole until then: on Linux the two are swapped in one step (renameat2 RENAME_EXCHANGE) and the old one deleted
    after; where the file system cannot swap, the old one is renamed aside first, which leaves a moment without
    `path` but never a mixture of old and new."""
    path = Path(path)
    if not path.exists():
        os.rename(complete, path)
    elif _exchange(complete, path):
        shutil.rmtree(complete, ignore_errors=True)  # now the old directory
    else:
        aside = tmp_path(path)
        os.rename(path, aside)
        os.rename(complete, path)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(path.parent)


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library or the file system does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree; a path already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
