"""Training metrics: running sums over the logging interval (kept on the device, so that logging costs no per-step
host sync) and one JSON object per line in run_dir/metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.io import atomic_write_text


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing the writer
    return value


class IntervalMeans:
    """Means of per-step scalar tensors over the steps since the last `take()`; `every` is the logging cadence."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            v = value.detach().float()
            self._sums[name] = self._sums[name] + v if name in self._sums else v.clone()
        self.steps += 1

    def take(self) -> tuple[list[str], torch.Tensor]:
        """(names, means as one tensor) and a fresh interval."""
        names = sorted(self._sums)
        means = torch.stack([self._sums[n] for n in names]) / max(self.steps, 1) if names else torch.zeros(0)
        self._sums, self.steps = {}, 0
        return names, means


class MetricsLog:
    """Appends records to a JSONL file. On resume, records past the resumed step (written after the last checkpoint by
    the interrupted run) are dropped so that every step appears once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
