"""`saepipe sweep CONFIG [key=value ...] [--executor local|slurm] [--wait]`: seed 002's grid (expansion factor × λ ×
resampling on/off) around a base training run, one submitit task per cell: each trains its SAE in
SWEEP_DIR/cells/<cell>, takes the held-out evaluation and, where the config asks, the spliced evaluation
(ce_loss_score) and the analysis. Then the results table (results.csv, results.md) and plots (fvu_vs_l0.png,
dead_by_expansion.png) in SWEEP_DIR, next to seed 002's published numbers.

Run it again to resume: finished cells are skipped, unfinished ones resume from their newest checkpoint (a cell
requeued by Slurm on USR2 does so by itself). The local executor runs the cells here and waits; on Slurm the command
returns after submitting the array (`--wait` waits), and each cell rebuilds the table when it finishes.
  saepipe sweep CONFIG --status     what every cell is doing (exit 1 when one failed)
  saepipe sweep CONFIG --table      rebuild the table and plots from what the cells have written
Config: configs/sweep-demo.yaml (a tiny grid), configs/sweep-seed002.yaml (the full grid, for Slurm)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sweep", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="seed 002's expansion x λ x resampling grid as a submitit array, and its results table")
    p.add_argument("config", help="sweep YAML (configs/sweep-demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the sweep file, e.g. grid.expansion_factors=[4,8] base.train.steps=100")
    p.add_argument("--executor", choices=["auto", "local", "slurm"], default=None,
                   help="where the cells run (default: the config's `executor`; auto: slurm where sbatch exists)")
    p.add_argument("--wait", action="store_true", help="on Slurm: wait for the cells, then write the table")
    p.add_argument("--status", action="store_true", help="print every cell's state; submit nothing")
    p.add_argument("--table", action="store_true", help="rebuild the results table and plots; submit nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from pipeline.config.sweep import load_sweep_config
    from pipeline.orchestrate.sweep import any_failed, cell_states, render, submit_sweep, wait
    from pipeline.orchestrate.sweep_table import write_results

    cfg = load_sweep_config(args.config, args.overrides)
    if args.status:
        states = cell_states(cfg)
        print(render(states))
        return 1 if any_failed(states) else 0
    if args.table:
        paths = write_results(cfg)
        print(f"results: {paths['markdown']} ({paths['csv']}, {paths['fvu_plot'].name}, {paths['dead_plot'].name})")
        return 0
    executor = args.executor or cfg.executor
    cluster = executor if executor != "auto" else ("slurm" if shutil.which("sbatch") else "local")
    record, jobs = submit_sweep(cfg, cluster, show_progress=not args.no_progress)
    if not jobs:
        print("nothing to submit: every cell is finished" + (", or queued or running" if cluster == "slurm" else ""))
    elif cluster == "slurm":
        print(f"submitted {len(jobs)} cell(s) to slurm as array job {jobs[0].job_id.split('_')[0]}; record: "
              f"{record.path}; follow with `saepipe sweep {args.config} --status`")
    if cluster == "slurm" and not args.wait:
        return 0
    wait(jobs)
    paths = write_results(cfg)
    states = cell_states(cfg)
    print(render(states))
    print(f"results: {paths['markdown']}")
    return 1 if any_failed(states) else 0
