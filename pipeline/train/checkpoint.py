"""Checkpoints of named stateful components (anything with `state_dict()` / `load_state_dict()`), written atomically
by all ranks together and loaded without pickle.

Each component `name` becomes `name.safetensors` (its tensors) and `name.json` (everything else, with the tensors'
places marked), so an optimiser's int-keyed state and tuple-valued param groups round-trip exactly. Layout of
run_dir/checkpoints/step_000001000/ as the trainer uses it:
    sae.*  optimizer.*  firing.*  trainer.*      written by rank 0
    reader/partition_<p>.*                       by the rank that owns data partition p
    rng/rank_<r>.*                               by rank r
    manifest.json                                size and xxh3-128 of every other file; written last, so a
                                                 directory without it is partial

Protocol: rank 0 makes a temp directory (a name unique across hosts, broadcast to the others), every rank writes and
fsyncs its own components into it, rank 0 writes the manifest, fsyncs and renames it into place, then prunes all
but the newest `keep_last`. A step directory that already exists and verifies is kept as it is: the same step of
the same run is the same state (a preemption right after the periodic checkpoint of that step).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.io import TMP_PREFIX, fsync_dir, install_dir, json_bytes, tmp_path, write_synced

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 1: sha256 checksums (saepipe before the component checkpointer)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 16 << 20


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


# ---------------------------------------------------------------- state dicts as JSON + safetensors

def split_state(state) -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors): tensors are replaced by {"__tensor__": key}; dicts with non-string keys,
    tuples and non-finite floats are tagged so that `join_state` rebuilds them exactly."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path: str):
        if isinstance(obj, torch.Tensor):
            key = path or "value"
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {"__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if isinstance(obj, np.generic):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path!r}")

    return walk(state, ""), tensors


def join_state(structure, tensors: dict[str, torch.Tensor]):
    def walk(obj):
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__dict__" in obj:
                return {k: walk(v) for k, v in obj["__dict__"]}
            if "__tuple__" in obj:
                return tuple(walk(v) for v in obj["__tuple__"])
            if "__float__" in obj:
                return float(obj["__float__"])
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(structure)


def save_component(directory: Path, name: str, state: dict) -> None:
    structure, tensors = split_state(state)
    base = directory / name
    base.parent.mkdir(parents=True, exist_ok=True)
    if tensors:  # a component of plain values (a reader position) is its JSON alone
        save_file(tensors, str(base.with_name(base.name + ".safetensors")))
        with open(base.with_name(base.name + ".safetensors"), "rb") as f:
            os.fsync(f.fileno())
    write_synced(base.with_name(base.name + ".json"), json_bytes(structure))


def load_component(directory: Path, name: str) -> dict:
    base = directory / name
    tensor_file = base.with_name(base.name + ".safetensors")
    try:
        structure = json.loads(base.with_name(base.name + ".json").read_text())
        tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{base}: cannot load checkpoint component: {err}") from None
    return join_state(structure, tensors)


def has_component(directory: Path, name: str) -> bool:
    base = directory / name
    return base.with_name(base.name + ".json").is_file()


class RNGState:
    """The process's torch (CPU and CUDA), numpy and python RNG streams as a stateful component."""

    def state_dict(self) -> dict:
        state = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["python"] = [version, list(internal), gauss]
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch_cpu"])
        cuda = state.get("torch_cuda") or []
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- checksums

def file_xxh3(path: Path) -> str:
    """xxh3-128 of a file, read in 16 MiB pieces into one reused buffer: the same hash family as the store's, at
    the speed the disk (or the page cache) delivers."""
    h = xxhash.xxh3_128()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _manifest(directory: Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "xxh3_128": file_xxh3(path)}
    return {"format": MANIFEST_FORMAT, "files": files}


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, otherwise what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (partial write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            return f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT} (written by an older saepipe)"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            return f"missing {rel}"
        if file.stat().st_size != expected["size"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest says {expected['size']}"
        if file_xxh3(file) != expected["xxh3_128"]:
            return f"{rel} does not match its checksum"
    return None


# ---------------------------------------------------------------- the checkpointer

def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, newest first (partial ones included; see `verify`)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _no_barrier() -> None:
    pass


def _same(value: str) -> str:
    return value


class Checkpointer:
    """Saves and finds checkpoints under `root`. Collective in a multi-process run: every rank calls `save` at the
    same step with the components it owns; `barrier` and `broadcast_str` come from the caller's process group.
    `every_steps` is its cadence (`due`)."""

    def __init__(self, root: Path, *, every_steps: int, keep_last: int, rank: int = 0,
                 barrier: Callable[[], None] = _no_barrier, broadcast_str: Callable[[str], str] = _same) -> None:
        self.root = Path(root)
        self.every_steps, self.keep_last, self.rank = every_steps, keep_last, rank
        self._barrier, self._broadcast_str = barrier, broadcast_str
        self.last_saved_step: int | None = None
        self.last_save_seconds: float | None = None

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, components: dict[str, Stateful]) -> Path:
        t0 = time.perf_counter()
        final = self.root / step_dir_name(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            problem = verify(final) if final.exists() else "absent"
            tmp = "" if problem is None else str(tmp_path(final))
        tmp = self._broadcast_str(tmp if self.rank == 0 else "")
        if not tmp:
            log.info("checkpoint %s already written; kept as it is", final)
            self._barrier()
            self.last_saved_step = step
            return final
        tmp_dir = Path(tmp)
        if self.rank == 0:
            tmp_dir.mkdir()
        self._barrier()
        for name, component in components.items():
            save_component(tmp_dir, name, component.state_dict())
        self._barrier()
        if self.rank == 0:
            write_synced(tmp_dir / MANIFEST, json_bytes(_manifest(tmp_dir)))
            for directory in [*(p for p in tmp_dir.rglob("*") if p.is_dir()), tmp_dir]:
                fsync_dir(directory)
            install_dir(tmp_dir, final)  # swaps out a corrupt directory of the same step, if there was one
            self.prune(step)
            log.info("checkpoint written: %s", final)
        self._barrier()
        self.last_saved_step = step
        self.last_save_seconds = time.perf_counter() - t0
        return final

    def prune(self, current_step: int) -> None:
        """Keep the newest `keep_last` up to `current_step`; later ones belong to an abandoned timeline (a resume that
        skipped them as corrupt) and would otherwise outlive every new checkpoint."""
        found = list_checkpoints(self.root)
        current = [p for p in found if checkpoint_step(p) <= current_step]
        abandoned = [p for p in found if checkpoint_step(p) > current_step]
        for path in abandoned + current[self.keep_last:]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def latest_valid(self) -> Path | None:
        for path in list_checkpoints(self.root):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    @staticmethod
    def load(path: Path, components: dict[str, Stateful]) -> None:
        """Load each named component from a verified checkpoint, in the order given."""
        for name, component in components.items():
            if not has_component(path, name):
                raise CheckpointError(f"{path}: has no component {name!r}")
            component.load_state_dict(load_component(path, name))
