"""`saepipe verify ROOT`: check every shard against the xxh3 checksum its manifest lists (exit 2 on any mismatch)."""
from __future__ import annotations

import argparse

from pipeline.errors import StoreError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("verify", parents=[common], description=__doc__,
                       help="check the store's shard checksums (corrupt or overwritten files)")
    p.add_argument("root")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pipeline.store import ActivationDataset

    ds = ActivationDataset.open(args.root)
    t0 = time.perf_counter()
    problems = ds.verify(progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    size = sum(s.acts_bytes + s.ctx_bytes for s in ds.shards)
    for problem in problems:
        print(problem)
    if problems:
        raise StoreError(f"{args.root}: {len(problems)} of {2 * ds.num_shards} shard files fail their checksum")
    print(f"{args.root}: {ds.num_shards} shards ({size / 1e6:.1f} MB) match their checksums "
          f"({size / max(seconds, 1e-9) / 1e9:.2f} GB/s)"
          + (f"; incomplete: {'; '.join(ds.incomplete)}" if ds.incomplete else ""))
    return 0
