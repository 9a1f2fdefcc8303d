"""`saepipe analyze RUN [--store ROOT] [--out DIR] [--tokens N] [--top-k K] ...`: one streaming pass of held-out store
rows through an SAE; per-feature statistics, exact top-k examples and interval samples go to an analysis directory
(analysis.json, features.parquet, examples.parquet; readable with pyarrow or DuckDB).

RUN is a training run dir (its config.yaml names the store and the held-out shards; the output defaults to
RUN/analysis) or any SAELens-format SAE dir (then --out is needed, and --store unless its cfg.json metadata names an
existing activation_store; the held-out shards are those split_shards(store, 1) holds out, or --shards)."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("analyze", parents=[common], help="per-feature statistics and top examples of an SAE",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="training run dir, or a SAELens-format SAE dir")
    p.add_argument("--store", help="activation store root (default: the run's data.root)")
    p.add_argument("--out", help="analysis directory (default RUN/analysis for a training run)")
    p.add_argument("--tokens", type=int, help="token budget, taken from the held-out shards in order (default: all)")
    p.add_argument("--shards", help="store shards to analyse instead of the held-out ones, e.g. 0,3,5-7")
    p.add_argument("--top-k", type=int, default=20, help="top-activating examples kept per feature (default 20)")
    p.add_argument("--intervals", type=int, default=10, help="equal-width activation intervals sampled (default 10)")
    p.add_argument("--samples", type=int, default=5, help="random examples per interval (default 5)")
    p.add_argument("--bins", type=int, default=40, help="activation histogram bins (default 40)")
    p.add_argument("--window", type=int, default=16, help="tokens each side of an example's token (default 16)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per encode batch (default 4096)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the interval samples (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.analysis.analyze import run_analysis
    from pipeline.analysis.source import parse_shards
    from pipeline.analysis.summary import format_summary, summarize

    shards = parse_shards(args.shards) if args.shards is not None else None
    out = run_analysis(args.run, store=args.store, out=args.out, tokens=args.tokens, top_k=args.top_k,
                       n_intervals=args.intervals, samples_per_interval=args.samples, hist_bins=args.bins,
                       window=args.window, batch_size=args.batch_size, device=args.device,
                       show_progress=not args.no_progress, shards=shards, seed=args.seed)
    summary = summarize(out)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0
