"""The events an extraction task fires, for callbacks passed to ExtractionRunner(..., callbacks=[...]) (telemetry,
tests). A callback implements any subset of these methods; one that raises is logged and the task goes on.

    on_setup(info)                  before the first forward pass: root, task_id, num_tasks, model, layer, hook,
                                    device, resumed_rows, resumed_shards, token_target (None when unknown)
    on_batch(metrics)               after every forward batch: tokens (stored rows of the batch), padded_tokens,
                                    forward_seconds, body_tokens (context tokens after BOS: the progress
                                    bar's unit), documents (documents begun in the batch), pending_shards (queued
                                    in the writer), prefetched_shards (planned by the corpus thread, waiting)
    on_shard_committed(info)        after a shard's commit (from a writer thread): index, rows, contexts, bytes,
                                    total_rows, total_shards, total_bytes
    on_skip(reason, count)          new bad records of this task counted (count since the last call)
    on_write_phase(phase, index)    at each step of a shard's write (pipeline.store.WRITE_PHASES), from a writer
                                    thread; for fault-injection tests
    on_finish(result)               the ExtractResult
"""
from __future__ import annotations


class ExtractCallback:
    """A no-op base to subclass; implementing the methods without it works as well."""

    def on_setup(self, info: dict) -> None: ...

    def on_batch(self, metrics: dict) -> None: ...

    def on_shard_committed(self, info: dict) -> None: ...

    def on_skip(self, reason: str, count: int) -> None: ...

    def on_write_phase(self, phase: str, index: int) -> None: ...

    def on_finish(self, result) -> None: ...
