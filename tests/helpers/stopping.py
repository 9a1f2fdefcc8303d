"""Stop conditions for in-process tests: a StopFlag raised by a callback once a stage reaches a given point."""
from __future__ import annotations

from pipeline.hooks import StopFlag


class StopAfterStep(StopFlag):
    """A trainer stop condition that is raised right after step `step` (the trainer then checkpoints that step)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step_end(self, step: int) -> None:
        if step == self.step:
            self.set(f"test stop after step {step}")


class StopAfterShards(StopFlag):
    """An extraction stop condition raised once `shards` shards have been committed."""

    def __init__(self, shards: int) -> None:
        super().__init__()
        self.shards = shards

    def on_shard_committed(self, info: dict) -> None:
        if info["total_shards"] >= self.shards:
            self.set(f"test stop after {info['total_shards']} shards")
