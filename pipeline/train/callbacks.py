"""The events the trainer fires, for callbacks passed to Trainer(..., callbacks=[...]) (telemetry, tests, a
notebook's live plot). A callback implements any subset of these methods; the trainer calls them on every rank,
with metrics already averaged over ranks. A callback that raises is logged and the run goes on.

    on_setup(info)                       after setup: run_dir, arch, d_sae, total_steps, batch_size, world_size, rank,
                                         device, precision, start_step (> 0 when resumed), requeues
    on_step_end(step)                    after every optimiser step (keep it cheap)
    on_metrics(step, metrics)            every train.log_every steps: loss, recon_loss, aux_loss / l1_loss, l0, fvu,
                                         lambda, threshold (by recipe), lr, grad_norm, dead_pct, tokens, tokens_per_s,
                                         step_seconds, data_wait_seconds
    on_eval(step, metrics)               after a held-out evaluation (pipeline.eval metrics)
    on_checkpoint(step, path, seconds)   after a checkpoint is in place
    on_finish(result)                    the TrainResult, before fit() returns
"""
from __future__ import annotations

from pathlib import Path


class TrainCallback:
    """A no-op base to subclass; implementing the methods without it works as well."""

    def on_setup(self, info: dict) -> None: ...

    def on_step_end(self, step: int) -> None: ...

    def on_metrics(self, step: int, metrics: dict) -> None: ...

    def on_eval(self, step: int, metrics: dict) -> None: ...

    def on_checkpoint(self, step: int, path: Path, seconds: float) -> None: ...

    def on_finish(self, result) -> None: ...
