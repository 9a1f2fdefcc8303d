"""One extraction task: its partition of the corpus -> contexts -> truncated forward passes -> committed shards.

A background thread reads and tokenizes the corpus and cuts the next shard's contexts while the model runs; the store's
writer pool compresses and commits the previous shard. The main thread only runs forward passes and copies rows.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.config import ExtractRunConfig
from pipeline.corpus import CorpusStream
from pipeline.store import ContextRows, DatasetMeta, ShardRows, TaskWriter

from .hooks import LayerCapture
from .model import LoadedModel, load_model
from .packing import Context, pack

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


def dataset_meta(cfg: ExtractRunConfig, loaded: LoadedModel) -> DatasetMeta:
    tok = loaded.tokenizer
    return DatasetMeta(
        model=loaded.source,
        revision=loaded.revision,
        layer=cfg.extract.layer,
        hook=cfg.extract.hook,
        d_model=loaded.model.config.hidden_size,
        compute_dtype=cfg.model.dtype,
        tokenizer={"source": loaded.source, "dir": "tokenizer", "class": type(tok).__name__},
        ctx_len=cfg.extract.ctx_len,
        exclude_first=cfg.extract.exclude_first,
        bos_token_id=bos_id(tok),
        corpus=cfg.corpus.model_dump(mode="json"),
        partitioning={"num_tasks": cfg.task.num_tasks, "scheme": "record_index % num_tasks"},
        token_budget=cfg.corpus.token_budget,
        created_with=f"saepipe {__version__}",
    )


def bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token; contexts must start with one")
    return int(tokenizer.bos_token_id)


def make_tokenize(tokenizer):
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return tokenize


def shard_plans(contexts: Iterator[Context], stream: CorpusStream, per_shard: int) -> Iterator[ShardPlan]:
    batch: list[Context] = []
    try:
        for ctx in contexts:
            batch.append(ctx)
            if len(batch) == per_shard:
                yield ShardPlan(batch, dict(stream.skips))
                batch = []
    except ValueError as err:  # CorpusError: keep every context before the damage, then fail
        yield ShardPlan(batch, dict(stream.skips), error=err)
        return
    if batch:
        yield ShardPlan(batch, dict(stream.skips))


def prefetch(plans: Iterator[ShardPlan], depth: int = 2) -> Iterator[ShardPlan]:
    """Run the corpus side in a thread: the tokenizer and JSON parsing overlap the forward passes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for plan in plans:
                q.put(plan)
        except BaseException as err:  # surfaced in the consumer
            q.put(err)
        q.put(done)

    threading.Thread(target=produce, name="corpus-prefetch", daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


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
        timer.seconds += time.perf_counter() - t0
        timer.padded_tokens += ids.size
        for row, i in enumerate(idx):
            n = int(counts[i])
            if n:
                acts[offsets[i] : offsets[i + 1]] = host[row, positions[i]]
        timer.tokens += int(counts[idx].sum())
        if on_batch is not None:
            on_batch(int(counts[idx].sum()))
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


def run_extract(cfg: ExtractRunConfig, loaded: LoadedModel | None = None, *, show_progress: bool = True) -> dict:
    """Run (or resume) task `cfg.task.task_id`; returns its manifest. Raises ValueError on bad input."""
    t_start = time.perf_counter()
    loaded = loaded or load_model(cfg.model)
    # Built before anything is written, so a wrong layer or hook fails without leaving a dataset behind;
    # leaving the block gives the caller its whole model back.
    with LayerCapture(loaded.model, cfg.extract.layer, cfg.extract.hook) as capture:
        writer = TaskWriter(cfg.store.root, dataset_meta(cfg, loaded), cfg.task.task_id, cfg.task.num_tasks, cfg.store,
                            save_tokenizer=lambda path: loaded.tokenizer.save_pretrained(path))
        try:
            timer, stream = _extract_shards(cfg, loaded, capture, writer, show_progress)
        except BaseException:
            writer.close()
            raise
    wall = time.perf_counter() - t_start
    stats = {
        "tokens_this_run": timer.tokens,
        "forward_seconds": round(timer.seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(timer.tokens / wall, 1) if wall else None,
        # Share of computed positions that became rows (the rest: BOS, excluded positions, padding).
        "stored_fraction": round(timer.tokens / timer.padded_tokens, 4) if timer.padded_tokens else 0.0,
        "corpus": stream.stats,
    }
    manifest = writer.finish(skips=dict(stream.skips), stats=stats)
    log.info("task %d done: %d rows in %d shards, skips %s", cfg.task.task_id, manifest["rows"], len(manifest["shards"]),
             manifest["skips"] or "none")
    return manifest


def _extract_shards(cfg: ExtractRunConfig, loaded: LoadedModel, capture: LayerCapture, writer: TaskWriter,
                    show_progress: bool) -> tuple[ForwardTimer, CorpusStream]:
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else bos_id(tok)
    cursor = writer.resume_cursor
    if cursor:
        log.info("task %d resumes after %d committed shards (%d rows)", cfg.task.task_id, writer.next_shard_index,
                 writer.committed_rows)
    stream = CorpusStream(cfg.corpus, make_tokenize(tok), task_id=cfg.task.task_id, num_tasks=cfg.task.num_tasks,
                          resume=cursor["corpus"] if cursor else None)
    contexts = pack(stream, cfg.extract.ctx_len, bos_id(tok),
                    first_context_id=cursor["doc_first_context_id"] if cursor else 0,
                    skip_in_first_doc=cursor["contexts_done_in_doc"] if cursor else 0)
    timer = ForwardTimer()
    budget = cfg.corpus.token_budget
    with tqdm(total=budget // cfg.task.num_tasks if budget else None, unit="tok", unit_scale=True,
              desc=f"extract task {cfg.task.task_id}", disable=not show_progress) as bar:
        bar.update(writer.committed_rows)
        for plan in prefetch(shard_plans(contexts, stream, cfg.store.contexts_per_shard)):
            if plan.contexts:
                rows, ctx_rows = forward_shard(capture, plan.contexts, cfg, pad_id, loaded.device, timer, bar.update)
                writer.write_shard(rows, ctx_rows, cursor=plan.contexts[-1].resume, skips=plan.skips)
            if plan.error is not None:
                # Every context before the damage is now queued for commit; close() waits for it.
                writer.close()
                raise plan.error
    return timer, stream
