"""`saepipe sweep`: the cells of a grid as submitit jobs, one array task per cell (Slurm), or processes on this
machine (the local executor, `local_parallelism` at a time), then the results table.

- A cell that finished (its cell.json says completed, for this config and these steps) is not submitted again; on
  Slurm a cell whose latest job is still queued or running is not either. Everything else is (re)submitted.
- A cell's job is a Checkpointable: on USR2 (time limit, preemption) the trainer checkpoints the step it is in and
  submitit requeues the task, which resumes from that checkpoint (resume=auto) and skips the steps it finished.
- Submissions are recorded in SWEEP_DIR/sweep.json (job ids by cell); each start of a cell in
  SWEEP_DIR/jobs/sweep-<cell>.json (node, log, restarts), as `saepipe submit` does for its stages.
- A cell directory that holds a run of another config is refused before anything is submitted.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config.sweep import Cell, SweepConfig
from pipeline.errors import ConfigError
from pipeline.hooks import StopFlag
from pipeline.io import atomic_write_json

from .executor import SUBMITIT_DIR, make_executor
from .jobs import _StageJob, job_record_path
from .state import ACTIVE, FAILED, job_state
from .status import aligned, state_counts
from .sweep_cell import cell_done, computed_config, read_cell

log = logging.getLogger(__name__)

RECORD_FILE = "sweep.json"
STAGE = "sweep"


class SweepCellJob(_StageJob):
    """One cell: config = {"sweep": the resolved sweep config}, task = the cell's index."""

    stage = STAGE

    def _start_info(self) -> dict:
        return {"cell": self.config.get("cell_name")}

    def _work(self, stop: StopFlag) -> dict:
        import torch

        from pipeline.config import validate
        from pipeline.io.process import keep_freed_memory_on_heap

        from .sweep_cell import run_cell
        from .sweep_table import write_results

        sweep = validate(SweepConfig, self.config["sweep"], "sweep job")
        cell = sweep.cells()[self.task]
        if not torch.cuda.is_available():
            keep_freed_memory_on_heap()
        record = run_cell(sweep, cell, stop=stop)
        if record["status"] == "completed":
            write_results(sweep)
        return {"status": record["status"], "cell": cell.name, "step": (record.get("train") or {}).get("step")}


@dataclass
class SweepRecord:
    sweep_dir: Path
    config: dict
    jobs: list[dict] = field(default_factory=list)  # [{cluster, job_id, tasks: {cell index: job id}, folder, at}]

    @property
    def path(self) -> Path:
        return self.sweep_dir / RECORD_FILE

    def add(self, cluster: str, jobs: dict[int, str]) -> None:
        first = next(iter(jobs.values()))
        self.jobs.append({"cluster": cluster, "job_id": first.split("_")[0], "tasks": {str(k): v for k, v in jobs.items()},
                          "folder": str(self.sweep_dir / SUBMITIT_DIR), "submitted_at": time.time()})

    def latest(self, index: int) -> tuple[str, str, str] | None:
        """(cluster, job id, submitit folder) of the newest job that ran cell `index`."""
        for job in reversed(self.jobs):
            if str(index) in job["tasks"]:
                return job["cluster"], job["tasks"][str(index)], job["folder"]
        return None

    def save(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"config": self.config, "jobs": self.jobs})


def load_record(sweep: SweepConfig) -> SweepRecord:
    path = Path(sweep.sweep_dir) / RECORD_FILE
    config = sweep.model_dump(mode="json")
    if not path.exists():
        return SweepRecord(Path(sweep.sweep_dir), config)
    try:
        data = json.loads(path.read_text())
        return SweepRecord(Path(sweep.sweep_dir), config, list(data.get("jobs", [])))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable sweep record: {err}") from None


def check_cell_dirs(cells: list[Cell]) -> None:
    """Refuse a cell directory whose run was trained with another config: the trainer would resume it as this one."""
    for cell in cells:
        previous = cell.run_dir / "config.yaml"
        if not previous.exists():
            continue
        try:
            old = computed_config(yaml.safe_load(previous.read_text()) or {})
        except (OSError, yaml.YAMLError):
            continue  # the trainer rewrites it; a damaged one says nothing
        new = computed_config(cell.train.model_dump(mode="json"))
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differing:
            keys = []
            for k in differing:
                sub_old, sub_new = old.get(k), new.get(k)
                if isinstance(sub_old, dict) and isinstance(sub_new, dict):
                    keys += [f"{k}.{s}" for s in sorted(set(sub_old) | set(sub_new)) if sub_old.get(s) != sub_new.get(s)]
                else:
                    keys.append(k)
            raise ConfigError(f"{cell.run_dir}: this cell was trained with another config (differs in "
                              f"{', '.join(keys)}); use another sweep_dir")


def check_store(sweep: SweepConfig) -> None:
    """The checks every cell's trainer would make first, made once before anything waits in a queue."""
    from pipeline.eval import split_shards
    from pipeline.train.data import check_enough_rows, open_dataset

    dataset = open_dataset(sweep.base.data, sweep.base.sae.d_in)
    try:
        check_enough_rows(dataset, split_shards(dataset, sweep.base.data.eval_shards), sweep.base.train.batch_size,
                          sweep.base.data.root)
    finally:
        dataset.close()


