"""`saepipe train CONFIG [dotted.key=value ...] [--resume]`: fit an SAE on a stored activation dataset.

Runs as is on one process, or data-parallel under a launcher whose env the Accelerator reads:
  accelerate launch --multi_gpu --num_processes N -m pipeline.cli.main train CONFIG ...   (also on CPU, over gloo;
      accelerate's --cpu flag starts a single process)
  torchrun --nproc_per_node N -m pipeline.cli.main train CONFIG ...
Exit codes: 0 trained and exported to run_dir/final (or the run had already finished: it says so); 75 (EX_TEMPFAIL)
a SIGTERM/SIGUSR1/SIGUSR2 arrived, the step it landed in was checkpointed, relaunch with --resume to continue; 2 bad
input. Under torchrun / accelerate launch the launcher reports any non-zero worker exit as its own failure (1):
requeue on anything but 0 and always pass --resume (or set `resume: auto`), which starts fresh when there is no
checkpoint. Config keys: `saepipe config keys train`."""
from __future__ import annotations

import argparse
import os

from pipeline.config import load_config
from pipeline.config.train import TrainRunConfig


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "train", parents=[common],
        help="train a sparse autoencoder on stored activations (exit 75: checkpointed on a signal, rerun with --resume)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML run config (see configs/sae-demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4 sae.k=64")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint (same as resume=auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.io.process import EXIT_PREEMPTED, keep_freed_memory_on_heap, signal_stop
    from pipeline.telemetry import job_telemetry
    from pipeline.train.trainer import Trainer

    cfg = load_config(TrainRunConfig, args.config, [*args.overrides, *(["resume=auto"] if args.resume else [])])
    if cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory_on_heap()
    # under accelerate launch / torchrun every rank runs this command and exports its own metrics
    rank = int(os.environ.get("RANK", "0"))
    with signal_stop() as stop, \
            job_telemetry(cfg.telemetry, "train", cfg.run_dir, task=None, rank=rank, stop=stop,
                          info={"arch": cfg.sae.arch}) as telemetry, \
            Trainer(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=not args.no_progress) as trainer:
        result = trainer.fit()
    if result.already_finished:
        print(f"run {cfg.run_dir} had already finished at step {result.step}; nothing to do (export: {cfg.run_dir}/final)")
    return EXIT_PREEMPTED if result.status == "preempted" else 0
