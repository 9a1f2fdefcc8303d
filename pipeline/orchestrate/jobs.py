"""The jobs submitit runs: an extraction task and a training run, as submitit Checkpointables.

How preemption works here (submitit 1.5's rules, FACTS.md):
- Slurm sends USR2 `slurm.signal_delay_s` before the time limit (and on preemption where the cluster is configured
  to). submitit's handler calls `checkpoint()` on global rank 0 only, in the main thread, then runs `scontrol
  requeue` and exits. The stage therefore runs in a worker thread while the main thread waits: `checkpoint()` sets
  the stage's stop flag and waits for the worker, which commits its shards (extraction) or writes a checkpoint of the
  step it is in (training, all ranks together: the trainer's stop check is collective, so ranks that never see the
  signal's effect reach the checkpoint too), and only then returns the resubmission.
- SIGTERM (`scontrol requeue` from outside, `scancel`, node shutdown) gets a handler that sets the same flag and then
  calls submitit's own (which only logs it): the work is committed within Slurm's KillWait when it can be; if not,
  the task resumes from its last commit anyway.
- The requeued job re-runs the pickled submission, so a job holds nothing but its config and task id: it always
  resumes from what is on disk (the task's manifest, the newest valid checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import submitit

from pipeline.hooks import StopFlag
from pipeline.io import atomic_write_json

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"  # run_dir/jobs/<stage>-<task>.json: where and how often each task ran


def job_record_path(run_dir: str | Path, stage: str, task: int | None) -> Path:
    return Path(run_dir) / JOBS_DIR / (f"{stage}-{task:05d}.json" if task is not None else f"{stage}.json")


def _record_start(run_dir: str, stage: str, task: int | None, extra: dict) -> None:
    """What `saepipe status` shows besides Slurm's view: this run's node, start, restart count and log."""
    try:
        env = submitit.JobEnvironment()
        job_id, rank = env.job_id, env.global_rank
        paths = env.paths
        logs = {"stdout": str(paths.stdout), "stderr": str(paths.stderr)}
    except RuntimeError:  # not under submitit (a direct call, the debug executor)
        job_id, rank, logs = None, 0, {}
    if rank != 0:
        return
    path = job_record_path(run_dir, stage, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    # Requeues count the restarts of this job id (Slurm's own count where it gives one); a resubmission with
    # `--resume` is a new job and starts again from zero, while `runs` counts every start of the task.
    same_job = job_id is not None and previous.get("job_id") == job_id
    requeues = os.environ.get("SLURM_RESTART_COUNT")
    requeues = int(requeues) if requeues else (previous.get("restarts", 0) + 1 if same_job else 0)
    atomic_write_json(path, {
        "stage": stage, "task": task, "job_id": job_id, "node": socket.gethostname(), "pid": os.getpid(),
        "started": time.time(), "runs": previous.get("runs", 0) + 1, "restarts": requeues, **logs, **extra,
    })


class _StageJob(submitit.helpers.Checkpointable):
    """Runs `self._work(stop)` in a worker thread; `checkpoint()` (submitit, on USR2) and SIGTERM stop it cleanly."""

    stage = "stage"

    def __init__(self, config: dict, run_dir: str, task: int | None = None) -> None:
        self.config, self.run_dir, self.task = config, run_dir, task
        self._runtime = None

    def __getstate__(self) -> dict:  # what the requeued job re-runs: the config, never live state
        return {"config": self.config, "run_dir": self.run_dir, "task": self.task}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._runtime = None

    def _work(self, stop: StopFlag) -> dict:
        raise NotImplementedError

    def _start_info(self) -> dict:
        return {}

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        _record_start(self.run_dir, self.stage, self.task, self._start_info())
        stop = StopFlag()
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["result"] = self._work(stop)
            except BaseException as err:  # re-raised in the main thread, where submitit reports it
                outcome["error"] = err

        worker = threading.Thread(target=work, name=f"saepipe-{self.stage}", daemon=True)
        self._runtime = (stop, worker)
        previous_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            stop.set("SIGTERM", signum)
            if callable(previous_term):
                previous_term(signum, frame)

        signal.signal(signal.SIGTERM, on_term)
        worker.start()
        while worker.is_alive():  # a short join, so that signals reach their handlers promptly
            worker.join(0.5)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def checkpoint(self, *args, **kwargs):
        """submitit, on USR2, rank 0: stop the stage at its next safe point, wait for its commit, requeue."""
        if self._runtime is not None:
            stop, worker = self._runtime
            stop.set("USR2 (time limit or preemption)", signal.SIGUSR2)
            while worker.is_alive():
                worker.join(0.5)
        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.run_dir, self.task))


class ExtractTaskJob(_StageJob):
    stage = "extract"

    def _start_info(self) -> dict:
        from pipeline.store.layout import MANIFEST_JSON, TASKS_DIR, task_dir_name

        n = self.config.get("task", {}).get("num_tasks", 1)
        path = Path(self.config["store"]["root"]) / TASKS_DIR / task_dir_name(self.task, n) / MANIFEST_JSON
        try:
            rows = json.loads(path.read_text()).get("rows", 0)
        except (OSError, ValueError):
            rows = 0
        return {"rows_at_start": rows}  # what `saepipe status` measures this run's rate from

    def _work(self, stop: StopFlag) -> dict:
        from pipeline.config import ExtractRunConfig, validate
        from pipeline.extract.runner import ExtractionRunner
        from pipeline.telemetry import job_telemetry

        cfg = validate(ExtractRunConfig, {**self.config, "task": {**self.config.get("task", {}), "task_id": self.task}},
                       f"extraction task {self.task}")
        with job_telemetry(cfg.telemetry, "extract", cfg.store.root, task=self.task, stop=stop,
                           info={"model": cfg.model.name}) as telemetry, \
                ExtractionRunner(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=False) as runner:
            result = runner.run()
        m = result.manifest
        return {"status": result.status, "task": self.task, "rows": m["rows"], "shards": len(m["shards"]),
                "stop_reason": result.stop_reason}


class TrainJob(_StageJob):
    stage = "train"

    def _work(self, stop: StopFlag) -> dict:
        import torch

        from pipeline.config import validate
        from pipeline.config.train import TrainRunConfig
        from pipeline.io.process import keep_freed_memory_on_heap
        from pipeline.telemetry import job_telemetry
        from pipeline.train.trainer import Trainer

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # rank, world size and master from Slurm, for accelerate's env:// initialisation
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())
        log.info("training rank %d of %d on %s (local rank %d)", env.global_rank, env.num_tasks, socket.gethostname(),
                 env.local_rank)
        cfg = validate(TrainRunConfig, {**self.config, "resume": "auto"}, "training job")
        if not torch.cuda.is_available():
            keep_freed_memory_on_heap()
        with job_telemetry(cfg.telemetry, "train", cfg.run_dir, task=None, rank=env.global_rank, stop=stop,
                           info={"arch": cfg.sae.arch}) as telemetry, \
                Trainer(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=False) as trainer:
            result = trainer.fit()
        return {"status": result.status, "step": result.step, "tokens": result.tokens,
                "already_finished": result.already_finished, "stop_reason": result.stop_reason}


class AnalyzeJob(_StageJob):
    """The analysis stage after training: statistics, spliced evaluation, browser. A requeue redoes only the parts
    not yet on disk (pipeline.analysis.stage)."""

    stage = "analyze"

    def _work(self, stop: StopFlag) -> dict:
        from pipeline.analysis.stage import run_analysis_stage
        from pipeline.config import validate
        from pipeline.config.analysis import AnalysisRunConfig

        cfg = validate(AnalysisRunConfig, self.config, "analysis job")
        outcome = run_analysis_stage(cfg, stop=stop, show_progress=False)
        return {"status": outcome.status, "analysis_dir": str(outcome.analysis_dir),
                "ce_loss_score": (outcome.spliced or {}).get("ce_loss_score"),
                "browser": str(outcome.browser) if outcome.browser else None, "done_before": outcome.done_before}


class LabelJob(_StageJob):
    """Labelling after the analysis: each finished feature is cached, so a requeue asks only for the rest."""

    stage = "label"

    def _work(self, stop: StopFlag) -> dict:
        from pipeline.analysis.labels.run import run_labelling
        from pipeline.config import validate
        from pipeline.config.label import LabelRunConfig

        cfg = validate(LabelRunConfig, self.config, "labelling job")
        outcome = run_labelling(cfg, stop=stop, show_progress=False)
        overall = (outcome.summary or {}).get("overall") or {}
        return {"status": outcome.status, "out_dir": str(outcome.out_dir), "features": len(outcome.features),
                "labelled_now": outcome.labelled_now, "from_cache": outcome.from_cache,
                "detection_accuracy": (overall.get("detection") or {}).get("accuracy"),
                "fuzzing_accuracy": (overall.get("fuzzing") or {}).get("accuracy")}
