"""`saepipe analyze` speed and memory at d_sae = 65,536 (TopK, k = 32, d_in = 576) on a synthetic store, on CPU.

Prints one JSON line:
  analyze_vs_encode   tokens/s of the whole analysis (run_analysis: store reading, encoding, statistics, top-k, the
                      spill and both passes over it, windows, writing the directory) / tokens/s of a bare encode
                      (encode_sparse over the same rows, already in memory, same batch size and threads; timed on the
                      first --encode-rows of them, before and after the analysis, and averaged, so that machine
                      drift hits both alike). Goal >= 0.7.
  analyze_peak_rss_mb the analysis process's RSS high-water (its own process: nothing else in it), and
  encode_peak_rss_mb  the same for the bare encode, for scale (the SAE and one batch's dense pre-activation).

    python benchmarks/analyze.py [--rows 131072] [--d-sae 65536] [--threads 2] [--store ROOT] [--keep DIR]

The default size runs in about 4 minutes on 2 quiet cores (the encode itself is ~1,000 rows/s there at d_sae 65,536,
so the analysis is ~2.5 minutes of it); --rows scales it.
--store analyses an existing store instead (all its shards), with the same random SAE.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def make_store(root: Path, rows: int, d_in: int, rows_per_shard: int) -> Path:
    from helpers.synthetic import write_synthetic_dataset

    rows_per_shard = max(64, rows_per_shard // 64 * 64)  # whole contexts of the synthetic store's 64 tokens
    shards = math.ceil(rows / rows_per_shard)
    return write_synthetic_dataset(root, d=d_in, shards=shards, rows_per_shard=rows_per_shard, features=4 * d_in,
                                   active=8, row_group_rows=4096)


def make_sae(directory: Path, store: Path, d_sae: int, k: int) -> Path:
    """A random TopK SAE with its data-dependent init (input scale, b_dec) from the store, in the SAELens format."""
    import torch

    from pipeline.sae import SAEConfig, export_saelens
    from pipeline.sae import make_sae as build
    from pipeline.store import ActivationDataset

    ds = ActivationDataset.open(store)
    sae = build(SAEConfig(arch="topk", d_in=ds.d_model, d_sae=d_sae, k=k, b_dec_init="mean", seed=0))
    sae.init_from_sample(ds.read_acts(0, torch.float32)[:8192])
    export_saelens(sae, directory)
    return directory


def child_encode(args) -> dict:
    """Bare encode of the rows the analysis reads, timed over the encode only."""
    import torch

    from pipeline.analysis.analyze import encode_batch_size
    from pipeline.sae import load_saelens
    from pipeline.store import ActivationDataset

    torch.set_num_threads(args.threads)
    ds = ActivationDataset.open(args.store)
    sae = load_saelens(args.sae).eval()
    batch = encode_batch_size(args.batch_size, sae.cfg.d_sae, torch.device("cpu"))
    seconds, rows, active = 0.0, 0, 0
    with torch.no_grad():
        for shard in range(ds.num_shards):
            if rows >= args.encode_rows:
                break
            acts = ds.read_acts(shard, torch.bfloat16)[: args.encode_rows - rows]
            t = time.perf_counter()
            for start in range(0, acts.shape[0], batch):
                r, _, _ = sae.encode_sparse(acts[start : start + batch].float())
                active += r.numel()
            seconds += time.perf_counter() - t
            rows += acts.shape[0]
    return {"rows": rows, "seconds": seconds, "l0": active / rows, "peak_rss_mb": _peak_rss_mb()}


def child_analyze(args) -> dict:
    import torch

    from pipeline.analysis.analyze import run_analysis
    from pipeline.store import ActivationDataset

    torch.set_num_threads(args.threads)
    shards = list(range(ActivationDataset.open(args.store).num_shards))
    t = time.perf_counter()
    out = run_analysis(args.sae, store=args.store, out=args.out, shards=shards, batch_size=args.batch_size,
                       device="cpu", show_progress=False)
    seconds = time.perf_counter() - t
    meta = json.loads((out / "analysis.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"rows": meta["tokens"], "seconds": seconds, "phase_seconds": meta.get("phase_seconds"),
            "examples": meta["examples"], "dead": meta["dead"], "bytes": sizes, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _child(mode: str, args, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(args.store), "--sae", str(args.sae),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--encode-rows", str(args.encode_rows)]
    if out is not None:
        cmd += ["--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=131_072, help="rows of the synthetic store")
    p.add_argument("--encode-rows", type=int, default=32_768, help=(
        "rows of each bare-encode measurement (the first ones of the store; its rate does not depend on how many)"))
    p.add_argument("--rows-per-shard", type=int, default=16_384)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=65_536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096, help="run_analysis's batch_size (capped as it caps it)")
    p.add_argument("--store", type=Path, help="an existing store to analyse (all shards) instead of a synthetic one")
    p.add_argument("--keep", type=Path, help="build the store, SAE and analysis here and keep them")
    p.add_argument("--child", choices=["encode", "analyze"], help=argparse.SUPPRESS)
    p.add_argument("--sae", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_encode(args) if args.child == "encode" else child_analyze(args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-analyze-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if args.store is None:
            args.store = make_store(work / "store", args.rows, args.d_in, args.rows_per_shard)
        args.sae = make_sae(work / "sae", args.store, args.d_sae, args.k)
        setup_s = time.perf_counter() - t
        before = _child("encode", args)
        analysis = _child("analyze", args, work / "analysis")
        after = _child("encode", args)
    encode_tps = [r["rows"] / r["seconds"] for r in (before, after)]
    analyze_tps = analysis["rows"] / analysis["seconds"]
    print(json.dumps({
        "benchmark": "analyze",
        "rows": analysis["rows"],
        "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "threads": args.threads,
        "l0": round(before["l0"], 2),
        "analyze_tokens_per_s": round(analyze_tps, 1),
        "encode_tokens_per_s": [round(v, 1) for v in encode_tps],
        "analyze_vs_encode": round(analyze_tps / (sum(encode_tps) / 2), 3),
        "goal_analyze_vs_encode": 0.7,
        "analyze_peak_rss_mb": analysis["peak_rss_mb"],
        "encode_peak_rss_mb": max(before["peak_rss_mb"], after["peak_rss_mb"]),
        "phase_seconds": analysis["phase_seconds"],
        "examples": analysis["examples"],
        "dead": analysis["dead"],
        "output_bytes": analysis["bytes"],
        "setup_s": round(setup_s, 1),
    }))


if __name__ == "__main__":
    main()
