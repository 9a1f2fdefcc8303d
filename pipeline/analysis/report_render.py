"""The files of `saepipe report`: report.json, report.md and four PNGs (firing frequencies, the loss around each
resampling round, the top-k reconstruction, the ablation), written into the (temporary) report directory."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .report_checks import FirstPass
from .resample_log import TrainingLog

REPORT_MD, REPORT_JSON = "report.md", "report.json"
DENSITY_PNG, RESAMPLE_PNG, TOPK_PNG, ABLATION_PNG = "density.png", "resampling.png", "topk.png", "ablation.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def plot_resampling(training: TrainingLog, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if training.steps:
        ax.plot(training.steps, training.loss, color="tab:blue", lw=1.2, label="training loss (logging interval)")
    for i, r in enumerate(training.rounds):
        ax.axvline(r.step, color="grey", ls=":", lw=1)
        ax.scatter([r.step], [r.loss_before], marker="o", color="tab:green", zorder=3,
                   label="on the round's sample, before" if i == 0 else None)
        ax.scatter([r.step], [r.loss_after], marker="x", color="tab:red", zorder=3,
                   label="on the round's sample, after" if i == 0 else None)
    if training.steps and all(v > 0 for v in training.loss if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE + sparsity term)")
    ax.set_title(f"loss around {len(training.rounds)} resampling round(s) (dotted)" if training.rounds
                 else "no resampling in this run")
    if training.steps or training.rounds:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_topk(first: FirstPass, reconstruction: dict, top: int, path: Path) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    labels = ["all latents", f"top {top}\nper token", f"{top} most\nfrequent"]
    values = [reconstruction["fvu_all"], reconstruction["fvu_top"], reconstruction["fvu_frequent"]]
    bars = left.bar(labels, values, color=["tab:blue", "tab:orange", "tab:grey"])
    left.bar_label(bars, fmt="%.3f", fontsize=8)
    left.set_ylabel("FVU (held out)")
    left.set_title("reconstruction", fontsize=9)
    l0 = first.l0.numpy()
    right.hist(l0, bins=min(60, max(1, int(l0.max()) + 1)), color="tab:blue")
    right.axvline(top, color="tab:orange", ls="--", label=f"{top}")
    right.set_xlabel("active latents per token (L0)")
    right.set_ylabel("tokens")
    right.set_title(f"{reconstruction['tokens_over_top_pct']:.1f}% of tokens have more than {top}", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _label(token: str, limit: int = 18) -> str:
    text = token.replace("\n", "⏎").replace("\t", "⇥").replace("$", r"\$")  # matplotlib reads $...$ as math
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_ablation(ablation: list[dict], path: Path) -> None:
    plt = _plt()
    n = max(1, len(ablation))
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.2 + 1.5 * n), squeeze=False)
    for ax, latent in zip(axes[:, 0], ablation):
        tokens = latent["tokens"][::-1]  # largest at the top
        ax.barh([f"{_label(t['token'])} (row {t['row']})" for t in tokens], [t["delta"] for t in tokens],
                color="tab:red")
        ax.set_title(f"latent {latent['latent']}: +{100 * latent['share_of_sq_err']:.2f}% squared error when zeroed",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("increase of the token's squared error when the latent is zeroed")
    if not ablation:
        axes[0, 0].text(0.5, 0.5, "no latent fired", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    plt = _plt()
    try:
        fig.savefig(path, dpi=100, format="png")  # into the temp directory: the whole directory is swapped in
    finally:
        plt.close(fig)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎ ").replace("\r", "")


def markdown(report, training: TrainingLog) -> str:
    r, d = report.reconstruction, report.dead
    lines = [f"# Report of `{report.run_dir}`", "",
             f"{report.arch} SAE, {report.d_in} → {report.d_sae} latents ({report.sae_dir}), on {report.tokens} "
             f"held-out tokens of `{report.store_root}` (shards {report.shards}, never trained on). Seed 000's checks.",
             "", "## Dead latents", "",
             f"- **{d['pct']:.2f}%** ({d['count']} of {report.d_sae}) never fire on these tokens.",
             f"- {d['pct_seed002_rule']:.2f}% never exceed 0.07 (seed 002's rule for a dead latent).",
             ]
    if d["training_last_pct"] is not None:
        lines.append(f"- At the end of training, {d['training_last_pct']:.2f}% had not fired within `sae.dead_tokens` "
                     "training tokens.")
    lines += ["", f"![firing frequencies]({DENSITY_PNG})", "", "## Loss before and after resampling", ""]
    rounds = report.resampling["rounds"]
    if rounds:
        lines += ["Loss on each round's own sample of training rows just before and just after the resampling edit, "
                  "and the training loss of the logging interval before the round and of the first one after it.", "",
                  "| step | round | latents resampled | sample loss before | after | recon loss before | after | "
                  "FVU before | after | training loss before | after (step) |", "|" + "---|" * 11]
        for x in rounds:
            after = (f"{x['train_loss_after']:.4g} ({x['train_step_after']})" if x["train_loss_after"] is not None
                     else "—")
            before = f"{x['train_loss_before']:.4g}" if x["train_loss_before"] is not None else "—"
            lines.append(f"| {x['step']} | {x['round']} | {x['resampled']} | {x['loss_before']:.4g} | "
                         f"{x['loss_after']:.4g} | {x['recon_loss_before']:.4g} | {x['recon_loss_after']:.4g} | "
                         f"{x['fvu_before']:.4f} | {x['fvu_after']:.4f} | {before} | {after} |")
    else:
        note = report.resampling["note"]
        lines.append(note[:1].upper() + note[1:] + ".")
    lines += ["", f"![loss around resampling]({RESAMPLE_PNG})", "",
              f"## Reconstruction with the top {report.top} latents", "",
              "| latents kept | FVU |", "|---|---|",
              f"| all (mean L0 {r['l0_mean']:.1f}, max {r['l0_max']}) | {r['fvu_all']:.4f} |",
              f"| the top {report.top} active latents of each token | {r['fvu_top']:.4f} |",
              f"| the {report.top} most frequently firing latents, for every token | {r['fvu_frequent']:.4f} |", "",
              f"{r['tokens_over_top_pct']:.2f}% of the tokens have more than {report.top} active latents; for the "
              "others the top-k reconstruction is the full one.", "", f"![top-k reconstruction]({TOPK_PNG})", "",
              "## Tokens whose reconstruction suffers most when a latent is ablated", "",
              "The latents whose zeroing raises the total squared error most, and for each the tokens whose squared "
              "error rises most (Δ), with the token «marked» in its context (reverse lookup through the store).", ""]
    for a in report.ablation:
        lines += [f"### Latent {a['latent']}", "",
                  f"Fires on {a['fired']} of the tokens; zeroing it raises the total squared error by "
                  f"{a['total_delta']:.4g} ({100 * a['share_of_sq_err']:.2f}%).", "",
                  "| Δ | activation | squared error before | token | context | document | row |", "|---|---|---|---|---|---|---|"]
        for t in a["tokens"]:
            lines.append(f"| {t['delta']:.4g} | {t['activation']:.3g} | {t['sq_err']:.4g} | `{_md_escape(t['token'])}` | "
                         f"{_md_escape(t['context'])} | {_md_escape(str(t['doc_id']))} | {t['row']} |")
        lines.append("")
    lines += [f"![ablation]({ABLATION_PNG})", "", f"Computed in {report.seconds:.1f} s.", ""]
    return "\n".join(lines)


def write_report_files(directory: Path, report, first: FirstPass, training: TrainingLog) -> None:
    from pipeline.eval import save_density_histogram

    save_density_histogram(first.density, directory / DENSITY_PNG, title=f"{report.tokens} held-out tokens")
    plot_resampling(training, directory / RESAMPLE_PNG)
    plot_topk(first, report.reconstruction, report.top, directory / TOPK_PNG)
    plot_ablation(report.ablation, directory / ABLATION_PNG)
    (directory / REPORT_MD).write_text(markdown(report, training))
    (directory / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2) + "\n")

