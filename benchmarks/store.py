"""Activation store benchmark: compression, write and read throughput, lossless round trip.

    python benchmarks/store.py [--quick] [--d 576] [--dataset ROOT] [--dir DIR]

Writes shards of bf16 activations through TaskWriter (1 writer thread, then 2), reads them back through
ActivationDataset.read_acts with a warm page cache, and compares with np.load of the same rows from .npy files in the
same run. Throughputs are raw bf16 bytes per second. Without --dataset the activations are synthetic with the
statistics of LM residuals (heavy tails, per-dimension scales spread over two decades, a few outlier dimensions,
per-token norms); with --dataset they are the first rows of a real dataset. The last stdout line is one JSON object.

Shards are written to /dev/shm by default, so that the write figures are the writer's (codec, Parquet, checksums,
fsync calls) rather than the disk's: this machine's disk takes 390 MB/s with fdatasync, less than one writer thread
produces. --dir /tmp measures a disk instead. Ratios (scaling, read_vs_npy, write_vs_bare_parquet) are medians of
per-round ratios, each round running both sides back to back.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.schema import StoreConfig  # noqa: E402
from pipeline.store import ActivationDataset, ContextRows, DatasetMeta, ShardRows, TaskWriter  # noqa: E402
from pipeline.store.codec import LAYOUT  # noqa: E402

SHM = "/dev/shm"  # RAM-backed: the write figures measure the writer, not this machine's disk
CTX_LEN = 128  # tokens per context, BOS included: 127 stored rows per context


def synthetic_acts(rows: int, d: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    scale = np.exp(g.normal(0.0, 0.6, d)).astype(np.float32)
    scale[g.choice(d, max(1, d // 128), replace=False)] *= 30.0  # outlier dimensions
    out = torch.empty((rows, d), dtype=torch.bfloat16)
    for start in range(0, rows, 16384):  # in blocks: float32 temporaries stay small
        m = min(16384, rows - start)
        norm = np.exp(g.normal(0.0, 0.3, (m, 1))).astype(np.float32)
        x = g.standard_t(5, (m, d)).astype(np.float32) * scale * norm
        out[start : start + m] = torch.from_numpy(x).to(torch.bfloat16)
    # bit patterns a lossless store must keep: extremes, subnormals, signed zero, inf, NaN payloads
    specials = np.array([0x7F7F, 0xFF7F, 0x0080, 0x8080, 0x0001, 0x8001, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFA5],
                        dtype=np.uint16).view(np.int16)
    bits = out.view(torch.int16)
    bits[0, : len(specials)] = torch.from_numpy(specials)
    return out


def real_acts(root: str, rows: int) -> torch.Tensor:
    ds = ActivationDataset.open(root)
    parts, have = [], 0
    for i in range(ds.num_shards):
        if have >= rows:
            break
        a = ds.read_acts(i)
        parts.append(a)
        have += a.shape[0]
    if not parts:
        raise SystemExit(f"{root}: no rows")
    acts = torch.cat(parts)[:rows]
    if acts.shape[0] < rows:  # a small dataset: repeat it (the ratio is per row group anyway)
        acts = acts.repeat((rows + acts.shape[0] - 1) // acts.shape[0], 1)[:rows]
    return acts.contiguous()


def shard_inputs(acts: torch.Tensor, first_context: int) -> tuple[ShardRows, ContextRows]:
    n = acts.shape[0]
    per = CTX_LEN - 1
    n_ctx = (n + per - 1) // per
    cids = np.arange(first_context, first_context + n_ctx, dtype=np.int64)
    row_ctx = np.repeat(cids, per)[:n]
    pos = np.tile(np.arange(1, CTX_LEN, dtype=np.int32), n_ctx)[:n]
    g = np.random.default_rng(first_context)
    tokens = [np.concatenate([[0], g.integers(1, 49152, per)]).astype(np.int32) for _ in cids]
    token_id = np.concatenate([t[1:] for t in tokens])[:n]
    doc = np.array([f"pile-{c // 4:08d}" for c in cids], dtype=object)
    subset = np.array(["Pile-CC", "Github", "ArXiv", "Wikipedia (en)"], dtype=object)[cids % 4]
    rows = ShardRows(row_ctx, pos, token_id, doc[row_ctx - first_context], subset[row_ctx - first_context], acts)
    ctx = ContextRows(cids, list(doc), list(subset), np.zeros(n_ctx, np.int32), tokens)
    return rows, ctx


def write_dataset(root: Path, shards: list[torch.Tensor], threads: int) -> tuple[float, dict]:
    d = shards[0].shape[1]
    meta = DatasetMeta(model="benchmark", layer=0, hook="resid_post", d_model=d, ctx_len=CTX_LEN, partitioning={"num_tasks": 1})
    cfg = StoreConfig(root=str(root), writer_threads=threads, max_pending_shards=threads)
    inputs, first = [], 0
    for acts in shards:
        inputs.append(shard_inputs(acts, first))
        first += (acts.shape[0] + CTX_LEN - 2) // (CTX_LEN - 1)
    t0 = time.perf_counter()
    writer = TaskWriter(root, meta, 0, 1, cfg)
    for i, (rows, ctx) in enumerate(inputs):
        writer.write_shard(rows, ctx, cursor={"shard": i}, skips={})
    manifest = writer.finish(skips={}, stats={})
    return time.perf_counter() - t0, manifest


def timed_pass(items, fn) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - t0


def bare_parquet_write(planes: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """FACTS.md's best Parquet-only layout for reference: the two byte planes, both zstd-1 by pyarrow, written to memory
    (no split, checksum or fsync)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(hl):
        hi, lo = hl
        col = lambda x: pa.FixedSizeBinaryArray.from_buffers(pa.binary(x.shape[1]), len(x), [None, pa.py_buffer(x)])  # noqa: E731
        pq.write_table(pa.table({"hi": col(hi), "lo": col(lo)}), pa.BufferOutputStream(), row_group_size=8192,
                       compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False)

    return timed_pass(planes, write)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run, under a minute")
    ap.add_argument("--d", type=int, default=576, help="activation width for synthetic data (576: SmolLM2; try 3072)")
    ap.add_argument("--rows", type=int, default=None, help="rows per shard (default 64 contexts' worth in quick mode, 512 otherwise)")
    ap.add_argument("--shards", type=int, default=None, help="shards per write run")
    ap.add_argument("--repeat", type=int, default=None, help="timed passes over the shards when reading")
    ap.add_argument("--dataset", default=None, help="take real rows from this dataset root instead of synthetic ones")
    ap.add_argument("--dir", default=None,
                    help="where to write (default: /dev/shm where it exists, else the temp dir); the write figure "
                         "includes fsync to it, so on a disk slower than the writer it measures the disk")
    args = ap.parse_args()
    torch.set_num_threads(1)

    # rows per shard: whole contexts, about 37 MB (quick) or 75 MB of raw bf16 whatever the width
    width = ActivationDataset.open(args.dataset).d_model if args.dataset else args.d
    target = (37 if args.quick else 75) * 2**20
    rows = args.rows or max(127, target // (2 * width) // 127 * 127)
    n_shards = args.shards or (4 if args.quick else 6)
    repeat = args.repeat or (3 if args.quick else 5)
    if args.dataset:
        source = real_acts(args.dataset, rows * n_shards)
        shards = [source[i * rows : (i + 1) * rows].contiguous() for i in range(n_shards)]
    else:
        shards = [synthetic_acts(rows, args.d, seed=i) for i in range(n_shards)]
    d = shards[0].shape[1]
    raw = sum(s.numel() * 2 for s in shards)
    print(f"{n_shards} shards x {rows} rows x d={d} ({raw / 1e6:.0f} MB raw bf16), layout {LAYOUT}", file=sys.stderr)

    write_dir = args.dir or (SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None)
    work = Path(tempfile.mkdtemp(prefix="store-bench-", dir=write_dir))
    try:
        write_dataset(work / "warmup", [shards[0][:4096].contiguous()], 1)  # first-use imports and allocations
        planes = [((s.view(torch.int16).numpy().view(np.uint16) >> 8).astype(np.uint8), s.view(torch.int16).numpy().astype(np.uint8))
                  for s in shards]
        # writes: rounds of 1 and 2 writer threads and the bare baseline, so that a noisy neighbour hits all alike;
        # the ratios are medians of per-round ratios
        t1, t2, tb = [], [], []
        for k in range(3 if args.quick else 5):
            for threads, times in ((1, t1), (2, t2)) if k % 2 == 0 else ((2, t2), (1, t1)):
                root = work / f"w{threads}-{k}"
                seconds, manifest = write_dataset(root, shards, threads)
                times.append(seconds)
                if (threads, k) != (1, 0):
                    shutil.rmtree(root)
            tb.append(bare_parquet_write(planes))
        del planes
        root = work / "w1-0"
        write1, write2 = raw / statistics.median(t1) / 1e9, raw / statistics.median(t2) / 1e9
        bare = raw / statistics.median(tb) / 1e9
        file_bytes = manifest["bytes"]
        print(f"write 1 thread {write1:.2f} GB/s (best {raw / min(t1) / 1e9:.2f}), 2 threads {write2:.2f} GB/s; "
              f"bare two-plane Parquet to memory {bare:.2f} GB/s; files {file_bytes / 1e6:.1f} MB", file=sys.stderr)

        ds = ActivationDataset.open(root, verify=True)
        lossless = all(torch.equal(ds.read_acts(i).view(torch.int16), s.view(torch.int16)) for i, s in enumerate(shards))

        npy_dir = work / "npy"
        npy_dir.mkdir()
        npy_paths = []
        for i, s in enumerate(shards):
            npy_paths.append(npy_dir / f"{i}.npy")
            np.save(npy_paths[-1], s.view(torch.int16).numpy())
        read_npy = lambda p: torch.from_numpy(np.load(p)).view(torch.bfloat16)  # noqa: E731
        timed_pass(range(ds.num_shards), ds.read_acts)  # warm the page cache and the allocator
        timed_pass(npy_paths, read_npy)
        # interleave ours and np.load so that both see the same machine state
        ours, npy = [], []
        for _ in range(repeat):
            ours.append(timed_pass(range(ds.num_shards), ds.read_acts))
            npy.append(timed_pass(npy_paths, read_npy))
        read_ours, read_npy = raw / statistics.median(ours) / 1e9, raw / statistics.median(npy) / 1e9
        print(f"read {read_ours:.2f} GB/s (best {raw / min(ours) / 1e9:.2f}), np.load {read_npy:.2f} GB/s", file=sys.stderr)

        # the training loader end to end: shuffled float32 batches from background threads, past its start-up
        it = ds.batches(4096, seed=0, dtype=torch.float32)
        for _ in range(3):
            next(it)
        n_batches = max(10, 2 * it.batches_per_epoch)
        t0 = time.perf_counter()
        n_rows = sum(next(it).shape[0] for _ in range(n_batches))
        batches = n_rows * d * 2 / (time.perf_counter() - t0) / 1e9
        it.close()
        print(f"shuffled float32 batches {batches:.2f} GB/s (raw bf16)", file=sys.stderr)

        result = {
            "layout": LAYOUT,
            "rows": rows * n_shards,
            "d": d,
            "data": "real:" + args.dataset if args.dataset else "synthetic",
            "compression_ratio": round(raw / file_bytes, 4),
            "read_GBps_1core": round(read_ours, 3),
            "read_vs_npy": round(statistics.median(n / o for o, n in zip(ours, npy)), 3),
            "npy_GBps": round(read_npy, 3),
            "write_GBps_1thread": round(write1, 3),
            "write_GBps_2threads": round(write2, 3),
            "write_scaling_2threads": round(statistics.median(a / b for a, b in zip(t1, t2)), 3),
            "write_vs_bare_parquet": round(statistics.median(b / a for a, b in zip(t1, tb)), 3),
            "write_GBps_best_1thread": round(raw / min(t1) / 1e9, 3),
            "read_GBps_best_1core": round(raw / min(ours) / 1e9, 3),
            "batches_GBps": round(batches, 3),
            "lossless": bool(lossless),
            "write_dir": str(work.parent),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