@dataclass
class CellState:
    cell: Cell
    state: str  # COMPLETED, a job state, or NOT SUBMITTED
    job_id: str | None
    requeues: int


def cell_states(sweep: SweepConfig, record: SweepRecord | None = None) -> list[CellState]:
    record = record or load_record(sweep)
    out = []
    for cell in sweep.cells():
        found = record.latest(cell.index)
        if cell_done(cell, sweep.stages):
            state = "COMPLETED"
        elif found is not None:
            state = job_state(found[0], found[1], found[2])
            if state == "COMPLETED":  # the job ended without finishing the cell (stopped, not requeued)
                state = "INCOMPLETE"
        else:
            state = "NOT SUBMITTED"
        try:
            restarts = json.loads(job_record_path(sweep.sweep_dir, STAGE, cell.index).read_text()).get("restarts", 0)
        except (OSError, ValueError):
            restarts = 0
        out.append(CellState(cell, state, found[1] if found else None, int(restarts)))
    return out


def _job(sweep: SweepConfig, cell: Cell) -> SweepCellJob:
    return SweepCellJob({"sweep": sweep.model_dump(mode="json"), "cell_name": cell.name}, sweep.sweep_dir, cell.index)


def submit_sweep(sweep: SweepConfig, cluster: str, *, show_progress: bool = True) -> tuple[SweepRecord, list]:
    """Submit every cell that is neither finished nor (Slurm) still queued or running. With the local executor this
    runs the cells, `local_parallelism` at a time, and returns when all have ended; on Slurm it returns the jobs."""
    if cluster not in ("local", "slurm"):
        raise ConfigError(f"sweep executor {cluster!r}: use local or slurm")
    cells = sweep.cells()
    check_cell_dirs(cells)
    record = load_record(sweep)
    pending = []
    for state in cell_states(sweep, record):
        if state.state == "COMPLETED":
            log.info("cell %s: finished, skipped", state.cell.name)
        elif cluster == "slurm" and state.state in ACTIVE:
            log.info("cell %s: job %s is %s, not resubmitted", state.cell.name, state.job_id, state.state.lower())
        else:
            pending.append(state.cell)
    if not pending:
        return record, []
    check_store(sweep)
    executor = make_executor(cluster, sweep.sweep_dir, sweep.resolved_slurm, stage=STAGE)
    if cluster == "slurm":
        with executor.batch():
            jobs = [executor.submit(_job(sweep, c)) for c in pending]
        record.add(cluster, {c.index: j.job_id for c, j in zip(pending, jobs)})
        record.save()
        log.info("sweep: submitted %d cell(s) as array job %s", len(jobs), jobs[0].job_id.split("_")[0])
        return record, jobs
    return record, _run_locally(sweep, executor, pending, record, show_progress)


def _run_locally(sweep: SweepConfig, executor, pending: list[Cell], record: SweepRecord, show_progress: bool) -> list:
    """The local executor starts every job at once; here at most `local_parallelism` run, the rest wait."""
    from tqdm import tqdm

    queue, running, finished = list(pending), [], []
    with tqdm(total=len(pending), unit="cell", desc="sweep", disable=not show_progress) as bar:
        while queue or running:
            while queue and len(running) < sweep.local_parallelism:
                cell = queue.pop(0)
                job = executor.submit(_job(sweep, cell))
                record.add("local", {cell.index: job.job_id})
                record.save()
                running.append(job)
            time.sleep(0.2)
            for job in [j for j in running if j.done()]:
                running.remove(job)
                finished.append(job)
                bar.update(1)
    return finished


def wait(jobs: list, poll_s: float = 2.0) -> None:
    """Until every job has ended (on Slurm through sacct: a requeued task is not done)."""
    while not all(j.done() for j in jobs):
        time.sleep(poll_s)


def any_failed(states: list[CellState]) -> bool:
    return any(s.state in FAILED or s.state == "INCOMPLETE" for s in states)


def render(states: list[CellState]) -> str:
    header = ["cell", "state", "job", "steps", "fvu", "l0", "dead %", "requeues"]
    table = [header]
    for s in states:
        record = read_cell(s.cell)
        ev = record.get("eval") or {}
        step = (record.get("train") or {}).get("step")
        table.append([s.cell.name, s.state, s.job_id or "-",
                      f"{step if step is not None else '-'}/{s.cell.train.train.total_steps}",
                      *(f"{ev[k]:.4g}" if k in ev else "-" for k in ("fvu", "l0", "dead_pct")), str(s.requeues)])
    lines = [*aligned(table), state_counts([s.state for s in states], "cell")]
    for s in states:
        if s.state in FAILED or s.state == "INCOMPLETE":
            log_path = _job_log(s)
            lines.append(f"{s.cell.name}: {s.state.lower()}" + (f"; log: {log_path}" if log_path else ""))
    return "\n".join(lines)


def _job_log(state: CellState) -> str | None:
    try:
        record = json.loads(job_record_path(state.cell.run_dir.parent.parent, STAGE, state.cell.index).read_text())
    except (OSError, ValueError):
        return None
    return record.get("stderr")
