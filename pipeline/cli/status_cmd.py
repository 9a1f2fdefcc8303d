"""`saepipe status RUN_DIR [--json]`: one row per task of a submitted run (Slurm state, progress, rate, ETA, age of
the last shard or checkpoint, requeues, node, log) and a summary line. Exit 1 when any task failed or was cancelled."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], description=__doc__, help="what every task of a submitted run is doing")
    p.add_argument("run_dir", help="the run directory of a submission (extract: store.root; train: run_dir)")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.orchestrate.status import any_failed, as_json, render, status_rows

    rows = status_rows(args.run_dir)
    print(json.dumps(as_json(rows)) if args.json else render(rows))
    return 1 if any_failed(rows) else 0
