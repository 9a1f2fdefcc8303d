"""`saepipe report RUN [--tokens N] [--top 64] [--latents 5] [--examples 8]`: seed 000's checks of a training run on
its held-out shards: the dead-latent share; the loss before and after each resampling round (from the run's
metrics.jsonl; "no resampling in this run" otherwise); the reconstruction (FVU) keeping only the top-64 active latents
of each token against all of them; and, for the latents whose zeroing costs the most, the tokens whose reconstruction
suffers most, shown in context through the store's reverse lookup. Writes RUN/report/ (report.md, report.json,
density.png, resampling.png, topk.png, ablation.png; replaced whole) and prints a summary."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="seed 000's checks of a training run (dead latents, resampling, top-64, ablation)")
    p.add_argument("run", help="a training run directory (config.yaml, final/, metrics.jsonl)")
    p.add_argument("--store", default=None, help="the activation store (default: the run's data.root)")
    p.add_argument("--out", default=None, help="report directory (default: RUN/report)")
    p.add_argument("--tokens", type=int, default=16_384, help="held-out tokens read (default 16384; 0: all)")
    p.add_argument("--top", type=int, default=64, help="latents kept per token in the top-k reconstruction")
    p.add_argument("--latents", type=int, default=5, help="latents ablated")
    p.add_argument("--examples", type=int, default=8, help="tokens shown per ablated latent")
    p.add_argument("--context", type=int, default=8, help="context tokens shown each side of a token")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.analysis.report import run_report, summary

    report = run_report(args.run, store=args.store, out=args.out, tokens=args.tokens or None, top=args.top,
                        latents=args.latents, examples=args.examples, context_tokens=args.context,
                        batch_size=args.batch_size, device=args.device, show_progress=not args.no_progress)
    print(json.dumps(report.to_json(), indent=2) if args.json else summary(report))
    return 0
