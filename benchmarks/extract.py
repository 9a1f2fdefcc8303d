"""Extraction speed: our truncated, overlapped pipeline vs a naive loop, and vs its own forward passes alone.

naive:        full depth, output_hidden_states=True, torch.save of the layer's activations per batch
end-to-end:   run_extract (corpus thread, truncated model, bf16 rows, Parquet writer pool, atomic commits)
forward-only: the same padded batches through the truncated model, nothing else

Prints one JSON line (last line): speedup_vs_naive = naive / end-to-end, overhead_vs_forward_only = end-to-end / forward-only.
Goals: speedup >= 2.0, overhead <= 1.10. All three are measured in this run, on the same contexts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ExtractRunConfig, load_config  # noqa: E402
from pipeline.corpus import CorpusStream, batch_tokenizer  # noqa: E402
from pipeline.extract.hooks import LayerCapture  # noqa: E402
from pipeline.extract.model import load_model  # noqa: E402
from pipeline.extract.packing import pack  # noqa: E402
from pipeline.extract.runner import bos_id, run_extract  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def padded_batches(cfg: ExtractRunConfig, tok) -> list[torch.Tensor]:
    """The batches run_extract forms: per shard, contexts sorted longest first, right-padded."""
    stream = CorpusStream(cfg.corpus, batch_tokenizer(tok))
    contexts = list(pack(stream, cfg.extract.ctx_len, bos_id(tok)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos_id(tok)
    batches = []
    per_shard = cfg.store.contexts_per_shard
    for s in range(0, len(contexts), per_shard):
        shard = sorted(contexts[s : s + per_shard], key=lambda c: -len(c.token_ids))
        for b in range(0, len(shard), cfg.extract.batch_size):
            group = shard[b : b + cfg.extract.batch_size]
            ids = np.full((len(group), len(group[0].token_ids)), pad, dtype=np.int64)
            for i, c in enumerate(group):
                ids[i, : len(c.token_ids)] = c.token_ids
            batches.append(torch.from_numpy(ids))
    return batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="about 8k tokens, under 60 s")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()
    tokens = args.tokens or (8_000 if args.quick else 40_000)
    work = Path(tempfile.mkdtemp(prefix="saepipe-bench-extract-"))
    cfg = load_config(ExtractRunConfig, REPO / "configs" / "demo.yaml", [
        f"corpus.token_budget={tokens}", f"extract.layer={args.layer}", f"store.root={work / 'ds'}",
        f"corpus.paths=[{REPO / 'data/pile-sample'}/pile-sample-*.jsonl.zst]", "store.contexts_per_shard=64",
    ])
    loaded = load_model(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    batches = padded_batches(cfg, tok)
    with torch.inference_mode():
        model(batches[0][:2, :16])  # warm-up: first-call allocations

    # naive loop: full depth, every hidden state, one torch.save per batch
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, ids in enumerate(batches):
            hs = model(ids, output_hidden_states=True).hidden_states
            torch.save(hs[args.layer + 1].clone(), work / f"naive-{i}.pt")
    naive = time.perf_counter() - t0

    with LayerCapture(model, args.layer, cfg.extract.hook) as capture:
        t0 = time.perf_counter()
        for ids in batches:
            capture(ids).to(torch.bfloat16)
        forward_only = time.perf_counter() - t0

    t0 = time.perf_counter()
    manifest = run_extract(cfg, loaded, show_progress=False)
    end_to_end = time.perf_counter() - t0

    print(json.dumps({
        "benchmark": "extract", "model": loaded.source, "layer": args.layer, "tokens": manifest["rows"],
        "batches": len(batches), "threads": torch.get_num_threads(),
        "naive_s": round(naive, 2), "forward_only_s": round(forward_only, 2), "end_to_end_s": round(end_to_end, 2),
        "tokens_per_s": round(manifest["rows"] / end_to_end, 1),
        "speedup_vs_naive": round(naive / end_to_end, 3),
        "overhead_vs_forward_only": round(end_to_end / forward_only, 3),
    }))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
