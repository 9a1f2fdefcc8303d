"""What an extraction task checks before it loads a model or writes anything, and the fast path of a task that is
already finished. Imports neither torch nor transformers, so that `saepipe extract` on a finished task, or with a
mistyped path, answers in well under two seconds."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import ExtractRunConfig
from pipeline.corpus.plan import PLAN_FILE, Plan, load_plan
from pipeline.corpus.records import resolve_paths
from pipeline.errors import StoreError
from pipeline.store.layout import (
    DATASET_JSON,
    MANIFEST_JSON,
    TASKS_DIR,
    Manifest,
    load_manifest,
    load_meta,
    parse_task_dir_name,
    task_dir_name,
)

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_source(name: str) -> str:
    """What dataset.json records as the model: the hub name or path, or the packaged GGUF's file."""
    return f"{SMOLLM2}:{SMOLLM2_FILE}" if name == SMOLLM2 else name


def config_meta(cfg: ExtractRunConfig) -> dict:
    """The dataset.json keys that follow from the config alone (the rest need the loaded model: d_model, BOS id,
    tokenizer class)."""
    return {
        "model": model_source(cfg.model.name),
        "revision": None if cfg.model.name == SMOLLM2 else cfg.model.revision,
        "layer": cfg.extract.layer,
        "hook": cfg.extract.hook,
        "compute_dtype": cfg.model.dtype,
        "ctx_len": cfg.extract.ctx_len,
        "exclude_first": cfg.extract.exclude_first,
        "corpus": cfg.corpus.model_dump(mode="json"),
        "token_budget": cfg.corpus.token_budget,
        "partitioning": {"num_tasks": cfg.task.num_tasks, "scheme": "plan"},
    }


def check_store(cfg: ExtractRunConfig) -> None:
    """Refuse a task that does not belong to the dataset already at store.root, naming every differing key in full;
    and a root that cannot be created."""
    root = Path(cfg.store.root)
    meta_path = root / DATASET_JSON
    if meta_path.exists():
        stored = load_meta(meta_path).model_dump(mode="json")
        diff = []
        for key, mine in config_meta(cfg).items():
            if stored.get(key) != mine:
                diff.extend(_leaf_differences(stored.get(key), mine, key))
        if diff:
            details = "; ".join(f"{k}: stored {a} vs this config's {b}" for k, a, b in diff)
            raise StoreError(f"{meta_path}: this config's dataset differs from the one stored there: {details} "
                             "(extract into a fresh store.root, or restore the config it was made with)")
    existing_plan(cfg)
    tasks = root / TASKS_DIR
    if tasks.is_dir():
        for entry in tasks.iterdir():
            parsed = parse_task_dir_name(entry.name)
            if parsed and parsed[1] != cfg.task.num_tasks:
                raise StoreError(f"{entry}: the dataset is split into {parsed[1]} tasks, but task.num_tasks is "
                                 f"{cfg.task.num_tasks}")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"store.root {root}: cannot create it ({existing} is not a writable directory)")


def _leaf_differences(a, b, key: str) -> list[tuple[str, str, str]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                out.extend(_leaf_differences(a.get(k), b.get(k), f"{key}.{k}"))
        return out
    return [(key, json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True))]


def plan_problems(plan: Plan, cfg: ExtractRunConfig) -> list[str]:
    """What about an existing plan does not fit this config."""
    want = {"corpus": cfg.corpus.model_dump(mode="json"), "tokenizer": model_source(cfg.model.name),
            "ctx_len": cfg.extract.ctx_len, "num_tasks": cfg.task.num_tasks}
    return [f"{k}: plan has {json.dumps(getattr(plan, k), sort_keys=True)}, config {json.dumps(v, sort_keys=True)}"
            for k, v in want.items() if getattr(plan, k) != v]


def existing_plan(cfg: ExtractRunConfig) -> Plan | None:
    """The root's plan, checked against the config (a StoreError naming each difference), or None."""
    plan = load_plan(cfg.store.root)
    if plan is not None:
        problems = plan_problems(plan, cfg)
        if problems:
            raise StoreError(f"{Path(cfg.store.root) / PLAN_FILE}: made for another config: {'; '.join(problems)} "
                             "(extract into a fresh store.root, or restore the config it was made with)")
    return plan


def check_corpus(cfg: ExtractRunConfig) -> None:
    """Every path or glob matches a file (a CorpusError naming the pattern otherwise). HF sources are opened by the
    task itself: there is no cheaper check than streaming the first rows."""
    if cfg.corpus.paths:
        resolve_paths(cfg.corpus.paths)


def finished_manifest(cfg: ExtractRunConfig) -> Manifest | None:
    """This task's manifest if the task has already completed with this config (check_store has passed)."""
    path = Path(cfg.store.root) / TASKS_DIR / task_dir_name(cfg.task.task_id, cfg.task.num_tasks) / MANIFEST_JSON
    if not path.exists() or not (Path(cfg.store.root) / DATASET_JSON).exists():
        return None
    manifest = load_manifest(path)
    return manifest if manifest.complete else None
