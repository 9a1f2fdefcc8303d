"""Telemetry: every job (extraction task, training rank; local or Slurm) exports its stage's metrics, its host's and
process's, and its GPUs' to Prometheus, and announces itself for file-based discovery. It hangs off the stages'
callback seams; no stage imports it.

    with job_telemetry(cfg.telemetry, "train", run_dir, task=None, rank=rank, stop=stop) as tel:
        Trainer(cfg, stop=stop, callbacks=tel.callbacks).fit()
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.telemetry import TelemetryConfig

from .exporter import Exporter
from .labels import job_labels, run_name
from .stage_metrics import ExtractMetrics, TrainMetrics

log = logging.getLogger(__name__)

__all__ = ["JobTelemetry", "job_telemetry", "Exporter", "ExtractMetrics", "TrainMetrics"]


class JobTelemetry:
    """A job's exporter and the callbacks that feed it. Closing waits the grace period only after a stage that
    completed (a stopped job is requeued and announces itself again)."""

    def __init__(self, exporter: Exporter | None, metrics) -> None:
        self.exporter, self.metrics = exporter, metrics
        self.completed = False

    @property
    def callbacks(self) -> list:
        return [self.metrics, self] if self.exporter is not None else []

    def on_finish(self, result) -> None:
        self.completed = getattr(result, "status", None) in ("completed", "already_complete")

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close(grace=self.completed)
            self.exporter = None

    def __enter__(self) -> "JobTelemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def job_telemetry(cfg: TelemetryConfig, stage: str, directory: str | Path, *, task: int | None, rank: int = 0,
                  stop=None, info: dict | None = None) -> JobTelemetry:
    """The job's telemetry, started; a disabled one (no callbacks) when `cfg.enabled` is off or no port is free
    (a job without metrics beats a job that does not run)."""
    metrics_type = ExtractMetrics if stage == "extract" else TrainMetrics
    if not cfg.enabled:
        return JobTelemetry(None, None)
    labels = job_labels(run_name(cfg.run_name, str(directory)), stage, task, rank)
    exporter = Exporter(cfg, labels, watch_path=str(directory), extra_info=info, stop=stop)
    metrics = metrics_type(exporter.registry)
    try:
        exporter.start()
    except OSError as err:
        log.warning("%s; this job runs without metrics", err)
        return JobTelemetry(None, None)
    return JobTelemetry(exporter, metrics)
