"""One extraction task: its partition of the corpus -> contexts -> truncated forward passes -> committed shards.

A background thread reads and tokenizes the corpus and cuts the next shard's contexts while the model runs; the store's
writer pool compresses and commits the previous shard. The main thread only runs forward passes and copies rows.

    with ExtractionRunner(cfg, stop=flag, callbacks=[exporter]) as runner:
        result = runner.run()

Order of work: the config is checked against the corpus, the store and the model source (pipeline.extract.preflight)
before anything is loaded or written; a task already complete returns at once; then the plan is read (or made, with
the tokenizer alone); then the task's lease is taken, so that a second process on the same task refuses before it
spends time loading a model; then the model. The runner
installs no signal handlers: its caller passes a stop condition, polled between shards, and on a stop the shards in
flight are committed and the task returns "stopped", to be resumed by the next run.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.config import ExtractRunConfig
from pipeline.corpus import batch_tokenizer
from pipeline.errors import CorpusError, ModelError
from pipeline.hooks import Callbacks, NeverStop, StopCondition
from pipeline.io import Lease
from pipeline.store import ContextRows, DatasetMeta, ShardEntry, ShardRows, TaskWriter, task_description, task_lease_path

from . import preflight
from .hooks import LayerCapture
from .model import LoadedModel, check_model_source, load_model, load_tokenizer
from .packing import Context
from .planning import ensure_plan
from .preflight import existing_plan
from .task_corpus import TaskCorpus

log = logging.getLogger(__name__)


@dataclass
class ShardPlan:
    contexts: list[Context]
    skips: dict[str, int]
    error: BaseException | None = None  # the corpus failed after these contexts (they are still written)


@dataclass
class ForwardTimer:
    seconds: float = 0.0
    tokens: int = 0
    padded_tokens: int = 0


@dataclass
class ExtractResult:
    status: Literal["completed", "stopped", "already_complete"]
    manifest: dict
    stop_reason: str | None = None


def dataset_meta(cfg: ExtractRunConfig, loaded: LoadedModel) -> DatasetMeta:
    tok = loaded.tokenizer
    return DatasetMeta(
        **preflight.config_meta(cfg),
        d_model=loaded.model.config.hidden_size,
        tokenizer={"source": loaded.source, "dir": "tokenizer", "class": type(tok).__name__},
        bos_token_id=bos_id(tok),
        created_with=f"saepipe {__version__}",
    )


def bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise ModelError("the tokenizer has no BOS token; contexts must start with one")
    return int(tokenizer.bos_token_id)


def shard_plans(corpus: TaskCorpus, per_shard: int) -> Iterator[ShardPlan]:
    # The skips are read when a shard's last context comes out: the corpus stream is a generator paused right
    # after that context's document, so they are the skips up to the shard's resume point, no more.
    batch: list[Context] = []
    try:
        for ctx in corpus.contexts():
            batch.append(ctx)
            if len(batch) == per_shard:
                yield ShardPlan(batch, corpus.skips)
                batch = []
    except CorpusError as err:  # keep every context before the damage, then fail
        yield ShardPlan(batch, corpus.skips, error=err)
        return
    if batch:
        yield ShardPlan(batch, corpus.skips)


class Prefetcher:
    """Runs the corpus side in a thread, so that the tokenizer and JSON parsing overlap the forward passes."""

    _DONE = object()

    def __init__(self, plans: Iterator[ShardPlan], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(plans,), name="corpus-prefetch", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def _produce(self, plans: Iterator[ShardPlan]) -> None:
        try:
            for plan in plans:
                if not self._put(plan):
                    return
        except BaseException as err:  # surfaced in the consumer
            self._put(err)
        self._put(self._DONE)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator[ShardPlan]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stored_positions(length: int, exclude_first: int) -> np.ndarray:
    return np.arange(1 + exclude_first, length, dtype=np.int32)


def forward_shard(capture: LayerCapture, contexts: list[Context], cfg: ExtractRunConfig, pad_id: int, device: torch.device,
                  timer: ForwardTimer, on_batch=None) -> tuple[ShardRows, ContextRows]:
    ex = cfg.extract.exclude_first
    positions = [stored_positions(len(c.token_ids), ex) for c in contexts]
    counts = np.array([len(p) for p in positions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    acts = torch.empty((int(offsets[-1]), capture.d_model), dtype=torch.bfloat16)
    # Longest first, so each batch pads to a similar length; rows still land in stream order via `offsets`.
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i].token_ids))
    for start in range(0, len(order), cfg.extract.batch_size):
        idx = order[start : start + cfg.extract.batch_size]
        width = len(contexts[idx[0]].token_ids)
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        for row, i in enumerate(idx):
            ids[row, : len(contexts[i].token_ids)] = contexts[i].token_ids
        t0 = time.perf_counter()
        out = capture(torch.from_numpy(ids).to(device)).to(torch.bfloat16)
        host = out.cpu()
        seconds = time.perf_counter() - t0
        timer.seconds += seconds
        timer.padded_tokens += ids.size
        for row, i in enumerate(idx):
            n = int(counts[i])
            if n:
                acts[offsets[i] : offsets[i + 1]] = host[row, positions[i]]
        stored = int(counts[idx].sum())
        timer.tokens += stored
        if on_batch is not None:
            on_batch(stored, int(ids.size), seconds, sum(len(contexts[i].token_ids) - 1 for i in idx),
                     sum(1 for i in idx if contexts[i].doc_start == 0))
    rows = ShardRows(
        context_id=np.repeat(np.array([c.context_id for c in contexts], dtype=np.int64), counts),
        pos=np.concatenate(positions) if positions else np.empty(0, np.int32),
        token_id=np.concatenate([c.token_ids[p] for c, p in zip(contexts, positions)]).astype(np.int32),
        doc_id=np.repeat(np.array([c.doc_id for c in contexts], dtype=object), counts),
        subset=np.repeat(np.array([c.subset for c in contexts], dtype=object), counts),
        acts=acts,
    )
    ctx_rows = ContextRows(
        context_id=np.array([c.context_id for c in contexts], dtype=np.int64),
        doc_id=[c.doc_id for c in contexts],
        subset=[c.subset for c in contexts],
        doc_start=np.array([c.doc_start for c in contexts], dtype=np.int32),
        token_ids=[c.token_ids for c in contexts],
    )
    return rows, ctx_rows


class ExtractionRunner:
    def __init__(self, cfg: ExtractRunConfig, loaded: LoadedModel | None = None, *, stop: StopCondition | None = None,
                 callbacks: Sequence[object] = (), show_progress: bool = True) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.stop = stop or NeverStop()
        self.callbacks = Callbacks(callbacks)
        self.show_progress = show_progress
        self._lease: Lease | None = None
        self._writer: TaskWriter | None = None

    def preflight(self) -> ExtractResult | None:
        """The checks that need neither the model nor a write; the finished task's result, if it is finished."""
        cfg = self.cfg
        preflight.check_corpus(cfg)
        preflight.check_store(cfg)
        done = preflight.finished_manifest(cfg)
        if done is not None:
            return ExtractResult("already_complete", done.model_dump(mode="json"))
        if self.loaded is None:
            check_model_source(cfg.model)
        return None

    def run(self) -> ExtractResult:
        cfg = self.cfg
        finished = self.preflight()
        if finished is not None:
            log.info("task %d of %d is already complete in %s (%d rows in %d shards); nothing to do",
                     cfg.task.task_id, cfg.task.num_tasks, cfg.store.root, finished.manifest["rows"],
                     len(finished.manifest["shards"]))
            self.callbacks.fire("on_finish", finished)
            return finished
        t_start = time.perf_counter()
        # The plan reads the whole selection (a damaged file fails here, before anything of the task is written).
        self.plan = existing_plan(cfg) or ensure_plan(
            cfg, self.loaded.tokenizer if self.loaded else load_tokenizer(cfg.model, show_progress=self.show_progress))
        lease_path = task_lease_path(cfg.store.root, cfg.task.task_id, cfg.task.num_tasks)
        lease_path.parent.mkdir(parents=True, exist_ok=True)
        self._lease = Lease(lease_path, what=task_description(cfg.store.root, cfg.task.task_id, cfg.task.num_tasks),
                            timeout_s=cfg.task.lease_timeout_s).acquire()
        loaded = self.loaded or load_model(cfg.model, show_progress=self.show_progress)
        # Built before anything is written, so a wrong layer or hook fails without leaving a dataset behind;
        # leaving the block gives the caller its whole model back.
        with LayerCapture(loaded.model, cfg.extract.layer, cfg.extract.hook) as capture:
            self._writer = TaskWriter(
                cfg.store.root, dataset_meta(cfg, loaded), cfg.task.task_id, cfg.task.num_tasks, cfg.store,
                save_tokenizer=lambda path: loaded.tokenizer.save_pretrained(path), lease=self._lease,
                on_commit=self._committed, on_phase=lambda phase, i: self.callbacks.fire("on_write_phase", phase, i))
            if self._writer.complete:  # finished by a process that raced this one to the lease
                return ExtractResult("already_complete", self._writer.manifest.model_dump(mode="json"))
            timer, corpus, stopped = self._extract_shards(loaded, capture)
        if stopped is not None:
            self._writer.close(raise_errors=True)
            manifest = self._writer.manifest.model_dump(mode="json")
            log.warning("task %d stopped (%s) after %d committed shards; run it again to resume", cfg.task.task_id,
                        stopped, len(manifest["shards"]))
            result = ExtractResult("stopped", manifest, stop_reason=stopped)
            self.callbacks.fire("on_finish", result)
            return result
        wall = time.perf_counter() - t_start
        stats = {
            "tokens_this_run": timer.tokens,
            "forward_seconds": round(timer.seconds, 3),
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(timer.tokens / wall, 1) if wall else None,
            # Share of computed positions that became rows (the rest: BOS, excluded positions, padding).
            "stored_fraction": round(timer.tokens / timer.padded_tokens, 4) if timer.padded_tokens else 0.0,
            "corpus": {"records_read_this_run": corpus.records_read, "units": len(corpus.units)},
        }
        manifest = self._writer.finish(skips=corpus.skips, stats=stats)
        log.info("task %d done: %d rows in %d shards, skips %s", cfg.task.task_id, manifest["rows"],
                 len(manifest["shards"]), manifest["skips"] or "none")
        result = ExtractResult("completed", manifest)
        self.callbacks.fire("on_finish", result)
        return result

    def _committed(self, entry: ShardEntry) -> None:
        m = self._writer.manifest
        self.callbacks.fire("on_shard_committed", {
            "index": entry.index, "rows": entry.rows, "contexts": entry.contexts,
            "bytes": entry.acts_bytes + entry.ctx_bytes, "total_rows": m.rows, "total_shards": len(m.shards),
            "total_bytes": m.bytes})

    def _extract_shards(self, loaded: LoadedModel, capture: LayerCapture) -> tuple[ForwardTimer, TaskCorpus, str | None]:
        cfg, writer = self.cfg, self._writer
        tok = loaded.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else bos_id(tok)
        cursor = writer.resume_cursor
        if cursor:
            log.info("task %d resumes after %d committed shards (%d rows)", cfg.task.task_id, writer.next_shard_index,
                     writer.committed_rows)
        corpus = TaskCorpus(cfg.corpus, self.plan, cfg.task.task_id, batch_tokenizer(tok), cfg.extract.ctx_len,
                            bos_id(tok), cursor)
        timer = ForwardTimer()
        # The bar counts the tokens of the contexts run (BOS aside): what the plan gave this task.
        target = self.plan.task_tokens(cfg.task.task_id)
        self.callbacks.fire("on_setup", {
            "root": cfg.store.root, "task_id": cfg.task.task_id, "num_tasks": cfg.task.num_tasks,
            "model": loaded.source, "layer": cfg.extract.layer, "hook": cfg.extract.hook, "device": str(loaded.device),
            "resumed_rows": writer.committed_rows, "resumed_shards": writer.next_shard_index, "token_target": target})
        # tokens already done: the committed rows plus the positions after BOS each context left out
        done_before = writer.committed_rows + writer.manifest.contexts * cfg.extract.exclude_first
        prefetcher = Prefetcher(shard_plans(corpus, cfg.store.contexts_per_shard))
        seen_skips: dict[str, int] = dict(writer.manifest.skips)
        with tqdm(total=target, initial=min(done_before, target or done_before), unit="tok", unit_scale=True,
                  desc=f"extract task {cfg.task.task_id}", disable=not self.show_progress) as bar:

            def on_batch(stored: int, padded: int, seconds: float, body_tokens: int, documents: int) -> None:
                bar.update(body_tokens)
                self.callbacks.fire("on_batch", {
                    "tokens": stored, "padded_tokens": padded, "forward_seconds": seconds, "body_tokens": body_tokens,
                    "documents": documents,
                    "pending_shards": writer.pending_shards, "prefetched_shards": prefetcher.depth})

            try:
                for plan in prefetcher:
                    for reason, count in plan.skips.items():
                        if count > seen_skips.get(reason, 0):
                            self.callbacks.fire("on_skip", reason, count - seen_skips.get(reason, 0))
                            seen_skips[reason] = count
                    if plan.contexts:
                        rows, ctx_rows = forward_shard(capture, plan.contexts, cfg, pad_id, loaded.device, timer, on_batch)
                        writer.write_shard(rows, ctx_rows, cursor=plan.contexts[-1].resume, skips=plan.skips)
                    if plan.error is not None:
                        # Every context before the damage is now queued for commit; close() waits for it.
                        writer.close()
                        raise plan.error
                    if self.stop.should_stop():
                        return timer, corpus, getattr(self.stop, "reason", None) or "stop requested"
            finally:
                prefetcher.close()
            if bar.total is not None:  # end at 100% whatever the estimate was
                bar.total = bar.n
                bar.refresh()
        return timer, corpus, None

    def close(self) -> None:
        """Wait for shards in flight (committing them), release the lease. Idempotent; after an error too."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> "ExtractionRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_extract(cfg: ExtractRunConfig, loaded: LoadedModel | None = None, *, stop: StopCondition | None = None,
                callbacks: Sequence[object] = (), show_progress: bool = True) -> dict:
    """Run (or resume) task `cfg.task.task_id`; returns its manifest. Bad input raises a SaepipeError."""
    with ExtractionRunner(cfg, loaded, stop=stop, callbacks=callbacks, show_progress=show_progress) as runner:
        return runner.run().manifest
