"""`saepipe report RUN`: seed 000's checks of a training run, as RUN/report/ (report.md, report.json and PNGs,
written under a temp name and swapped in whole) and a terminal summary.

    report = run_report("runs/demo/sae-relu2023")
    print(summary(report))

The checks, on the run's held-out shards (never trained on): the dead-latent share; the loss before and after each
resampling round (from metrics.jsonl); the reconstruction keeping only the top-64 active latents per token against
all of them; and the tokens whose reconstruction suffers most when one of the most important latents is zeroed, shown
in context through the store's reverse lookup. See report_checks.py for the arithmetic."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.io import atomic_replace_dir

from .report_checks import AblatedLatent, FirstPass, first_pass, second_pass
from .report_render import REPORT_JSON, REPORT_MD, write_report_files
from .resample_log import TrainingLog, read_training_log
from .source import open_sae_source

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FORMAT = "saepipe-report/1"


@dataclass
class Report:
    run_dir: str
    sae_dir: str
    store_root: str
    arch: str
    d_in: int
    d_sae: int
    shards: list[int]
    tokens: int
    top: int
    dead: dict
    resampling: dict
    reconstruction: dict
    ablation: list[dict]
    seconds: float
    out: str = ""

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


def _training_setup(run_dir: Path | None) -> tuple[str | None, bool]:
    """(the recipe, whether it resamples) from a training run's config; (None, False) for a bare SAELens dir."""
    if run_dir is None:
        return None, False
    from pipeline.config import load_config
    from pipeline.config.train import TrainRunConfig

    cfg = load_config(TrainRunConfig, run_dir / "config.yaml")
    return cfg.sae.arch, cfg.sae.resample is not None


def held_out_batches(dataset, shards: list[int], tokens: int | None, batch_size: int):
    """A factory of fresh iterators over (global rows, activations) of the first `tokens` held-out rows."""

    def batches():
        have = 0
        for shard in shards:
            if tokens is not None and have >= tokens:
                return
            acts = dataset.read_acts(shard, dtype=torch.bfloat16)
            take = acts.shape[0] if tokens is None else min(acts.shape[0], tokens - have)
            first_row = dataset.shards[shard].row_offset
            for start in range(0, take, batch_size):
                end = min(start + batch_size, take)
                yield torch.arange(first_row + start, first_row + end), acts[start:end]
            have += take

    return batches


def describe_row(dataset, row: int, context_tokens: int = 8) -> dict:
    """The token behind a row in its context (reverse lookup); ids only when the store has no tokenizer."""
    from pipeline.store.layout import TOKENIZER_DIR

    if (Path(dataset.root) / TOKENIZER_DIR).is_dir():
        found = dataset.lookup(row, context_tokens=context_tokens)
        return {"row": row, "token": found.token, "token_id": found.token_id, "context": found.marked,
                "doc_id": found.doc_id, "context_id": found.context_id, "pos": found.pos}
    shard, local = dataset.locate(row)
    meta = dataset.read_metadata(shard, ["token_id", "doc_id", "context_id", "pos"]).slice(local, 1).to_pylist()[0]
    return {"row": row, "token": f"<token {meta['token_id']}>", "token_id": meta["token_id"], "context": "",
            "doc_id": meta["doc_id"], "context_id": meta["context_id"], "pos": meta["pos"]}


def _resampling_section(training: TrainingLog | None, configured: bool) -> dict:
    if training is None:
        return {"rounds": [], "note": "no resampling in this run: a bare SAELens directory has no training log"}
    if not training.rounds:
        why = ("sae.resample is set, but no round ran (the run was shorter than its interval, or every round came "
               "after max_rounds)" if configured else "this recipe or config does not resample")
        return {"rounds": [], "note": f"no resampling in this run: {why}"}
    return {"rounds": [asdict(r) for r in training.rounds], "note": "",
            "resampled_total": sum(r.resampled for r in training.rounds)}


def _ablation_section(dataset, ablated: list[AblatedLatent], context_tokens: int) -> list[dict]:
    out = []
    for latent in ablated:
        out.append({"latent": latent.latent, "total_delta": latent.total_delta, "share_of_sq_err": latent.share,
                    "fired": latent.fired,
                    "tokens": [{**describe_row(dataset, t.row, context_tokens), "delta": t.delta,
                                "activation": t.activation, "sq_err": t.sq_err} for t in latent.tokens]})
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no GPU is visible")
    return torch.device(device)


