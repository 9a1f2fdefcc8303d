"""Trainer step speed per SAE architecture at the demo size (d=576, d_sae=9,216, batch 4,096 rows) on CPU.

One JSON line per architecture, then a summary line (the last line) holding all of them and the goals:
  tokens_per_s     rows per second of Trainer.train_step fed from memory
  gemm_efficiency  the five-GEMM floor of a dense ReLU SAE step (forward x@W_enc, z@W_dec; backward dW_dec, dz,
                   dW_enc; each timed alone) divided by the arch's step time, as the median of per-round ratios: each
                   round times the floor right after the steps, so that the machine's drift hits both alike. For
                   the ReLU recipes this is how close the step is to its matmuls; for TopK / BatchTopK above 1 means
                   faster than that floor.
  loader_overhead  step time fed by the store reader (the trainer's partitioned batches, 8 partitions, prefetching)
                   divided by step time fed from memory; both measured interleaved, step by step.
Goals: ReLU gemm_efficiency >= 0.8, TopK tokens_per_s above ReLU's, loader_overhead <= 1.05.

    python benchmarks/train_step.py [--quick] [--threads 2]

--quick (about 40 s on a quiet 2-core machine) times 3 rounds per arch, so its ratios move by +-0.1 with machine
load; the full run (10 rounds, about 2 minutes) is the one to quote.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers.synthetic import write_synthetic_dataset  # noqa: E402

from pipeline.config.load import validate
from pipeline.config.train import TrainRunConfig
from pipeline.io.process import keep_freed_memory_on_heap
from pipeline.train.trainer import Trainer

D, D_SAE, BATCH = 576, 9216, 4096
ARCHS = ["relu_2023", "relu_2024", "topk", "batchtopk"]


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class GemmFloor:
    """The five GEMMs of a dense ReLU SAE step at the benchmark's shapes (fp32), each timed alone."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        x, g = torch.randn(BATCH, D, generator=gen), torch.randn(BATCH, D, generator=gen)
        w_enc, w_dec = torch.randn(D, D_SAE, generator=gen), torch.randn(D_SAE, D, generator=gen)
        z = torch.randn(BATCH, D_SAE, generator=gen).relu_()
        dz = torch.randn(BATCH, D_SAE, generator=gen)
        self.gemms = [
            lambda: x @ w_enc,  # encoder forward
            lambda: z @ w_dec,  # decoder forward
            lambda: z.T @ g,  # dW_dec
            lambda: g @ w_dec.T,  # dz
            lambda: x.T @ dz,  # dW_enc
        ]
        for gemm in self.gemms:
            gemm()  # warm up the BLAS

    def __call__(self, reps: int = 1) -> float:
        return sum(median_time(gemm, reps) for gemm in self.gemms)


def make_trainer(arch: str, data: Path, run_dir: Path, precision: str = "fp32") -> Trainer:
    cfg = validate(TrainRunConfig, {
        "run_dir": str(run_dir),
        "data": {"root": str(data), "eval_shards": 1, "partitions": 8, "init_rows": 4096},
        "sae": {"arch": arch, "d_in": D, "d_sae": D_SAE, "k": 32, "b_dec_init": "mean"},
        "train": {"batch_size": BATCH, "steps": 100_000, "warmup_steps": 10, "device": "cpu", "precision": precision},
    }, "benchmark")
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer


def measure_arch(arch: str, data: Path, run_dir: Path, steps: int, floor: GemmFloor, precision: str = "fp32") -> dict[str, float]:
    trainer = make_trainer(arch, data, run_dir, precision)
    in_memory = next(trainer.batches).clone()
    trainer.train_step(next(trainer.batches))  # warm-up: allocator, BLAS, the readers' first windows
    mem, loader, floors = [], [], []
    for _ in range(steps):  # interleaved rounds, so drift in machine load hits all three alike
        start = time.perf_counter()
        trainer.train_step(in_memory)
        mem.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.train_step(next(trainer.batches))
        loader.append(time.perf_counter() - start)
        floors.append(floor())
    trainer.batches.close()
    return {
        "step_s": statistics.median(mem),
        "floor_s": statistics.median(floors),
        "gemm_efficiency": statistics.median(f / m for f, m in zip(floors, mem)),
        "loader_overhead": statistics.median(ld / m for ld, m in zip(loader, mem)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", action="append", choices=ARCHS, help="only these architectures (repeatable)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the trainer's bf16 autocast (the GEMM floor stays fp32, so gemm_efficiency is the speed-up over it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_on_heap()  # what Trainer.setup does on CPU; before the floor, so both run under the same malloc
    logging.basicConfig(level=logging.WARNING)
    steps = 3 if args.quick else 10

    with tempfile.TemporaryDirectory(prefix="saepipe-bench-") as tmp:
        # 3 training shards of 4 row groups: each of the 8 partitions gets 1-2 row groups per epoch.
        data = write_synthetic_dataset(Path(tmp) / "acts", d=D, shards=4, rows_per_shard=8192, row_group_rows=2048,
                                       ctx_len=129, active=32, features=4 * D)
        floor = GemmFloor()
        measured = {arch: measure_arch(arch, data, Path(tmp) / arch, steps, floor, args.precision) for arch in args.arch or ARCHS}

    results = []
    for arch, m in measured.items():
        line = {
            "arch": arch,
            "tokens_per_s": round(BATCH / m["step_s"]),
            "gemm_efficiency": round(m["gemm_efficiency"], 3),
            "loader_overhead": round(m["loader_overhead"], 3),
            "step_ms": round(1000 * m["step_s"], 1),
            "gemm_floor_ms": round(1000 * m["floor_s"], 1),
        }
        results.append(line)
        print(json.dumps(line))
    by_arch = {r["arch"]: r for r in results}
    relu = [by_arch["relu_2023"], by_arch["relu_2024"]]
    summary = {
        "benchmark": "train_step",
        "d": D, "d_sae": D_SAE, "batch": BATCH, "threads": args.threads, "quick": args.quick, "precision": args.precision,
        "results": results,
        "goals": {
            "relu_gemm_efficiency_ge_0.8": all(r["gemm_efficiency"] >= 0.8 for r in relu),
            "topk_faster_than_relu": by_arch["topk"]["tokens_per_s"] > max(r["tokens_per_s"] for r in relu),
            "loader_overhead_le_1.05": all(r["loader_overhead"] <= 1.05 for r in results),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
