"""`saepipe submit extract|train|label|pipeline CONFIG [key=value ...] [--cluster slurm|local|debug]`: the stage(s) as
submitit jobs; `saepipe submit KIND --resume RUN_DIR` resubmits the recorded run's unfinished or failed tasks.

extract: the plan is made first (once), then one array job, a task per part. train: one job, a rank per GPU.
pipeline (configs/pipeline-demo.yaml): the extraction array, then training after the whole array has succeeded,
then the analysis of the trained SAE (feature statistics, spliced CE/KL evaluation, the browser) after training,
then, when the config has a `label:` stage, the LLM labelling of its features after the analysis. label
(configs/label-demo.yaml): one job labelling an existing analysis; its record is kept in the analysis dir.
The run directory (extract: store.root; train: run_dir; pipeline: its run_dir) records every job; `saepipe status
RUN_DIR` shows what each task is doing. Jobs checkpoint and requeue themselves on USR2 (time limit, preemption).
Resources: each stage config's `slurm:` section (`saepipe config keys extract | grep slurm`)."""
from __future__ import annotations

import argparse

KINDS = ("extract", "train", "label", "pipeline")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("submit", parents=[common], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="submit extraction, training, labelling or the whole pipeline as Slurm jobs")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("config", nargs="?", help="the stage's YAML config (a pipeline config for `pipeline`)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                   help="where jobs run (default: slurm where sbatch exists, else local; with --resume: as recorded)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="resubmit the unfinished or failed tasks of the run recorded in RUN_DIR")
    p.add_argument("--wait", action="store_true", help="wait for the jobs to end, then print the status")
    p.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> tuple[str, dict]:
    from pipeline.config import ExtractRunConfig, load_config
    from pipeline.config.pipeline import load_pipeline_config
    from pipeline.config.train import TrainRunConfig
    from pipeline.errors import ConfigError

    if args.config is None:
        raise ConfigError(f"saepipe submit {args.kind}: give a CONFIG, or --resume RUN_DIR")
    if args.kind == "extract":
        cfg = load_config(ExtractRunConfig, args.config, args.overrides)
        return cfg.store.root, {"extract": cfg}
    if args.kind == "train":
        cfg = load_config(TrainRunConfig, args.config, args.overrides)
        return cfg.run_dir, {"train": cfg}
    if args.kind == "label":
        from pipeline.analysis.labels.run import labels_dir_of
        from pipeline.config.label import LabelRunConfig

        cfg = load_config(LabelRunConfig, args.config, args.overrides)
        return str(labels_dir_of(cfg)), {"label": cfg}  # the record sits next to the labels
    return load_pipeline_config(args.config, args.overrides)


def run(args: argparse.Namespace) -> int:
    import shutil

    from pipeline.errors import ConfigError
    from pipeline.orchestrate.status import any_failed, render, status_rows
    from pipeline.orchestrate.submit import recorded_configs, submit

    if args.resume:
        kind, cluster, configs = recorded_configs(args.resume)
        if kind != args.kind:
            raise ConfigError(f"{args.resume}: holds a `{kind}` submission, not `{args.kind}`")
        run_dir = args.resume
        cluster = args.cluster or cluster
    else:
        run_dir, configs = _configs(args)
        cluster = args.cluster or ("slurm" if shutil.which("sbatch") else "local")
    sub, jobs = submit(args.kind, configs, run_dir, cluster, resume=bool(args.resume))
    if jobs:
        print(f"submitted to {cluster}: " + ", ".join(f"job {j.job_id}" for j in jobs)
              + f"; record: {sub.path}; follow with `saepipe status {run_dir}`")
    else:
        print("nothing to submit: every task is finished, or queued or running")
    if args.wait or cluster != "slurm":  # the local executors' jobs are this process's children: wait for them
        for job in jobs:
            job.wait()
        rows = status_rows(run_dir)
        print(render(rows))
        return 1 if any_failed(rows) else 0
    return 0