def _check_out(out: Path) -> None:
    """The report directory is replaced whole: refuse one that holds anything but an earlier report."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_JSON).exists())):
        raise ConfigError(f"{out}: exists and is not a report directory (no {REPORT_JSON}); choose another --out")


def run_report(run: str | Path, *, store: str | Path | None = None, out: str | Path | None = None,
               tokens: int | None = 16_384, top: int = 64, latents: int = 5, examples: int = 8,
               context_tokens: int = 8, batch_size: int = 2048, device: str = "auto",
               show_progress: bool = True) -> Report:
    """Seed 000's checks of the training run `run`, written to `out` (default RUN/report); returns the report."""
    from tqdm import tqdm

    for name, value in (("tokens", tokens), ("top", top), ("latents", latents), ("examples", examples),
                        ("batch_size", batch_size)):
        if value is not None and value <= 0:
            raise ConfigError(f"report: {name} must be positive, got {value}")
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such directory (expected a training run directory)")
    if out is None and not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a training run directory (no config.yaml): give --out for a bare SAELens dir")
    out = Path(out) if out is not None else run / REPORT_DIR
    _check_out(out)
    src = open_sae_source(run, store, device=str(dev))
    arch, resample_configured = _training_setup(src.run_dir)
    sae, dataset = src.sae, src.dataset
    try:
        available = sum(dataset.shards[s].rows for s in src.held_out_shards)
        n = available if tokens is None else min(tokens, available)
        batches = held_out_batches(dataset, src.held_out_shards, n, batch_size)
        with tqdm(total=2 * n, unit="tok", unit_scale=True, desc="report", disable=not show_progress) as bar:
            first: FirstPass = first_pass(sae, batches, top=top, device=dev, progress=bar.update)
            fvu_frequent, ablated = second_pass(sae, batches, first, top=top, latents=latents, examples=examples,
                                                device=dev, progress=bar.update)
        training = read_training_log(src.run_dir) if src.run_dir is not None else None
        l0 = first.l0.float()
        report = Report(
            run_dir=str(src.run_dir or run), sae_dir=str(src.sae_dir), store_root=str(dataset.root),
            arch=arch or sae.arch, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, shards=list(src.held_out_shards),
            tokens=first.tokens, top=top,
            dead={"pct": first.dead_pct, "count": int((first.fired == 0).sum()),
                  "pct_seed002_rule": first.dead_pct_seed002,
                  "training_last_pct": training.dead_pct[-1] if training and training.dead_pct else None},
            resampling=_resampling_section(training, resample_configured),
            reconstruction={"fvu_all": first.fvu_all, "fvu_top": first.fvu_top, "fvu_frequent": fvu_frequent,
                            "l0_mean": l0.mean().item(), "l0_max": int(first.l0.max()),
                            "tokens_over_top_pct": 100.0 * (first.l0 > top).double().mean().item()},
            ablation=_ablation_section(dataset, ablated, context_tokens),
            seconds=0.0, out=str(out),
        )
        report.seconds = round(time.perf_counter() - t0, 2)
        atomic_replace_dir(out, lambda tmp: write_report_files(tmp, report, first, training or TrainingLog([], [], [], [], [])))
    finally:
        dataset.close()
    log.info("report of %s in %s (%.1f s)", run, out, report.seconds)
    return report


def summary(report: Report) -> str:
    """A few lines for the terminal."""
    r, d = report.reconstruction, report.dead
    lines = [f"report of {report.run_dir} ({report.arch}, {report.d_sae} latents) on {report.tokens} held-out tokens",
             f"  dead latents: {d['pct']:.1f}% ({d['count']} of {report.d_sae}) never fire; "
             f"{d['pct_seed002_rule']:.1f}% never exceed 0.07 (seed 002's rule)"]
    rounds = report.resampling["rounds"]
    if rounds:
        lines.append(f"  resampling: {len(rounds)} round(s), {report.resampling['resampled_total']} latents; loss on "
                     "the round's sample before → after: " + ", ".join(
                         f"step {x['step']}: {x['loss_before']:.4g} → {x['loss_after']:.4g}" for x in rounds[:4])
                     + (" …" if len(rounds) > 4 else ""))
    else:
        lines.append(f"  resampling: {report.resampling['note']}")
    lines.append(f"  reconstruction: FVU {r['fvu_all']:.4f} with all latents (mean L0 {r['l0_mean']:.1f}), "
                 f"{r['fvu_top']:.4f} keeping the top {report.top} per token ({r['tokens_over_top_pct']:.1f}% of "
                 f"tokens have more), {r['fvu_frequent']:.4f} with only the {report.top} most frequent latents")
    for a in report.ablation[:3]:
        worst = ", ".join(f"{t['token']!r} +{t['delta']:.3g}" for t in a["tokens"][:3])
        lines.append(f"  ablating latent {a['latent']} ({100 * a['share_of_sq_err']:.2f}% more squared error): {worst}")
    lines.append(f"  report: {Path(report.out) / REPORT_MD}")
    return "\n".join(lines)
