"""A synthetic activation store for tests and benchmarks, written through the real store writer.

Rows are sparse combinations of a random ground-truth dictionary plus a constant offset (real residual streams have a
large mean), so an SAE has something to find and a k-dimensional linear code (PCA) does measurably worse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config.schema import StoreConfig
from pipeline.store import ContextRows, DatasetMeta, ShardRows, TaskWriter


def sparse_rows(n: int, d: int, *, features: int, active: int, generator: torch.Generator,
                dictionary: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """[n, d] rows, each the sum of `active` random dictionary rows (drawn with replacement) with exponential
    magnitudes, plus `offset`."""
    idx = torch.randint(features, (n, active), generator=generator)
    mags = torch.empty(n, active).exponential_(1.0, generator=generator) + 0.5
    return (mags[:, :, None] * dictionary[idx]).sum(1) + offset


def write_synthetic_dataset(root: str | Path, *, d: int = 32, shards: int = 6, rows_per_shard: int = 1024,
                            features: int | None = None, active: int = 3, seed: int = 0,
                            row_group_rows: int = 256, ctx_len: int = 65, nan_shards: tuple[int, ...] = ()) -> Path:
    """Write `shards` shards of `rows_per_shard` rows (a multiple of ctx_len - 1) into a one-task dataset at `root`;
    the shards in `nan_shards` hold NaN activations (a run whose loss turns NaN)."""
    tokens_per_ctx = ctx_len - 1
    if rows_per_shard % tokens_per_ctx:
        raise ValueError(f"rows_per_shard {rows_per_shard} must be a multiple of ctx_len - 1 = {tokens_per_ctx}")
    root = Path(root)
    features = features or 4 * d
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = 2.0 * torch.randn(d, generator=gen)
    meta = DatasetMeta(model="synthetic", layer=0, hook="resid_post", d_model=d, ctx_len=ctx_len,
                       partitioning={"num_tasks": 1})
    cfg = StoreConfig(root=str(root), contexts_per_shard=rows_per_shard // tokens_per_ctx, row_group_rows=row_group_rows)
    contexts_per_shard = rows_per_shard // tokens_per_ctx
    with TaskWriter(root, meta, 0, 1, cfg) as writer:
        for s in range(shards):
            acts = sparse_rows(rows_per_shard, d, features=features, active=active, generator=gen,
                               dictionary=dictionary, offset=offset).to(torch.bfloat16).contiguous()
            if s in nan_shards:
                acts.fill_(float("nan"))
            first = s * contexts_per_shard
            context_ids = np.arange(first, first + contexts_per_shard, dtype=np.int64)
            token_ids = [np.concatenate([[0], (np.arange(tokens_per_ctx) + c) % 1000 + 1]).astype(np.int32) for c in context_ids]
            rows = ShardRows(
                context_id=np.repeat(context_ids, tokens_per_ctx),
                pos=np.tile(np.arange(1, ctx_len, dtype=np.int32), contexts_per_shard),
                token_id=np.concatenate([t[1:] for t in token_ids]),
                doc_id=[f"doc{c}" for c in np.repeat(context_ids, tokens_per_ctx)],
                subset=["synthetic"] * rows_per_shard,
                acts=acts,
            )
            contexts = ContextRows(
                context_id=context_ids,
                doc_id=[f"doc{c}" for c in context_ids],
                subset=["synthetic"] * contexts_per_shard,
                doc_start=np.zeros(contexts_per_shard, dtype=np.int32),
                token_ids=token_ids,
            )
            writer.write_shard(rows, contexts, cursor={"shard": s}, skips={})
        writer.finish(skips={}, stats={})
    return root
