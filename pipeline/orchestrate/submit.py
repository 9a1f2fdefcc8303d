"""`saepipe submit`: the stages as submitit jobs.

- extract: the plan is made here, once (pipeline.corpus.plan), then one array job with a task per part of it.
- train: one job of `nodes` x `tasks_per_node` ranks (one per GPU); the ranks' torch.distributed environment comes
  from Slurm through submitit's TorchDistributedEnvironment.
- pipeline: the extraction array, then training with an `afterok` dependency on the whole array, then the analysis
  with an `afterok` dependency on training, then (when the pipeline config has a `label:` stage) the labelling
  after the analysis (with the local executor, which has no dependencies, the command waits for each stage instead).
- label: one job labelling features of an existing analysis (`saepipe label` as a job).
Every submission is recorded in the run directory (submission.json); `resume=True` resubmits only what is neither
finished nor queued or running.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import ExtractRunConfig
from pipeline.config.analysis import AnalysisRunConfig
from pipeline.config.train import TrainRunConfig
from pipeline.errors import ConfigError

from .executor import SUBMITIT_DIR, Cluster, make_executor
from .jobs import AnalyzeJob, ExtractTaskJob, LabelJob, TrainJob
from .record import Submission, load_submission, open_submission
from .state import ACTIVE, job_state

log = logging.getLogger(__name__)


def extraction_done(cfg: ExtractRunConfig, task: int) -> bool:
    from pipeline.store.layout import MANIFEST_JSON, TASKS_DIR, task_dir_name

    path = Path(cfg.store.root) / TASKS_DIR / task_dir_name(task, cfg.task.num_tasks) / MANIFEST_JSON
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def training_done(cfg: TrainRunConfig) -> bool:
    path = Path(cfg.run_dir) / "status.json"
    try:
        return json.loads(path.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _still_going(sub: Submission, stage: str, task: int | None, cluster: Cluster) -> bool:
    found = sub.latest_job_of(stage, task)
    return found is not None and job_state(cluster, found[0], found[1]) in ACTIVE


def _ended_well(job) -> bool:
    try:
        return job.result().get("status") in ("completed", "already_complete")
    except Exception:  # noqa: BLE001 - the job's own error; the job's log has it
        return False


def prepare_extraction(cfg: ExtractRunConfig, show_progress: bool = True) -> None:
    """Everything before the array: the checks of a local task, and the plan (made here, once, for every task)."""
    from pipeline.extract import preflight
    from pipeline.extract.model import check_model_source, load_tokenizer
    from pipeline.extract.planning import ensure_plan

    preflight.check_corpus(cfg)
    preflight.check_store(cfg)
    check_model_source(cfg.model)
    if preflight.existing_plan(cfg) is None:
        ensure_plan(cfg, load_tokenizer(cfg.model, show_progress=show_progress))


def submit_extraction(cfg: ExtractRunConfig, sub: Submission, cluster: Cluster, *, resume: bool = False) -> list:
    tasks = [t for t in range(cfg.task.num_tasks)
             if not (resume and (extraction_done(cfg, t) or _still_going(sub, "extract", t, cluster)))]
    if not tasks:
        log.info("extraction: every task is complete or still queued/running; nothing to submit")
        return []
    prepare_extraction(cfg)
    executor = make_executor(cluster, sub.run_dir, cfg.slurm, stage="extract")
    config = cfg.model_dump(mode="json")
    with executor.batch():
        jobs = [executor.submit(ExtractTaskJob(config, str(sub.run_dir), t)) for t in tasks]
    array_id = jobs[0].job_id.split("_")[0]
    sub.add_job("extract", array_id, {t: j.job_id for t, j in zip(tasks, jobs)}, str(Path(sub.run_dir) / SUBMITIT_DIR))
    sub.save()
    log.info("extraction: submitted %d task(s) as job %s (%s)", len(tasks), array_id, cluster)
    return jobs


def prepare_training(cfg: TrainRunConfig, ranks: int, store_exists: bool) -> None:
    """The checks a training job would make first, made before it waits in a queue: the world size against the
    data partitions, and (when the store is already there) the store against the config."""
    from pipeline.eval import split_shards
    from pipeline.train.data import check_enough_rows, open_dataset, owned_partitions

    owned_partitions(cfg.data.partitions, 0, ranks)
    if store_exists:
        dataset = open_dataset(cfg.data, cfg.sae.d_in)
        check_enough_rows(dataset, split_shards(dataset, cfg.data.eval_shards), cfg.train.batch_size, cfg.data.root)


def submit_training(cfg: TrainRunConfig, sub: Submission, cluster: Cluster, *, resume: bool = False,
                    after: list | None = None):
    if resume and (training_done(cfg) or _still_going(sub, "train", None, cluster)):
        log.info("training: finished or still queued/running; nothing to submit")
        return None
    slurm = cfg.slurm
    per_node = slurm.tasks_per_node or max(1, slurm.gpus_per_node)
    prepare_training(cfg, slurm.nodes * per_node, store_exists=not after)
    if after and cluster != "slurm":  # no dependencies outside Slurm: wait for the array here
        _wait_for(after, "training")
        after = None
    dependency = f"afterok:{after[0].job_id.split('_')[0]}" if after else None
    executor = make_executor(cluster, sub.run_dir, slurm, stage="train", tasks_per_node=per_node, dependency=dependency)
    job = executor.submit(TrainJob(cfg.model_dump(mode="json"), str(sub.run_dir)))
    sub.add_job("train", job.job_id, None, str(Path(sub.run_dir) / SUBMITIT_DIR))
    sub.save()
    log.info("training: submitted job %s (%d node(s) x %d rank(s)%s)", job.job_id, slurm.nodes, per_node,
             f", after {dependency}" if dependency else "")
    return job


def analysis_done(cfg: AnalysisRunConfig) -> bool:
    from pipeline.analysis.stage import analysis_complete

    return analysis_complete(cfg)


def _wait_for(after: list, what: str) -> None:
    """The local executors have no dependencies: wait here for the jobs `what` depends on."""
    for job in after:
        job.wait()
    failed = [j.job_id for j in after if not _ended_well(j)]
    if failed:
        raise ConfigError(f"{what} not started: job(s) {', '.join(failed)} did not complete")


def _submit_one(stage: str, what: str, job_type, done: bool, cfg, sub: Submission, cluster: Cluster, *,
                resume: bool, after: list | None):
    """One single-task job of a stage that runs after another job (the analysis after training, the labelling
    after the analysis)."""
    if resume and (done or _still_going(sub, stage, None, cluster)):
        log.info("%s: finished or still queued/running; nothing to submit", what)
        return None
    if after and cluster != "slurm":
        _wait_for(after, what)
        after = None
    dependency = f"afterok:{after[0].job_id}" if after else None
    executor = make_executor(cluster, sub.run_dir, cfg.slurm, stage=stage, dependency=dependency)
    job = executor.submit(job_type(cfg.model_dump(mode="json"), str(sub.run_dir)))
    sub.add_job(stage, job.job_id, None, str(Path(sub.run_dir) / SUBMITIT_DIR))
    sub.save()
    log.info("%s: submitted job %s%s", what, job.job_id, f", after {dependency}" if dependency else "")
    return job


def submit_analysis(cfg: AnalysisRunConfig, sub: Submission, cluster: Cluster, *, resume: bool = False,
                    after: list | None = None):
    return _submit_one("analyze", "analysis", AnalyzeJob, resume and analysis_done(cfg), cfg, sub, cluster,
                       resume=resume, after=after)


def label_done(cfg) -> bool:
    from pipeline.analysis.labels.progress import label_progress

    return label_progress(cfg)[2]


def submit_label(cfg, sub: Submission, cluster: Cluster, *, resume: bool = False, after: list | None = None):
    return _submit_one("label", "labelling", LabelJob, resume and label_done(cfg), cfg, sub, cluster, resume=resume,
                       after=after)


def submit(kind: str, configs: dict, run_dir: str | Path, cluster: Cluster, *, resume: bool = False) -> tuple[Submission, list]:
    """The submission record and the submitit jobs submitted now (none when everything is done or still going)."""
    dumped = {stage: cfg.model_dump(mode="json") for stage, cfg in configs.items()}
    sub = open_submission(run_dir, kind, cluster, dumped)
    jobs = submit_extraction(configs["extract"], sub, cluster, resume=resume) if "extract" in configs else []
    train_job = None
    if "train" in configs:
        train_job = submit_training(configs["train"], sub, cluster, resume=resume, after=jobs or None)
        jobs = [*jobs, *([train_job] if train_job is not None else [])]
    analyze_job = None
    if "analyze" in configs:
        analyze_job = submit_analysis(configs["analyze"], sub, cluster, resume=resume,
                                      after=[train_job] if train_job is not None else None)
        jobs = [*jobs, *([analyze_job] if analyze_job is not None else [])]
    if "label" in configs:
        job = submit_label(configs["label"], sub, cluster, resume=resume,
                           after=[analyze_job] if analyze_job is not None else None)
        jobs = [*jobs, *([job] if job is not None else [])]
    return sub, jobs


def recorded_configs(run_dir: str | Path) -> tuple[str, str, dict]:
    """(kind, cluster, {stage: validated config}) of the submission recorded in `run_dir`."""
    from pipeline.config import validate

    sub = load_submission(run_dir)
    if sub is None:
        raise ConfigError(f"{run_dir}: no submission recorded here (submission.json); submit a config first")
    from pipeline.config.label import LabelRunConfig

    models = {"extract": ExtractRunConfig, "train": TrainRunConfig, "analyze": AnalysisRunConfig,
              "label": LabelRunConfig}
    return sub.kind, sub.cluster, {s: validate(models[s], c, f"{sub.path}: {s}") for s, c in sub.configs.items()}
