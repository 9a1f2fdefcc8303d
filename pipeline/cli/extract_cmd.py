"""`saepipe extract CONFIG [dotted.key=value ...] [--task-id I --num-tasks N]`: run one extraction task locally."""
from __future__ import annotations

import argparse

from pipeline.config import ExtractRunConfig, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract layer activations of one corpus partition into the Parquet store")
    p.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. extract.layer=12")
    p.add_argument("--task-id", type=int, default=None, help="this task's partition (default: task.task_id of the config)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of partitions (default: task.num_tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_extract_config(path: str, overrides: list[str], task_id: int | None = None, num_tasks: int | None = None) -> ExtractRunConfig:
    extra = list(overrides)
    if task_id is not None:
        extra.append(f"task.task_id={task_id}")
    if num_tasks is not None:
        extra.append(f"task.num_tasks={num_tasks}")
    return load_config(ExtractRunConfig, path, extra)


def run(args: argparse.Namespace) -> int:
    from pipeline.extract.runner import run_extract

    cfg = load_extract_config(args.config, args.overrides, args.task_id, args.num_tasks)
    manifest = run_extract(cfg, show_progress=not args.no_progress)
    print(f"task {cfg.task.task_id}/{cfg.task.num_tasks}: {manifest['rows']} rows in {len(manifest['shards'])} shards "
          f"-> {cfg.store.root}; skips: {manifest['skips'] or 'none'}")
    return 0
