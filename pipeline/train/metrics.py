"""Training metrics: one JSON object per line in run_dir/metrics.jsonl, and callbacks `on_metrics(step, dict)` that
other stages (telemetry) register on the trainer instead of reaching into it."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MetricsHook = Callable[[int, dict], None]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing the writer
    return value


class MetricsLog:
    """Appends records to a JSONL file. On resume, records past the resumed step (written after the last checkpoint by
    the interrupted run) are dropped so every step appears once."""

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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


_failed_hooks: set[int] = set()


def call_hooks(hooks: list[MetricsHook], step: int, metrics: dict) -> None:
    for hook in hooks:
        try:
            hook(step, dict(metrics))
        except Exception as err:  # a broken exporter must not kill a multi-day run
            if id(hook) in _failed_hooks:
                log.warning("metrics hook %r failed again at step %d: %r", hook, step, err)
            else:  # the traceback once
                _failed_hooks.add(id(hook))
                log.exception("metrics hook %r failed at step %d", hook, step)
