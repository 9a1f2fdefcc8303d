"""One cell of a sweep, start to end: train (resuming from the newest checkpoint), take the trainer's held-out
evaluation, then the spliced evaluation and the analysis when the sweep asks for them, and record it all in
CELL_DIR/cell.json. Every step skips what an earlier run of the cell already finished, so a requeued, preempted or
rerun cell only does what is left; the stop flag is checked between steps (a step itself is not interrupted)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from pipeline.config.sweep import Cell, SweepConfig, SweepStages
from pipeline.hooks import NeverStop, StopCondition
from pipeline.io import atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
# How a run is launched is not what it computes (as in submission records): these may change between runs of a cell.
LAUNCH_KEYS = ("resume", "slurm", "telemetry", "lease_timeout_s")


def computed_config(train: dict) -> dict:
    return {k: v for k, v in train.items() if k not in LAUNCH_KEYS}


def step_settings(stages: SweepStages) -> dict[str, dict]:
    """The settings each enabled step ran with: a step done with other settings is done again."""
    out = {}
    if stages.spliced_eval:
        out["spliced_eval"] = {"contexts": stages.spliced_contexts}
    if stages.analysis:
        out["analysis"] = {"tokens": stages.analysis_tokens}
    return out


def read_cell(cell: Cell) -> dict:
    try:
        return json.loads((cell.run_dir / CELL_FILE).read_text())
    except (OSError, ValueError):
        return {}


def cell_done(cell: Cell, stages: SweepStages) -> bool:
    record = read_cell(cell)
    if record.get("status") != "completed":
        return False
    if record.get("config") != computed_config(cell.train.model_dump(mode="json")):
        return False
    done = record.get("steps", {})
    return all(done.get(step) == settings for step, settings in step_settings(stages).items())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resampling_summary(run_dir: Path) -> dict:
    """Rounds and latents resampled, from the trainer's resample events in metrics.jsonl."""
    rounds = resampled = 0
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record.get("event") == "resample":
            rounds += 1
            resampled += int(record.get("resampled", 0))
    return {"rounds": rounds, "resampled": resampled}


def run_cell(sweep: SweepConfig, cell: Cell, *, stop: StopCondition | None = None, callbacks: Sequence[object] = (),
             show_progress: bool = False, telemetry: bool = True, model=None) -> dict:
    """Run what is left of `cell`; returns its record (status "completed", or "preempted" when stopped).
    `callbacks` go to the trainer, next to the telemetry's; `model` (a LoadedModel of the store's model) spares the
    spliced evaluation loading its own."""
    from pipeline.telemetry import job_telemetry
    from pipeline.train.trainer import Trainer

    stop = stop or NeverStop()
    t0 = time.time()
    cfg = cell.train.model_copy(update={"resume": "auto"})
    run = cell.run_dir
    previous = read_cell(cell)
    same_config = previous.get("config") == computed_config(cfg.model_dump(mode="json"))
    steps_done: dict = dict(previous.get("steps", {})) if same_config else {}
    record = {
        "status": "running", "index": cell.index, "name": cell.name, "expansion": cell.expansion,
        "d_sae": cell.train.sae.d_sae, "l1_coefficient": cell.l1_coefficient, "resample": cell.resample,
        "config": computed_config(cfg.model_dump(mode="json")), "steps": steps_done,
    }
    tel_cfg = cfg.telemetry if telemetry else cfg.telemetry.model_copy(update={"enabled": False})
    with job_telemetry(tel_cfg, "train", cfg.run_dir, task=None, stop=stop,
                       info={"arch": cfg.sae.arch, "sweep": Path(sweep.sweep_dir).name, "cell": cell.name}) as tel, \
            Trainer(cfg, stop=stop, callbacks=[*tel.callbacks, *callbacks], show_progress=show_progress) as trainer:
        result = trainer.fit()
    if result.status == "preempted":
        return {**record, "status": "preempted", "step": result.step, "stop_reason": result.stop_reason}
    record["train"] = {"step": result.step, "tokens": result.tokens}
    record["eval"] = _read_json(run / "eval" / "final" / "eval.json")
    record["resampling"] = resampling_summary(run)
    _write(run, record)

    wanted = step_settings(sweep.stages)
    if "spliced_eval" in wanted:
        record["spliced"] = previous.get("spliced") if same_config else None
        if steps_done.get("spliced_eval") != wanted["spliced_eval"] or not record["spliced"]:
            if stop.should_stop():
                return {**record, "status": "preempted", "stop_reason": "stopped before the spliced evaluation"}
            from pipeline.analysis.spliced_eval import run_spliced_eval

            scores = run_spliced_eval(run, contexts=sweep.stages.spliced_contexts, device=sweep.stages.device,
                                      model=model, show_progress=show_progress)
            record["spliced"] = {k: v for k, v in scores.items() if isinstance(v, (int, float, str, type(None)))}
            steps_done["spliced_eval"] = wanted["spliced_eval"]
        _write(run, record)
    if "analysis" in wanted:
        if steps_done.get("analysis") != wanted["analysis"] or not (run / "analysis" / "analysis.json").exists():
            if stop.should_stop():
                return {**record, "status": "preempted", "stop_reason": "stopped before the analysis"}
            from pipeline.analysis.analyze import run_analysis

            run_analysis(run, tokens=sweep.stages.analysis_tokens, device=sweep.stages.device,
                         show_progress=show_progress)
            steps_done["analysis"] = wanted["analysis"]
        record["analysis"] = analysis_summary(run / "analysis")
    record.update(status="completed", finished_at=time.time(), seconds=round(time.time() - t0, 2))
    _write(run, record)
    log.info("sweep cell %s done: fvu %s, l0 %s, dead %s%%", cell.name, *(
        f"{record['eval'][k]:.4g}" if record.get("eval") else "?" for k in ("fvu", "l0", "dead_pct")))
    return record


def analysis_summary(directory: Path) -> dict | None:
    """What the table takes from an analysis: its directory and the features with at least 10 firing tokens (seed
    002's minimum before labelling)."""
    features = directory / "features.parquet"
    if not features.exists():
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = pq.read_table(features, columns=["count"]).column("count")
    return {"dir": str(directory), "features": len(counts),
            "features_min10": int(pc.sum(pc.greater_equal(counts, 10)).as_py() or 0)}


def _write(run: Path, record: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / CELL_FILE, record)
