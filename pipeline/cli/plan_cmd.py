"""`saepipe plan CONFIG [key=value ...]`: make (or show) the extraction plan in store.root: the selected part of the
corpus cut into units, each task's share, the global context ids. `saepipe submit extract` makes it; a local
`saepipe extract` makes it if there is none. Tokenizes the selection; runs no model."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common], description=__doc__, help="make or show the extraction plan")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ExtractRunConfig, load_config
    from pipeline.extract.preflight import existing_plan
    from pipeline.orchestrate.submit import prepare_extraction

    cfg = load_config(ExtractRunConfig, args.config, args.overrides)
    prepare_extraction(cfg)
    plan = existing_plan(cfg)
    t = plan.totals
    print(f"plan in {cfg.store.root}: {t['units']} units, {t['docs']} docs, {t['tokens']} tokens, {t['contexts']} "
          f"contexts, {t['records_read']} records read in {t['seconds']} s; skips {t['skips'] or 'none'}")
    for task in range(plan.num_tasks):
        units = plan.tasks[task]
        print(f"  task {task}: {len(units)} units ({units[0] if units else '-'}..{units[-1] if units else '-'}), "
              f"{plan.task_tokens(task)} tokens")
    return 0
