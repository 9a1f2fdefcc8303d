"""What an analysis reads: an SAE in the SAELens format and the saepipe store it runs on, with the shards held out
from its training.

Two kinds of RUN are accepted: a training run directory (RUN/config.yaml names the store and how many shards were held
out; the SAE is its export RUN/final), or any bare SAELens-format directory (cfg.json + weights), which needs a store
(`store=`, else the `activation_store` its cfg.json metadata names) and holds out split_shards(dataset, 1).eval unless
shards are given. Everything is checked here, before any heavy work, and fails as one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import ConfigError, SAEFormatError
from pipeline.sae import SparseAutoencoder, load_saelens
from pipeline.store import ActivationDataset

RUN_CONFIG = "config.yaml"
RUN_EXPORT = "final"
SAELENS_CONFIG = "cfg.json"
# SAELens hook names of the hook points a saepipe store records (see pipeline.sae.export).
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out)$")


@dataclass
class SaeSource:
    sae: SparseAutoencoder
    sae_dir: Path
    store_root: Path
    dataset: ActivationDataset
    held_out_shards: list[int]
    run_dir: Path | None  # None for a bare SAELens directory


def open_sae_source(run: str | Path, store: str | Path | None = None, *, shards: Sequence[int] | None = None,
                    device: str | None = None) -> SaeSource:
    """Load the SAE of `run` and open its store; `shards` overrides the held-out choice (store shard indices)."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such directory (expected a training run dir or a SAELens-format SAE dir)")
    run_dir: Path | None = None
    eval_shards = 1
    if (run / RUN_CONFIG).is_file():
        from pipeline.config import load_config
        from pipeline.config.train import TrainRunConfig

        cfg = load_config(TrainRunConfig, run / RUN_CONFIG)
        run_dir, sae_dir = run, run / RUN_EXPORT
        if not (sae_dir / SAELENS_CONFIG).is_file():
            raise SAEFormatError(f"{sae_dir}: no SAELens export ({SAELENS_CONFIG}); the run has not finished training")
        store = store if store is not None else cfg.data.root
        eval_shards = cfg.data.eval_shards
    elif (run / SAELENS_CONFIG).is_file():
        sae_dir = run
        if store is None:
            store = _recorded_store(run / SAELENS_CONFIG)
        if store is None:
            raise ConfigError(f"{run}: a bare SAELens dir needs --store (the activation store to analyse it on)")
    else:
        raise ConfigError(f"{run}: neither a training run dir ({RUN_CONFIG}) nor a SAELens-format SAE dir "
                          f"({SAELENS_CONFIG})")

    store_root = Path(store)
    if not store_root.is_dir():
        raise ConfigError(f"{store_root}: the activation store does not exist")
    dataset = ActivationDataset.open(store_root)
    sae = load_saelens(sae_dir)
    if sae.cfg.d_in != dataset.d_model:
        raise ConfigError(f"{sae_dir}: the SAE takes d_in={sae.cfg.d_in}, but the store {store_root} holds "
                          f"d_model={dataset.d_model}")
    _check_hook(sae_dir / SAELENS_CONFIG, dataset)
    if shards is not None:
        held_out = _checked_shards(shards, dataset)
    elif run_dir is not None:
        from pipeline.eval.split import split_shards

        held_out = split_shards(dataset, eval_shards).eval
    else:
        from pipeline.eval.split import split_shards

        held_out = split_shards(dataset, 1).eval if dataset.num_shards > 1 else list(range(dataset.num_shards))
    if not held_out or sum(dataset.shards[s].rows for s in held_out) == 0:
        raise ConfigError(f"{store_root}: the shards to analyse ({held_out}) hold no rows")
    if device is not None:
        sae = sae.to(device)
    return SaeSource(sae=sae, sae_dir=sae_dir, store_root=store_root, dataset=dataset, held_out_shards=held_out,
                     run_dir=run_dir)


def parse_shards(text: str) -> list[int]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]."""
    return parse_int_list(text, "--shards", "shard indices")


def parse_int_list(text: str, option: str, what: str) -> list[int]:
    """'0,3,5-7' -> [0, 3, 5, 6, 7], or a one-line ConfigError naming `option`."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a list of {what} like 0,3,5-7") from None
    if not out:
        raise ConfigError(f"{option}: {text!r} names none")
    return out


def _checked_shards(shards: Sequence[int], dataset: ActivationDataset) -> list[int]:
    bad = [s for s in shards if not 0 <= s < dataset.num_shards]
    if bad:
        raise ConfigError(f"--shards: {bad} out of range; {dataset.root} has shards 0..{dataset.num_shards - 1}")
    if len(set(shards)) != len(shards):
        raise ConfigError(f"--shards: a shard is named twice in {list(shards)}")
    return list(shards)


def _read_cfg(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # load_saelens names the problem
    return raw if isinstance(raw, dict) else {}


def _recorded_store(cfg_path: Path) -> str | None:
    meta = _read_cfg(cfg_path).get("metadata") or {}
    store = meta.get("activation_store") if isinstance(meta, dict) else None
    return store if isinstance(store, str) and Path(store).is_dir() else None


def _check_hook(cfg_path: Path, dataset: ActivationDataset) -> None:
    """An SAE trained on another layer or hook point fits the store's shape but its features mean nothing there."""
    meta = _read_cfg(cfg_path).get("metadata") or {}
    hook = meta.get("hook_name") if isinstance(meta, dict) else None
    m = _TL_HOOK.match(hook) if isinstance(hook, str) else None
    if m and (int(m.group(1)), m.group(2)) != (dataset.meta.layer, dataset.meta.hook):
        raise ConfigError(f"{cfg_path}: the SAE was trained on {hook}, but the store {dataset.root} holds layer "
                          f"{dataset.meta.layer} {dataset.meta.hook}")
