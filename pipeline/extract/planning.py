"""The plan an extraction's tasks share (pipeline.corpus.plan), made once and kept in the dataset root: made at submit
time by `saepipe submit`, or by the first task of a local run that finds none; every later task, and every rerun,
follows it."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import ExtractRunConfig
from pipeline.corpus import batch_tokenizer
from pipeline.corpus.plan import PLAN_FILE, Plan, make_plan
from pipeline.io import atomic_create_bytes, json_bytes

from .preflight import existing_plan, model_source

log = logging.getLogger(__name__)


def ensure_plan(cfg: ExtractRunConfig, tokenizer) -> Plan:
    """The root's plan, or a new one written there (create-if-absent: of tasks planning at once, one wins and the
    others use its plan, which is the same)."""
    plan = existing_plan(cfg)
    if plan is not None:
        return plan
    plan = make_plan(cfg.corpus, batch_tokenizer(tokenizer), tokenizer=model_source(cfg.model.name),
                     ctx_len=cfg.extract.ctx_len, num_tasks=cfg.task.num_tasks)
    root = Path(cfg.store.root)
    root.mkdir(parents=True, exist_ok=True)
    if atomic_create_bytes(root / PLAN_FILE, json_bytes(plan.to_json())):
        log.info("wrote the extraction plan to %s", root / PLAN_FILE)
        return plan
    return existing_plan(cfg)
