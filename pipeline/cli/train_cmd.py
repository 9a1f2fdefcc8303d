"""`saepipe train CONFIG [dotted.key=value ...] [--resume]`: fit an SAE on a stored activation dataset.

Runs as is on one process, or data-parallel under a launcher whose env the Accelerator reads:
  accelerate launch --multi_gpu --num_processes N -m pipeline.cli.main train CONFIG ...   (also on CPU, over gloo;
      accelerate's --cpu flag starts a single process)
  torchrun --nproc_per_node N -m pipeline.cli.main train CONFIG ...
Exit codes: 0 trained and exported to run_dir/final; 75 (EX_TEMPFAIL) a SIGTERM/SIGUSR1/SIGUSR2 arrived, the step it
landed in was checkpointed, relaunch with --resume to continue; 2 bad input. Under torchrun / accelerate launch the
launcher reports any non-zero worker exit as its own failure (1): requeue on anything but 0 and always pass --resume
(or set `resume: auto`), which starts fresh when there is no checkpoint."""
from __future__ import annotations

import argparse

from pipeline.config import load_config
from pipeline.config.train import TrainRunConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a sparse autoencoder on stored activations (exit 75: checkpointed on a signal, rerun with --resume)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML run config (pipeline.config.train.TrainRunConfig)")
    # REMAINDER, so that --resume may come before, between or after the overrides (plain nargs="*" stops at it).
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="dotted overrides, e.g. train.lr=1e-4 sae.k=64")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint (same as resume=auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.train.signals import EXIT_PREEMPTED
    from pipeline.train.trainer import train

    resume = args.resume or "--resume" in args.overrides
    overrides = [o for o in args.overrides if o != "--resume"] + (["resume=auto"] if resume else [])
    cfg = load_config(TrainRunConfig, args.config, overrides)
    result = train(cfg)
    return EXIT_PREEMPTED if result.status == "preempted" else 0
