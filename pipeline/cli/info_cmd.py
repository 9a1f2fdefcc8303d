"""`saepipe info ROOT` summarises a dataset; `saepipe lookup ROOT ROW...` shows rows in their context."""
from __future__ import annotations

import argparse
import json

from pipeline.errors import StoreError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="summarise an activation dataset")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_info)
    q = sub.add_parser("lookup", parents=[common], help="show dataset rows as tokens in their context")
    q.add_argument("root")
    q.add_argument("rows", nargs="+", type=int, metavar="ROW", help="global row indices, 0 .. rows-1")
    q.set_defaults(func=run_lookup)


def summarize(ds) -> dict:
    import pyarrow.compute as pc

    meta = ds.meta
    shard_bytes = sum(s.acts_bytes for s in ds.shards)
    subsets = pc.value_counts(ds.read_metadata(columns=["subset"]).column("subset").combine_chunks().cast("string"))
    skips: dict[str, int] = {}
    for manifest in ds.manifests.values():
        for reason, n in manifest.skips.items():
            skips[reason] = skips.get(reason, 0) + n
    return {
        "root": str(ds.root),
        "model": meta.model,
        "layer": meta.layer,
        "hook": meta.hook,
        "d_model": meta.d_model,
        "ctx_len": meta.ctx_len,
        "layout": meta.layout,
        "tasks": len(ds.manifests),
        "complete": not ds.incomplete,
        "shards": ds.num_shards,
        "rows": ds.num_rows,
        "activation_bytes_raw": ds.num_rows * meta.d_model * 2,
        "shard_bytes": shard_bytes,
        "compression_ratio": round(ds.num_rows * meta.d_model * 2 / shard_bytes, 3) if shard_bytes else None,
        "rows_by_subset": {s["values"]: s["counts"] for s in subsets.to_pylist()},
        "skipped_records": skips,
        "checksums": "not verified here (saepipe verify ROOT)",
    }


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def run_info(args: argparse.Namespace) -> int:
    from pipeline.store import ActivationDataset

    summary = summarize(ActivationDataset.open(args.root))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def run_lookup(args: argparse.Namespace) -> int:
    from pipeline.store import ActivationDataset

    ds = ActivationDataset.open(args.root)
    bad = [r for r in args.rows if not 0 <= r < ds.num_rows]
    if bad:
        raise StoreError(f"{args.root}: row {bad[0]} is out of range: the dataset has {ds.num_rows} rows "
                         f"(0 .. {ds.num_rows - 1})")
    for row in args.rows:
        print(ds.lookup(row))
        print()
    return 0
