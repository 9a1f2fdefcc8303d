"""Checkpoints: a directory per step, written atomically by all ranks together, loaded without pickle.

Layout of run_dir/checkpoints/step_000001000/:
    sae.safetensors          SAE state dict (weights and buffers)
    optimizer.safetensors    optimiser tensors, keyed "state.<param index>.<name>"
    firing.safetensors       firing statistics
    trainer.json             step and token counters, scheduler state, optimiser scalars and param groups, config
    reader/partition_<p>.json   position of data partition p
    rng/rank_<r>.safetensors + rng/rank_<r>.json   torch (uint8 state tensors) and python/numpy RNG states of rank r
    manifest.json            size and sha256 of every other file; written last, so a directory without it is partial

Protocol: rank 0 makes `.tmp-step_...`, every rank writes and fsyncs its own files into it, rank 0 writes the manifest,
fsyncs and renames it into place, then prunes all but the newest `keep_last`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.store.atomic import TMP_PREFIX, fsync_dir, json_bytes, write_synced

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


# ---------------------------------------------------------------- file helpers (each fsyncs what it writes)

def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synced(path, json_bytes(obj))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_json(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- optimiser and RNG state without pickle

def optimizer_state_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON (scalars and param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, per_param in meta["scalars"].items():
        state.setdefault(int(index), {}).update(per_param)
    # JSON turned tuples (Adam's betas) into lists; give them back their type.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- writing

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(directory: Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"format": 1, "files": files}


def _no_barrier() -> None:
    pass


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], *, rank: int, keep_last: int,
                     barrier: Callable[[], None] = _no_barrier) -> Path:
    """Collective: every rank calls it; `write_files(tmp_dir)` writes this rank's share of the files."""
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # e.g. a preemption right after the periodic checkpoint of the same step
            shutil.rmtree(final)
        tmp.mkdir()
    barrier()
    write_files(tmp)
    barrier()
    if rank == 0:
        save_json(tmp / MANIFEST, _manifest(tmp))
        for directory in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            fsync_dir(directory)
        os.rename(tmp, final)
        fsync_dir(root)
        prune(root, keep_last, step)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def prune(root: Path, keep_last: int, current_step: int) -> None:
    """Keep the newest `keep_last` up to `current_step`; later ones belong to an abandoned timeline (a resume that
    skipped them as corrupt) and would otherwise outlive every new checkpoint."""
    current = [p for p in list_checkpoints(root) if checkpoint_step(p) <= current_step]
    abandoned = [p for p in list_checkpoints(root) if checkpoint_step(p) > current_step]
    for path in abandoned + current[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- finding a checkpoint to resume from

def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, newest first (partial ones included; see `verify`)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, otherwise what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (partial write)"
    try:
        manifest = load_json(manifest_path)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            return f"missing {rel}"
        if file.stat().st_size != expected["size"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def latest_valid(root: Path) -> Path | None:
    for path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checked(path: Path, loader: Callable[[Path], object]):
    """Load one file of a verified checkpoint; a failure names the file."""
    try:
        return loader(path)
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot load checkpoint file: {err}") from None
