"""`saepipe demo`: the whole pipeline on the embedded default (bundled sample corpus, SmolLM2, local, CPU).

extract (configs/demo.yaml) -> dataset summary and lookups -> train the TopK SAE (configs/sae-demo.yaml) -> held-out
metrics next to a PCA baseline of the same size. Re-running resumes both stages instead of starting over.
"""
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
SAE_CONFIG = REPO / "configs" / "sae-demo.yaml"
SAMPLE_DIR = REPO / "data" / "pile-sample"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on the bundled sample corpus")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="extraction config (default: configs/demo.yaml)")
    p.add_argument("--sae-config", default=str(SAE_CONFIG), help="SAE training config (default: configs/sae-demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the extraction config")
    p.add_argument("--no-train", action="store_true", help="stop after extraction")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def ensure_sample(paths: list[str]) -> None:
    """The sample is committed; rebuild it from Debian packages only if someone deleted it."""
    if all(glob.glob(p) for p in paths):
        return
    from pipeline.corpus.build_sample import main as build_sample

    log.info("sample corpus missing: building it from Debian packages into %s", SAMPLE_DIR)
    build_sample(["--out", str(SAMPLE_DIR)])


def extract_stage(args: argparse.Namespace):
    from pipeline.cli.info_cmd import print_summary, summarize
    from pipeline.config import ExtractRunConfig
    from pipeline.extract.runner import run_extract
    from pipeline.store import ActivationDataset

    cfg = load_config(ExtractRunConfig, args.config, args.overrides)
    ensure_sample(cfg.corpus.paths)
    print(f"[1/3] extract: layer {cfg.extract.layer} ({cfg.extract.hook}) of {cfg.model.name}, "
          f"{cfg.corpus.token_budget} tokens -> {cfg.store.root}", flush=True)
    run_extract(cfg, show_progress=not args.no_progress)
    ds = ActivationDataset.open(cfg.store.root)
    print("\ndataset summary")
    print_summary(summarize(ds))
    print("\nthree example rows looked up in their context (the token in «»)")
    for row in (0, ds.num_rows // 2, ds.num_rows - 1):
        print(" ", ds.lookup(row))
    return cfg, ds


def train_stage(args: argparse.Namespace, store_root: str) -> None:
    from pipeline.config.train import TrainRunConfig
    from pipeline.train import pca_topk_fvu
    from pipeline.train.data import split_shards
    from pipeline.train.evaluate import read_eval_rows
    from pipeline.train.trainer import train

    cfg = load_config(TrainRunConfig, args.sae_config, [f"data.root={store_root}", "resume=auto"])
    print(f"\n[2/3] train: {cfg.sae.arch} SAE, {cfg.sae.d_in} -> {cfg.sae.d_sae} latents (k={cfg.sae.k}), "
          f"{cfg.train.total_steps} steps of {cfg.train.batch_size} tokens -> {cfg.run_dir}", flush=True)
    result = train(cfg)
    if result.status != "completed" or not result.eval:
        raise RuntimeError(f"training ended as {result.status}; rerun `saepipe demo` to resume")

    print("\n[3/3] held-out evaluation (shards never trained on)")
    from pipeline.store import ActivationDataset

    ds = ActivationDataset.open(store_root)
    split = split_shards(ds, cfg.data)
    eval_rows = read_eval_rows(ds, split.eval, cfg.eval.max_rows)
    fit_rows = read_eval_rows(ds, split.train, 65_536)
    pca = pca_topk_fvu(fit_rows, eval_rows, cfg.sae.k)
    m = result.eval
    print(f"  {'':24}{'FVU':>8}{'L0':>8}{'dead %':>9}{'dense %':>9}")
    print(f"  {cfg.sae.arch + ' SAE':<24}{m['fvu']:>8.4f}{m['l0']:>8.1f}{m['dead_pct']:>9.2f}{m['dense_pct']:>9.2f}")
    print(f"  {f'PCA, top {cfg.sae.k} components':<24}{pca:>8.4f}{cfg.sae.k:>8}")
    print(f"  held-out rows: {len(eval_rows)}; metrics: {result.run_dir}/eval; SAELens export: {result.run_dir}/final")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg, _ = extract_stage(args)
    if not args.no_train:
        train_stage(args, cfg.store.root)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
