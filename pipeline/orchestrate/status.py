"""`saepipe status RUN_DIR`: one row per task of a submitted run, from what the cluster says (the job's state through
submitit) and what the run directory says (the task's manifest, the trainer's metrics and checkpoints, the job
records the tasks write when they start)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ExtractRunConfig
from pipeline.config.train import TrainRunConfig

from pipeline.io import read_jsonl

from .jobs import job_record_path
from .record import load_submission
from .state import FAILED, job_state


@dataclass
class TaskRow:
    stage: str
    task: str
    job_id: str | None
    state: str  # the job's state, or COMPLETED from the run directory when no job ran it here
    done: int  # tokens (extraction) or steps (training)
    total: int
    unit: str
    rate: float | None  # per second
    eta_s: float | None
    last_commit_age_s: float | None  # the last shard or checkpoint
    requeues: int
    node: str | None
    log: str | None

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def extraction_rows(cfg: ExtractRunConfig, sub, now: float) -> list[TaskRow]:
    from pipeline.corpus import load_plan
    from pipeline.store.layout import MANIFEST_JSON, TASKS_DIR, task_dir_name

    plan = load_plan(cfg.store.root)
    rows = []
    for t in range(cfg.task.num_tasks):
        manifest_path = Path(cfg.store.root) / TASKS_DIR / task_dir_name(t, cfg.task.num_tasks) / MANIFEST_JSON
        manifest = _read_json(manifest_path)
        found = sub.latest_job_of("extract", t) if sub else None
        state = job_state(sub.cluster, *found) if found else ("COMPLETED" if manifest.get("complete") else "NOT SUBMITTED")
        if manifest.get("complete") and state not in FAILED:
            state = "COMPLETED"
        record = _read_json(job_record_path(sub.run_dir, "extract", t)) if sub else {}
        contexts = manifest.get("contexts", 0)
        done = manifest.get("rows", 0) + contexts * cfg.extract.exclude_first  # tokens, BOS aside
        total = plan.task_tokens(t) if plan else done
        started, rows_at_start = record.get("started"), record.get("rows_at_start", 0)
        rate = None
        if manifest.get("complete"):
            rate = manifest.get("stats", {}).get("tokens_per_second")
        elif started and manifest_path.exists() and manifest.get("rows", 0) > rows_at_start:
            rate = (manifest["rows"] - rows_at_start) / max(manifest_path.stat().st_mtime - started, 1e-9)
        age = now - manifest_path.stat().st_mtime if manifest_path.exists() else None
        rows.append(TaskRow("extract", str(t), found[0] if found else None, state, done, total, "tok", rate,
                            (total - done) / rate if rate and not manifest.get("complete") else None, age,
                            int(record.get("restarts", 0)), record.get("node"), record.get("stdout")))
    return rows


def training_row(cfg: TrainRunConfig, sub, now: float) -> TaskRow:
    run = Path(cfg.run_dir)
    status = _read_json(run / "status.json")
    last = next((r for r in reversed(read_jsonl(run / "metrics.jsonl")) if "loss" in r), {})
    found = sub.latest_job_of("train", None) if sub else None
    state = job_state(sub.cluster, *found) if found else ("COMPLETED" if status else "NOT SUBMITTED")
    if status.get("status") == "completed" and state not in FAILED:
        state = "COMPLETED"
    record = _read_json(job_record_path(sub.run_dir, "train", None)) if sub else {}
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    step, total = int(status.get("step", last.get("step", 0))), cfg.train.total_steps
    rate = 1.0 / last["step_seconds"] if last.get("step_seconds") else None
    return TaskRow("train", "-", found[0] if found else None, state, step, total, "steps", rate,
                   (total - step) / rate if rate and not status else None,
                   now - checkpoints[-1].stat().st_mtime if checkpoints else None,
                   int(record.get("restarts", 0)), record.get("node"), record.get("stdout"))


def _single_job(sub, stage: str, finished: bool) -> tuple[str | None, str, dict]:
    """(job id, state, job record) of a one-task stage; COMPLETED from the disk when its outputs are all there, unless
    its last job failed."""
    found = sub.latest_job_of(stage, None) if sub else None
    state = job_state(sub.cluster, *found) if found else ("COMPLETED" if finished else "NOT SUBMITTED")
    if finished and state not in FAILED:
        state = "COMPLETED"
    record = _read_json(job_record_path(sub.run_dir, stage, None)) if sub else {}
    return (found[0] if found else None), state, record


def analysis_row(cfg, sub) -> TaskRow:
    """Progress in parts done of the stage's three (statistics, spliced evaluation, browser)."""
    from pipeline.analysis.stage import analysis_dir, browser_index, spliced_path

    out = analysis_dir(cfg)
    parts = [(out / "analysis.json", True), (spliced_path(cfg), cfg.spliced_eval), (browser_index(cfg), cfg.browser)]
    wanted = [p for p, on in parts if on]
    done = sum(p.is_file() for p in wanted)
    job_id, state, record = _single_job(sub, "analyze", done == len(wanted))
    stamps = [p.stat().st_mtime for p in wanted if p.is_file()]
    return TaskRow("analyze", "-", job_id, state, done, len(wanted), "parts", None, None,
                   time.time() - max(stamps) if stamps else None, int(record.get("restarts", 0)), record.get("node"),
                   record.get("stdout"))


def label_row(cfg, sub) -> TaskRow:
    """Progress in features labelled (cached) of those selected; complete once labels.json covers them all."""
    from pipeline.analysis.labels.progress import label_progress

    done, total, finished = label_progress(cfg)
    job_id, state, record = _single_job(sub, "label", finished)
    return TaskRow("label", "-", job_id, state, done, total, "features", None, None, None,
                   int(record.get("restarts", 0)), record.get("node"), record.get("stdout"))


def status_rows(run_dir: str | Path) -> list[TaskRow]:
    from .submit import recorded_configs

    sub = load_submission(run_dir)
    _, _, configs = recorded_configs(run_dir)
    now = time.time()
    rows = []
    if "extract" in configs:
        rows += extraction_rows(configs["extract"], sub, now)
    if "train" in configs:
        rows.append(training_row(configs["train"], sub, now))
    if "analyze" in configs:
        rows.append(analysis_row(configs["analyze"], sub))
    if "label" in configs:
        rows.append(label_row(configs["label"], sub))
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _amount(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def render(rows: list[TaskRow]) -> str:
    header = ["stage", "task", "job", "state", "progress", "%", "rate/s", "eta", "last commit", "requeues", "node", "log"]
    table = [header]
    for r in rows:
        table.append([r.stage, r.task, r.job_id or "-", r.state, f"{_amount(r.done)}/{_amount(r.total)} {r.unit}",
                      f"{r.percent:.0f}", _amount(r.rate) if r.rate else "-", _duration(r.eta_s),
                      _duration(r.last_commit_age_s) + (" ago" if r.last_commit_age_s is not None else ""),
                      str(r.requeues), r.node or "-", r.log or "-"])
    return "\n".join([*aligned(table), state_counts([r.state for r in rows], "task")])


def aligned(table: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def state_counts(states: list[str], noun: str) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return f"{len(states)} {noun}(s): " + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))


def as_json(rows: list[TaskRow]) -> list[dict]:
    return [{**asdict(r), "percent": round(r.percent, 2)} for r in rows]


def any_failed(rows: list[TaskRow]) -> bool:
    return any(r.state in FAILED for r in rows)
