"""`saepipe export delphi RUN OUT [--tokens N] [--splits S]`: the SAE's activations on held-out contexts in EleutherAI
delphi's latent cache layout (OUT/<hookpoint>/<start>_<end>.safetensors with locations, activations and tokens, plus
config.json), for running delphi's explainers and scorers on a GPU machine. RUN is a training run dir or a
SAELens-format SAE dir (with --store). The SAELens export of a training run is RUN/final, written by training."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="export SAE activations for other tools (delphi)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    d = formats.add_parser("delphi", parents=[common], help="delphi's latent cache", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("run", help="training run dir, or a SAELens-format SAE dir")
    d.add_argument("out", help="output directory (replaced whole when it is a delphi cache already)")
    d.add_argument("--store", help="activation store (default: the run's)")
    d.add_argument("--tokens", type=int, help="stored tokens to encode, in whole contexts (default: all held out)")
    d.add_argument("--splits", type=int, default=5, help="latent ranges, one file each (default 5, delphi's)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default auto)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_delphi)


def run_delphi(args: argparse.Namespace) -> int:
    from pipeline.analysis.delphi_export import export_delphi

    module = export_delphi(args.run, args.out, store=args.store, tokens=args.tokens, n_splits=args.splits,
                           device=args.device, show_progress=not args.no_progress)
    files = sorted(p.name for p in module.glob("*.safetensors"))
    print(f"delphi latent cache: {module} ({len(files)} splits: {', '.join(files)}; config.json)")
    return 0
