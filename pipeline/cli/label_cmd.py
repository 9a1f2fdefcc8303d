"""`saepipe label RUN [--config FILE] [key=value ...]`: explain features with an LLM behind an OpenAI-compatible chat
endpoint and score each explanation by detection and fuzzing (EleutherAI delphi's method). RUN is a training run dir
(its analysis is RUN/analysis) or an analysis dir of `saepipe analyze`.

The endpoint: --base-url and --model (or endpoint.base_url / endpoint.model, or $SAEPIPE_LABEL_BASE_URL and
$SAEPIPE_LABEL_MODEL; the key is read from $OPENAI_API_KEY, or the variable endpoint.api_key_env names), or --serve to
start `transformers serve` here with the bundled SmolLM2-135M-Instruct (or a model directory) for the run.

Writes labels.parquet, labels.json and labels.png into the analysis dir and shows the labels in its browser. Each
finished feature is cached: a rerun, or a run after the endpoint failed, asks only for the missing ones.
Every key: `saepipe config keys label`."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("label", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="explain features with an LLM and score the explanations")
    p.add_argument("run", help="training run dir, or an analysis dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. score_examples=20")
    p.add_argument("--config", help="a label config (YAML; see configs/label-demo.yaml)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ids", help="features to label, e.g. 3,17,40-45")
    which.add_argument("--top", type=int, metavar="N", help="the N live features of highest selectivity")
    which.add_argument("--all", action="store_true", help="every live feature")
    p.add_argument("--base-url", help="the endpoint's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name the endpoint serves")
    p.add_argument("--serve", nargs="?", const="smollm2", metavar="MODEL",
                   help="start `transformers serve` on loopback for the run (default model: smollm2)")
    p.add_argument("--concurrency", type=int, help="requests in flight at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print labels.json's overall scores as JSON")
    p.set_defaults(func=run)


def label_config(args: argparse.Namespace):
    from pipeline.analysis.source import parse_int_list
    from pipeline.config import validate
    from pipeline.config.label import LabelRunConfig
    from pipeline.config.load import apply_override, read_mapping

    data = read_mapping(args.config) if args.config else {}
    data["run"] = args.run
    if args.ids:
        data.update(select="ids", ids=parse_int_list(args.ids, "--ids", "feature ids"))
    elif args.top:
        data.update(select="top_selectivity", n=args.top)
    elif args.all:
        data["select"] = "all"
    endpoint = data.setdefault("endpoint", {})
    if not isinstance(endpoint, dict):
        endpoint = data["endpoint"] = {}
    for key, value in (("base_url", args.base_url), ("model", args.model), ("concurrency", args.concurrency)):
        if value is not None:
            endpoint[key] = value
    if args.serve:
        endpoint["serve"] = {**(endpoint.get("serve") or {}), "model": args.serve}
    for assignment in args.overrides:
        apply_override(data, assignment)
    return validate(LabelRunConfig, data, args.config or "saepipe label")


def run(args: argparse.Namespace) -> int:
    from pipeline.analysis.labels.run import run_labelling

    cfg = label_config(args)
    outcome = run_labelling(cfg, show_progress=not args.no_progress)
    summary = outcome.summary or {}
    if args.json:
        print(json.dumps(summary.get("overall")))
        return 0
    from pipeline.analysis.labels.report import format_labels

    print(format_labels(outcome.out_dir, summary))
    return 0
