"""Loss before and after each dead-latent resampling round (seed 000), from a training run's metrics.jsonl: the
trainer's resample events (the loss on the round's own sample just before and just after the edit) and, around each
round, the training loss of the logging interval that ended at or before it and of the first one after it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.io import read_jsonl


@dataclass
class ResampleRound:
    step: int
    round: int
    resampled: int
    sample_rows: int
    loss_before: float
    loss_after: float
    recon_loss_before: float
    recon_loss_after: float
    fvu_before: float
    fvu_after: float
    train_loss_before: float | None  # the logging interval ending at or before the round
    train_loss_after: float | None  # the first logging interval after it
    train_step_after: int | None


@dataclass
class TrainingLog:
    steps: list[int]
    loss: list[float]
    recon_loss: list[float]
    dead_pct: list[float]
    rounds: list[ResampleRound]


def _number(value) -> float:
    return float(value) if value is not None else float("nan")  # "nan"/"inf" strings parse too


def read_training_log(run_dir: str | Path) -> TrainingLog:
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    steps = [int(r["step"]) for r in train]
    rounds = []
    for r in (r for r in records if r.get("event") == "resample"):
        step = int(r["step"])
        before = [t for t in train if t["step"] <= step]
        after = [t for t in train if t["step"] > step]
        rounds.append(ResampleRound(
            step=step, round=int(r.get("round", 0)), resampled=int(r.get("resampled", 0)),
            sample_rows=int(r.get("sample_rows", 0)),
            **{k: _number(r.get(k)) for k in ("loss_before", "loss_after", "recon_loss_before", "recon_loss_after",
                                              "fvu_before", "fvu_after")},
            train_loss_before=_number(before[-1]["loss"]) if before else None,
            train_loss_after=_number(after[0]["loss"]) if after else None,
            train_step_after=int(after[0]["step"]) if after else None,
        ))
    return TrainingLog(steps, [_number(r["loss"]) for r in train], [_number(r.get("recon_loss")) for r in train],
                       [_number(r.get("dead_pct")) for r in train], rounds)
