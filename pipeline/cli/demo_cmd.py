"""`saepipe demo`: the whole pipeline on the embedded default (bundled sample corpus, SmolLM2, local, CPU)."""
from __future__ import annotations

import argparse
import glob
import logging
import time
from pathlib import Path

from pipeline.config import load_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SAMPLE_DIR = REPO / "data" / "pile-sample"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on the bundled sample corpus")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="extraction config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the extraction config")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def ensure_sample(paths: list[str]) -> None:
    """The sample is committed; rebuild it from Debian packages only if someone deleted it."""
    if all(glob.glob(p) for p in paths):
        return
    from pipeline.corpus.build_sample import main as build_sample

    log.info("sample corpus missing: building it from Debian packages into %s", SAMPLE_DIR)
    build_sample(["--out", str(SAMPLE_DIR)])


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.info_cmd import print_summary, summarize
    from pipeline.config import ExtractRunConfig
    from pipeline.extract.runner import run_extract
    from pipeline.store import ActivationDataset

    t0 = time.perf_counter()
    cfg = load_config(ExtractRunConfig, args.config, args.overrides)
    ensure_sample(cfg.corpus.paths)
    print(f"[1/2] extract: layer {cfg.extract.layer} ({cfg.extract.hook}) of {cfg.model.name}, "
          f"{cfg.corpus.token_budget} tokens -> {cfg.store.root}")
    run_extract(cfg, show_progress=not args.no_progress)
    ds = ActivationDataset.open(cfg.store.root)
    print("\ndataset summary")
    print_summary(summarize(ds))
    print("\n[2/2] three example lookups (the token in «»)")
    for row in (0, ds.num_rows // 2, ds.num_rows - 1):
        print(ds.lookup(row))
        print()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
