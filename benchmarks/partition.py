"""What a task of an extraction array costs on the corpus side, and what the plan costs, on a multi-file corpus.

The bundled sample is re-cut into 16 `.jsonl.zst` files (its records in order), then:
  task_cost_ratio   the corpus read + tokenize + packing time of one task of T=8 (the mean over the 8 tasks),
                    divided by that of the single task of T=1, same plan settings (goal <= 0.20; 0.125 is ideal)
  task_cost_max     the same for the slowest of the 8 tasks
  plan_fraction     the plan's own time (one selection pass with the tokenizer, no model) divided by a whole T=1
                    extraction of the same budget with SmolLM2 (goal <= 0.05)
Prints one JSON line.

    python benchmarks/partition.py [--quick] [--tokens N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import ExtractRunConfig, ModelConfig, validate  # noqa: E402
from pipeline.corpus import batch_tokenizer, make_plan  # noqa: E402
from pipeline.extract.model import load_tokenizer  # noqa: E402
from pipeline.extract.runner import run_extract  # noqa: E402
from pipeline.extract.task_corpus import TaskCorpus  # noqa: E402

SAMPLE = sorted((REPO / "data" / "pile-sample").glob("pile-sample-*.jsonl.zst"))
FILES = 16


def recut(directory: Path) -> list[str]:
    lines = []
    for path in SAMPLE:
        with open(path, "rb") as f:
            lines += zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()
    per = -(-len(lines) // FILES)
    paths = []
    for i in range(FILES):
        path = directory / f"part-{i:02d}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines[i * per : (i + 1) * per]) + b"\n"))
        paths.append(str(path))
    return paths


def task_seconds(cfg: ExtractRunConfig, plan, task: int, tokenize, bos: int) -> float:
    t0 = time.perf_counter()
    for _ in TaskCorpus(cfg.corpus, plan, task, tokenize, cfg.extract.ctx_len, bos).contexts():
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 400k-token budget for the cost ratio, 20k for the extraction")
    ap.add_argument("--tokens", type=int, default=None, help="budget for the task-cost ratio (default: 1.6M, the sample's half)")
    args = ap.parse_args()
    budget = args.tokens or (400_000 if args.quick else 1_600_000)
    extract_budget = 20_000 if args.quick else 60_000
    tok = load_tokenizer(ModelConfig(), show_progress=False)
    tokenize = batch_tokenizer(tok)
    with tempfile.TemporaryDirectory() as tmp:
        paths = recut(Path(tmp))

        def config(tasks: int, tokens: int, root: str) -> ExtractRunConfig:
            return validate(ExtractRunConfig, {
                "corpus": {"paths": paths, "token_budget": tokens}, "extract": {"layer": 15, "ctx_len": 128},
                "store": {"root": root, "contexts_per_shard": 256}, "task": {"num_tasks": tasks}}, "benchmark")

        one, eight = config(1, budget, f"{tmp}/a"), config(8, budget, f"{tmp}/b")
        plan1 = make_plan(one.corpus, tokenize, tokenizer="smollm2", ctx_len=128, num_tasks=1)
        plan8 = make_plan(eight.corpus, tokenize, tokenizer="smollm2", ctx_len=128, num_tasks=8)
        single = task_seconds(one, plan1, 0, tokenize, tok.bos_token_id)
        tasks = [task_seconds(eight, plan8, t, tokenize, tok.bos_token_id) for t in range(8)]

        # The plan against a whole T=1 extraction of the same (smaller) budget, model included.
        small = config(1, extract_budget, f"{tmp}/x")
        t0 = time.perf_counter()
        make_plan(small.corpus, tokenize, tokenizer="smollm2", ctx_len=128, num_tasks=1)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_extract(small, show_progress=False)
        extract_s = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "partition", "files": FILES, "budget_tokens": budget, "units_t8": len(plan8.units),
        "task_seconds_t1": round(single, 3), "task_seconds_t8_mean": round(sum(tasks) / 8, 3),
        "task_seconds_t8_max": round(max(tasks), 3),
        "task_cost_ratio": round(sum(tasks) / 8 / single, 4), "task_cost_max": round(max(tasks) / single, 4),
        "plan_seconds": round(plan_s, 3), "extract_seconds_t1": round(extract_s, 2), "extract_budget": extract_budget,
        "plan_fraction": round(plan_s / extract_s, 4),
        "goals": {"task_cost_ratio": "<= 0.20", "plan_fraction": "<= 0.05"},
    }))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
