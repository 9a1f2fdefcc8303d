"""`saepipe demo`: the whole pipeline on the embedded default (bundled sample corpus, SmolLM2, local, CPU).

extract (configs/demo.yaml) -> dataset summary and lookups -> train the TopK SAE (configs/sae-demo.yaml) -> held-out
metrics next to a PCA baseline of the same size -> analysis (configs/analysis-demo.yaml): feature statistics, the CE
loss score with the SAE spliced into SmolLM2, three features' top contexts, one steering example, and the feature
browser -> labelling (configs/label-demo.yaml): three features explained and scored by SmolLM2-135M-Instruct behind
`transformers serve`, started on loopback for it. Re-running resumes every stage instead of starting over (and says so for a stage that has finished).
"""
from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import CorpusError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
SAE_CONFIG = REPO / "configs" / "sae-demo.yaml"
ANALYSIS_CONFIG = REPO / "configs" / "analysis-demo.yaml"
LABEL_CONFIG = REPO / "configs" / "label-demo.yaml"
SAMPLE_DIR = REPO / "data" / "pile-sample"


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the pipeline end to end on the bundled sample corpus",
                       description=__doc__)
    p.add_argument("--config", default=str(DEMO_CONFIG), help="extraction config (default: configs/demo.yaml)")
    p.add_argument("--sae-config", default=str(SAE_CONFIG), help="SAE training config (default: configs/sae-demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the extraction config")
    p.add_argument("--analysis-config", default=str(ANALYSIS_CONFIG),
                   help="analysis config (default: configs/analysis-demo.yaml)")
    p.add_argument("--label-config", default=str(LABEL_CONFIG),
                   help="labelling config (default: configs/label-demo.yaml)")
    p.add_argument("--no-train", action="store_true", help="stop after extraction")
    p.add_argument("--no-label", action="store_true", help="stop after the analysis")
    p.add_argument("--no-analysis", action="store_true", help="stop after training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def check_sample(paths: list[str]) -> None:
    """The sample is committed with the repository; say how to rebuild it if someone deleted it."""
    missing = [p for p in paths if not glob.glob(p)]
    if missing:
        raise CorpusError(f"the bundled sample corpus is missing ({missing[0]} matches nothing): restore it with "
                          f"`git checkout -- data/pile-sample` or rebuild it with `python data/build_sample.py --out {SAMPLE_DIR}`")


def extract_stage(args: argparse.Namespace, stop):
    from pipeline.cli.info_cmd import print_summary, summarize
    from pipeline.config import ExtractRunConfig
    from pipeline.extract.runner import ExtractionRunner
    from pipeline.store import ActivationDataset
    from pipeline.telemetry import job_telemetry

    cfg = load_config(ExtractRunConfig, args.config, args.overrides)
    check_sample(cfg.corpus.paths)
    print(f"[1/5] extract: layer {cfg.extract.layer} ({cfg.extract.hook}) of {cfg.model.name}, "
          f"{cfg.corpus.token_budget} tokens -> {cfg.store.root}", flush=True)
    # The demo does not wait for a last scrape at the end of a stage (telemetry.grace_s): it is watched in a terminal.
    with job_telemetry(cfg.telemetry.model_copy(update={"grace_s": 0.0}), "extract", cfg.store.root, task=0, stop=stop,
                       info={"model": cfg.model.name}) as telemetry, \
            ExtractionRunner(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=not args.no_progress) as runner:
        if telemetry.exporter is not None:
            print(f"  metrics: {telemetry.exporter.url}", flush=True)
        result = runner.run()
    if result.status == "already_complete":
        print("  already extracted: nothing to do")
    if result.status == "stopped":
        return cfg, None
    ds = ActivationDataset.open(cfg.store.root)
    print("\ndataset summary")
    print_summary(summarize(ds))
    print("\nthree example rows looked up in their context (the token in «»)")
    for row in (0, ds.num_rows // 2, ds.num_rows - 1):
        print(" ", ds.lookup(row))
    return cfg, ds


def train_stage(args: argparse.Namespace, store_root: str, stop) -> bool:
    from pipeline.config.train import TrainRunConfig
    from pipeline.eval import pca_topk_fvu, read_eval_rows, split_shards
    from pipeline.store import ActivationDataset
    from pipeline.telemetry import job_telemetry
    from pipeline.train.trainer import train

    cfg = load_config(TrainRunConfig, args.sae_config, [f"data.root={store_root}", "resume=auto"])
    print(f"\n[2/5] train: {cfg.sae.arch} SAE, {cfg.sae.d_in} -> {cfg.sae.d_sae} latents (k={cfg.sae.k}), "
          f"{cfg.train.total_steps} steps of {cfg.train.batch_size} tokens -> {cfg.run_dir}", flush=True)
    with job_telemetry(cfg.telemetry.model_copy(update={"grace_s": 0.0}), "train", cfg.run_dir, task=None, stop=stop,
                       info={"arch": cfg.sae.arch}) as telemetry:
        if telemetry.exporter is not None:
            print(f"  metrics: {telemetry.exporter.url}", flush=True)
        result = train(cfg, stop=stop, callbacks=telemetry.callbacks, show_progress=not args.no_progress)
    if result.status != "completed":
        return False
    if result.already_finished:
        print("  already trained: nothing to do")

    print("\n[3/5] held-out evaluation (shards never trained on)")
    ds = ActivationDataset.open(store_root)
    split = split_shards(ds, cfg.data.eval_shards)
    eval_rows = read_eval_rows(ds, split.eval, cfg.eval.max_rows)
    fit_rows = read_eval_rows(ds, split.train, 65_536)
    pca = pca_topk_fvu(fit_rows, eval_rows, cfg.sae.k)
    m = result.eval
    print(f"  {'':24}{'FVU':>8}{'L0':>8}{'dead %':>9}{'dense %':>9}")
    print(f"  {cfg.sae.arch + ' SAE':<24}{m['fvu']:>8.4f}{m['l0']:>8.1f}{m['dead_pct']:>9.2f}{m['dense_pct']:>9.2f}")
    print(f"  {f'PCA, top {cfg.sae.k} components':<24}{pca:>8.4f}{cfg.sae.k:>8}")
    print(f"  held-out rows: {len(eval_rows)}; metrics: {result.run_dir}/eval; SAELens export: {result.run_dir}/final")
    return True


def analysis_stage(args: argparse.Namespace, run_dir: str, stop, model) -> bool:
    from pipeline.analysis.demo_summary import print_features, steering_example
    from pipeline.analysis.stage import run_analysis_stage
    from pipeline.config.analysis import AnalysisRunConfig

    cfg = load_config(AnalysisRunConfig, args.analysis_config, [f"run={run_dir}"])
    print(f"\n[4/5] analysis of {cfg.run}: feature statistics, spliced evaluation, browser", flush=True)
    outcome = run_analysis_stage(cfg, stop=stop, model=model, show_progress=not args.no_progress)
    if outcome.status != "completed":
        return False
    if outcome.done_before:
        print(f"  already done: {', '.join(outcome.done_before)}")
    s = outcome.spliced
    print(f"  the SAE spliced into the model at the hooked layer, {s['tokens']} held-out tokens: CE clean {s['ce_clean']:.3f}, with the SAE {s['ce_sae']:.3f}, "
          f"zero-ablated {s['ce_zero']:.3f}")
    print(f"  ce_loss_score {s['ce_loss_score']:.3f}   kl_div_score {s['kl_div_score']:.3f}")
    print_features(outcome.analysis_dir, count=3)
    steering_example(outcome.analysis_dir, run_dir, model)
    print(f"\n  feature browser: {outcome.browser} (open it in a browser; no server needed)")
    return True


def label_stage(args: argparse.Namespace, run_dir: str, stop) -> bool:
    from pipeline.analysis.labels.report import format_labels
    from pipeline.analysis.labels.run import run_labelling
    from pipeline.config.label import LabelRunConfig

    cfg = load_config(LabelRunConfig, args.label_config, [f"run={run_dir}"])
    where = "transformers serve on loopback" if cfg.endpoint.serve else (cfg.endpoint.base_url or "$SAEPIPE_LABEL_BASE_URL")
    print(f"\n[5/5] label: {cfg.n if cfg.select == 'top_selectivity' else cfg.select} features explained and scored "
          f"(detection, fuzzing) by {cfg.endpoint.serve.model if cfg.endpoint.serve else cfg.endpoint.model} via "
          f"{where}", flush=True)
    outcome = run_labelling(cfg, stop=stop, show_progress=not args.no_progress)
    if outcome.status != "completed":
        return False
    print("  " + format_labels(outcome.out_dir, outcome.summary).replace("\n", "\n  "))
    print("  (0.5 is chance: a 135M model explains little; point endpoint.base_url at a larger one for real labels)")
    return True


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.io.process import EXIT_PREEMPTED, keep_freed_memory_on_heap, signal_stop

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        keep_freed_memory_on_heap()
    with signal_stop() as stop:
        cfg, ds = extract_stage(args, stop)
        stopped = ds is None or (not args.no_train and not train_stage(args, cfg.store.root, stop))
        if not stopped and not (args.no_train or args.no_analysis):
            from pipeline.config.train import TrainRunConfig
            from pipeline.extract.model import load_model

            run_dir = load_config(TrainRunConfig, args.sae_config, [f"data.root={cfg.store.root}"]).run_dir
            stopped = not analysis_stage(args, run_dir, stop, load_model(cfg.model, show_progress=not args.no_progress))
            if not stopped and not args.no_label:
                stopped = not label_stage(args, run_dir, stop)
        if stopped:
            print(f"\ndemo stopped ({stop.reason}); run it again to resume")
            return EXIT_PREEMPTED
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
