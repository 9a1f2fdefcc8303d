"""The stages' own metrics as Prometheus series, fed by the stages' callback events (pipeline.extract.callbacks,
pipeline.train.callbacks). Each event does a few counter increments or gauge sets: nothing that a forward pass or an
optimiser step would notice (benchmarks/telemetry.py: overhead)."""
from __future__ import annotations

import math
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge


class _Progress:
    """What every stage reports: progress against a target, when it last moved, requeues, whether it ended."""

    def __init__(self, registry: CollectorRegistry, unit: str) -> None:
        self.done = Gauge("saepipe_progress_done", f"Work done so far ({unit}).", registry=registry)
        self.target = Gauge("saepipe_progress_target", f"Work this task has to do ({unit}).", registry=registry)
        self.last = Gauge("saepipe_last_progress_time_seconds", "When the task last made progress (unix time).",
                          registry=registry)
        self.requeues = Gauge("saepipe_requeues", "Times this task was requeued or resumed.", registry=registry)
        self.finished = Gauge("saepipe_finished", "1 once the stage has ended (completed or stopped).", registry=registry)
        self.last.set(time.time())
        self.requeues.set(int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))

    def moved(self, done: float) -> None:
        self.done.set(done)
        self.last.set(time.time())


class ExtractMetrics:
    """Callbacks for ExtractionRunner."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.progress = _Progress(r, "tokens")
        self.tokens = Counter("saepipe_extract_tokens", "Activation rows (tokens) computed this run.", registry=r)
        self.documents = Counter("saepipe_extract_documents", "Documents begun this run.", registry=r)
        self.shards = Counter("saepipe_extract_shards", "Shards committed this run.", registry=r)
        self.bytes = Counter("saepipe_extract_written_bytes", "Shard bytes committed this run.", registry=r)
        self.skips = Counter("saepipe_extract_skipped_records", "Bad records skipped, by reason.", ["reason"], registry=r)
        self.queue = Gauge("saepipe_extract_writer_queue_shards", "Shards waiting in the writer.", registry=r)
        self.prefetched = Gauge("saepipe_extract_prefetched_shards", "Shards the corpus thread has ready.", registry=r)
        self.forward = Counter("saepipe_extract_forward_seconds", "Time in forward passes this run.", registry=r)
        self.rate = Gauge("saepipe_extract_tokens_per_second", "Tokens per second over the last ~10 s.", registry=r)
        self.last_shard = Gauge("saepipe_extract_last_shard_time_seconds", "When the last shard was committed.", registry=r)
        self._base = self._done = self._target = 0
        self._window: tuple[float, int] = (time.monotonic(), 0)

    def on_setup(self, info: dict) -> None:
        self._base = info.get("resumed_rows", 0)
        self._done = 0
        self._target = info.get("token_target") or 0
        if self._target:
            self.progress.target.set(self._target)
        self.progress.moved(self._base)

    def on_batch(self, m: dict) -> None:
        self.tokens.inc(m["tokens"])
        self.documents.inc(m.get("documents", 0))
        self.forward.inc(m["forward_seconds"])
        self.queue.set(m["pending_shards"])
        self.prefetched.set(m["prefetched_shards"])
        self._done += m.get("body_tokens", m["tokens"])
        self.progress.moved(self._base + self._done)
        t0, n0 = self._window
        now = time.monotonic()
        if now - t0 >= 10.0 or n0 == 0:
            if now > t0 and n0:
                self.rate.set((self._done - n0) / (now - t0))
            self._window = (now, self._done)

    def on_shard_committed(self, info: dict) -> None:
        self.shards.inc()
        self.bytes.inc(info["bytes"])
        self.last_shard.set(time.time())

    def on_skip(self, reason: str, count: int) -> None:
        self.skips.labels(reason=reason).inc(count)

    def on_finish(self, result) -> None:
        if result.status in ("completed", "already_complete"):
            self.progress.moved(self._target or self._base + self._done)
        self.progress.finished.set(1)


_LOSS_TERMS = {"loss": "total", "recon_loss": "recon", "aux_loss": "aux", "l1_loss": "l1"}


class TrainMetrics:
    """Callbacks for Trainer (every rank; the metrics are already averaged over ranks)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.progress = _Progress(r, "steps")
        self.step = Gauge("saepipe_train_step", "Optimiser steps done.", registry=r)
        self.target = Gauge("saepipe_train_target_steps", "Steps the run will take.", registry=r)
        self.tokens = Counter("saepipe_train_tokens", "Tokens trained on by this process.", registry=r)
        self.loss = Gauge("saepipe_train_loss", "Training loss over the last interval, by term.", ["term"], registry=r)
        self.l0 = Gauge("saepipe_train_l0", "Mean active latents per token.", registry=r)
        self.dead = Gauge("saepipe_train_dead_ratio", "Fraction of latents that have not fired recently.", registry=r)
        self.fvu = Gauge("saepipe_train_fvu", "Fraction of variance unexplained (training batches).", registry=r)
        self.lr = Gauge("saepipe_train_learning_rate", "Learning rate.", registry=r)
        self.grad_norm = Gauge("saepipe_train_grad_norm", "Gradient norm before clipping.", registry=r)
        self.step_time = Gauge("saepipe_train_step_seconds", "Mean seconds per step over the interval, by phase.",
                               ["phase"], registry=r)
        self.rate = Gauge("saepipe_train_tokens_per_second", "Training throughput.", registry=r)
        self.eval = {k: Gauge(f"saepipe_train_eval_{k}", f"Held-out {k} at the last evaluation.", registry=r)
                     for k in ("fvu", "l0", "dead_ratio")}
        self.ckpt_time = Gauge("saepipe_train_last_checkpoint_time_seconds", "When the last checkpoint was written.",
                               registry=r)
        self.ckpt_seconds = Gauge("saepipe_train_checkpoint_duration_seconds", "How long the last checkpoint took.",
                                  registry=r)
        self.ckpt_interval = Gauge("saepipe_train_checkpoint_interval_seconds",
                                   "Expected seconds between checkpoints (every_steps x step time).", registry=r)
        self.checkpoints = Counter("saepipe_train_checkpoints", "Checkpoints written this run.", registry=r)
        self._every_steps: int | None = None
        self._last_tokens = 0

    def on_setup(self, info: dict) -> None:
        self.target.set(info["total_steps"])
        self.progress.target.set(info["total_steps"])
        self.step.set(info["start_step"])
        self.progress.moved(info["start_step"])
        if info.get("requeues"):
            self.progress.requeues.set(info["requeues"])
        self._every_steps = info.get("checkpoint_every_steps")
        self._last_tokens = info["start_step"] * info["batch_size"]  # the counter counts this run's tokens
        # a fresh run has no checkpoint yet: its age counts from the start
        self.ckpt_time.set(time.time())

    def on_step_end(self, step: int) -> None:
        self.step.set(step)
        self.progress.moved(step)

    def on_metrics(self, step: int, m: dict) -> None:
        for key, term in _LOSS_TERMS.items():
            if key in m:
                self.loss.labels(term=term).set(m[key])
        for gauge, key in ((self.l0, "l0"), (self.fvu, "fvu"), (self.lr, "lr"), (self.grad_norm, "grad_norm"),
                           (self.rate, "tokens_per_s")):
            if key in m:
                gauge.set(m[key])
        if "dead_pct" in m:
            self.dead.set(m["dead_pct"] / 100.0)
        wait, total = m.get("data_wait_seconds", 0.0), m.get("step_seconds", 0.0)
        self.step_time.labels(phase="data_wait").set(wait)
        self.step_time.labels(phase="compute").set(max(total - wait, 0.0))
        if self._every_steps and total and math.isfinite(total):
            self.ckpt_interval.set(self._every_steps * total)
        tokens = m.get("tokens", 0)
        if tokens > self._last_tokens:
            self.tokens.inc(tokens - self._last_tokens)
            self._last_tokens = tokens

    def on_eval(self, step: int, m: dict | None) -> None:
        if not m:
            return
        for key, gauge in (("fvu", self.eval["fvu"]), ("l0", self.eval["l0"])):
            if key in m:
                gauge.set(m[key])
        if "dead_pct" in m:
            self.eval["dead_ratio"].set(m["dead_pct"] / 100.0)

    def on_checkpoint(self, step: int, path, seconds: float) -> None:
        self.ckpt_time.set(time.time())
        self.ckpt_seconds.set(seconds)
        self.checkpoints.inc()

    def on_finish(self, result) -> None:
        self.step.set(result.step)
        self.progress.moved(result.step)
        self.progress.finished.set(1)
