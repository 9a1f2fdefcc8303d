"""`saepipe config keys extract|train|analysis|label|sweep [--markdown]`: every config key with its default and meaning;
`saepipe config show KIND CONFIG [key=value ...]`: the config as validated, defaults filled in."""
from __future__ import annotations

import argparse


def _kinds():
    from pipeline.config import ExtractRunConfig
    from pipeline.config.analysis import AnalysisRunConfig
    from pipeline.config.label import LabelRunConfig
    from pipeline.config.sweep import SweepConfig
    from pipeline.config.train import TrainRunConfig

    return {"extract": ExtractRunConfig, "train": TrainRunConfig, "analysis": AnalysisRunConfig, "label": LabelRunConfig,
            "sweep": SweepConfig}


KINDS = ["extract", "train", "analysis", "label", "sweep"]


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", parents=[common], description=__doc__, help="list config keys, or show a resolved config")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    keys = actions.add_parser("keys", parents=[common], help="every key with its default and help text")
    keys.add_argument("kind", choices=KINDS)
    keys.add_argument("--markdown", action="store_true", help="as the README's reference table")
    keys.set_defaults(func=run_keys)
    show = actions.add_parser("show", parents=[common], help="a config file as validated, defaults filled in")
    show.add_argument("kind", choices=KINDS)
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(func=run_show)


def run_keys(args: argparse.Namespace) -> int:
    from pipeline.config.reference import markdown_table, text_listing

    model = _kinds()[args.kind]
    print(markdown_table(model) if args.markdown else text_listing(model))
    return 0


def run_show(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import load_config

    cfg = load_config(_kinds()[args.kind], args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0
