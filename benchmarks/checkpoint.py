"""Checkpoint cost at production size: a 65,536 x 3,072 TopK SAE with its Adam state (about 4.8 GB), saved through
the trainer's Checkpointer (safetensors + JSON per component, fsynced, xxh3-128 manifest, atomic rename) and
verified the way a resume verifies it.

Prints one JSON line:
  checkpoint_bytes, save_seconds, save_GBps     the whole save, manifest included
  verify_seconds, verify_GBps                   Checkpointer's verify (reads every file back, xxh3-128)
  verify_cold_seconds                           the same after dropping the page cache (null where not permitted)
  store_hash_GBps                               the store's xxh3-64 file hash over the same files, same run
  verify_vs_store_hash                          store hash time / verify time, median of 3 interleaved rounds
                                                (goal >= 1: the verification is as fast as the store's hash)
  fits_preemption_window                        save_seconds < 90 (Slurm's default USR2 lead time in submitit)

    python benchmarks/checkpoint.py [--dir /tmp] [--d-in 3072] [--d-sae 65536]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.sae import SAEConfig  # noqa: E402
from pipeline.sae import make_sae  # noqa: E402
from pipeline.store.reader import _xxh3_file  # noqa: E402
from pipeline.train.checkpoint import Checkpointer, verify  # noqa: E402

ROUNDS = 3


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (a real disk, not /dev/shm)")
    ap.add_argument("--d-in", type=int, default=3072)
    ap.add_argument("--d-sae", type=int, default=65536)
    args = ap.parse_args()

    sae = make_sae(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=64))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    for p in sae.parameters():  # one step fills both Adam moments at their real size
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        saver = Checkpointer(Path(work) / "checkpoints", every_steps=1, keep_last=1)
        t0 = time.perf_counter()
        path = saver.save(1, {"sae": sae, "optimizer": optimizer})
        save_s = time.perf_counter() - t0
        files = [p for p in path.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)

        verify_times, store_times = [], []
        for _ in range(ROUNDS):  # interleaved, warm page cache: the hashing and reading, not the disk
            t0 = time.perf_counter()
            assert verify(path) is None
            verify_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in files:
                _xxh3_file(f)
            store_times.append(time.perf_counter() - t0)
        verify_s, store_s = statistics.median(verify_times), statistics.median(store_times)
        ratio = statistics.median(st / vt for st, vt in zip(store_times, verify_times))
        cold = None
        if drop_page_cache():
            t0 = time.perf_counter()
            assert verify(path) is None
            cold = round(time.perf_counter() - t0, 2)

    print(json.dumps({
        "d_in": args.d_in, "d_sae": args.d_sae, "checkpoint_bytes": size,
        "save_seconds": round(save_s, 2), "save_GBps": round(size / save_s / 1e9, 3),
        "verify_seconds": round(verify_s, 2), "verify_GBps": round(size / verify_s / 1e9, 3),
        "verify_cold_seconds": cold,
        "store_hash_GBps": round(size / store_s / 1e9, 3),
        "verify_vs_store_hash": round(ratio, 3),
        "fits_preemption_window": save_s < 90,
    }))


if __name__ == "__main__":
    main()
