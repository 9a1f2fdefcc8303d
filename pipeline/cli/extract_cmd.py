"""`saepipe extract CONFIG [dotted.key=value ...] [--task-id I --num-tasks N]`: run one extraction task locally.

The config is checked against the corpus, the store and the model before anything is loaded or written; a task that
is already complete returns at once. SIGTERM, SIGUSR1 or SIGUSR2 commit the shards in flight and exit 75; running
the same command again resumes after the last committed shard. Config keys: `saepipe config keys extract`."""
from __future__ import annotations

import argparse

from pipeline.config import ExtractRunConfig, load_config


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("extract", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="extract layer activations of one corpus partition into the Parquet store")
    p.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. extract.layer=12")
    p.add_argument("--task-id", type=int, default=None, help="this task's partition (default: task.task_id of the config)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of partitions (default: task.num_tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_extract_config(path: str, overrides: list[str], task_id: int | None = None, num_tasks: int | None = None) -> ExtractRunConfig:
    extra = list(overrides)
    if task_id is not None:
        extra.append(f"task.task_id={task_id}")
    if num_tasks is not None:
        extra.append(f"task.num_tasks={num_tasks}")
    return load_config(ExtractRunConfig, path, extra)


def run(args: argparse.Namespace) -> int:
    from pipeline.extract import preflight

    cfg = load_extract_config(args.config, args.overrides, args.task_id, args.num_tasks)
    # The finished-task answer needs neither torch nor the model (under two seconds).
    preflight.check_corpus(cfg)
    preflight.check_store(cfg)
    done = preflight.finished_manifest(cfg)
    if done is not None:
        print(f"task {cfg.task.task_id}/{cfg.task.num_tasks}: already complete, {done.rows} rows in "
              f"{len(done.shards)} shards in {cfg.store.root}; nothing to do")
        return 0

    from pipeline.extract.runner import ExtractionRunner
    from pipeline.io.process import EXIT_PREEMPTED, signal_stop
    from pipeline.telemetry import job_telemetry

    with signal_stop() as stop, \
            job_telemetry(cfg.telemetry, "extract", cfg.store.root, task=cfg.task.task_id, stop=stop,
                          info={"model": cfg.model.name}) as telemetry, \
            ExtractionRunner(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=not args.no_progress) as runner:
        result = runner.run()
    m = result.manifest
    if result.status == "stopped":
        print(f"task {cfg.task.task_id}/{cfg.task.num_tasks}: stopped ({result.stop_reason}) after {m['rows']} rows in "
              f"{len(m['shards'])} committed shards; run the same command again to resume")
        return EXIT_PREEMPTED
    print(f"task {cfg.task.task_id}/{cfg.task.num_tasks}: {m['rows']} rows in {len(m['shards'])} shards "
          f"-> {cfg.store.root}; skips: {m['skips'] or 'none'}")
    return 0
