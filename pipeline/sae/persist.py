"""saepipe's own SAE format: `sae_state.safetensors` (the full state dict, input scale included) and
`sae_config.json` (the SAEConfig that rebuilds the recipe class), written and read as one directory.

A directory is written whole or not at all: it is filled under a temp name and swapped in, so that a reader on the
shared file system, or a job killed mid-save, never leaves new weights next to an old config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.config.load import validate
from pipeline.config.sae import SAEConfig
from pipeline.errors import ConfigError, SAEFormatError
from pipeline.io.atomic import atomic_replace_dir

from .base import SparseAutoencoder
from .factory import make_sae

WEIGHTS_FILE = "sae_state.safetensors"
CONFIG_FILE = "sae_config.json"
FORMAT = "saepipe-sae/1"


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write `sae` to `directory`, replacing an earlier save there atomically; returns the directory."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    meta = {"format": FORMAT, "config": sae.cfg.model_dump(mode="json")}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return replace_sae_dir(directory, fill, (WEIGHTS_FILE, CONFIG_FILE))


def load_sae(directory: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Rebuild the SAE that `save_sae` wrote, as the recipe class its config names."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    meta = read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise SAEFormatError(f"{cfg_path}: not a {FORMAT} config")
    try:
        cfg = validate(SAEConfig, meta["config"], str(cfg_path))
        sae = make_sae(cfg)
    except (ConfigError, ValueError) as err:
        raise SAEFormatError(_one_line(err)) from None
    sae.load_tensors(read_safetensors(weights_path), str(weights_path))
    return sae.to(device) if device is not None else sae


def replace_sae_dir(directory: str | Path, fill: Callable[[Path], None], names: Iterable[str]) -> Path:
    """Put a directory that `fill` writes in place of `directory`. The old one goes away whole, so refuse when it
    holds anything an SAE save does not write (`names`): saving into a run directory must not delete the run."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise SAEFormatError(f"{directory}: exists and is not a directory")
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in set(names))
        if foreign:
            raise SAEFormatError(f"{directory}: holds {', '.join(foreign[:3])}, which an SAE save does not write; "
                                 "refusing to replace it (choose an empty or new directory)")
    atomic_replace_dir(directory, fill)
    return directory


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEFormatError(f"{path}: cannot read SAE config: {_one_line(err)}") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise SAEFormatError(f"{path}: cannot read tensors: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
