"""The sweep's results: one row per cell (finished or not) as results.csv and results.md, and two plots (FVU against
L0; dead latents per expansion factor, resampling off and on), each next to seed 002's published numbers. Built from
the cells' cell.json files alone, so it can be rebuilt at any time (`saepipe sweep CONFIG --table`); the files are
replaced atomically, under a lock, so that cells finishing together leave the table of the last one."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import time
from pathlib import Path

from pipeline.config.sweep import Cell, SweepConfig
from pipeline.io import atomic_write_text, save_png

from . import seed002
from .sweep_cell import read_cell

CSV_FILE, MD_FILE = "results.csv", "results.md"
FVU_PLOT, DEAD_PLOT = "fvu_vs_l0.png", "dead_by_expansion.png"
LOCK_FILE = ".results.lock"
MONOSEMANTIC_LATER = "labelled later"
COLUMNS = ["cell", "expansion", "d_sae", "l1_coefficient", "resampling", "status", "steps", "tokens", "dead_pct",
           "dense_pct", "l0", "fvu", "mse", "ce_loss_score", "kl_div_score", "resample_rounds", "resampled_latents",
           "features_min10", "monosemantic_pct", "seed002_lambda", "seed002_dead_pct", "seed002_monosemantic_pct"]


def cell_row(sweep: SweepConfig, cell: Cell) -> dict:
    record = read_cell(cell)
    ev = record.get("eval") or {}
    spliced = record.get("spliced") or {}
    resampling = record.get("resampling") or {}
    analysis = record.get("analysis") or {}
    lambdas = sweep.grid.l1_coefficients
    lam = seed002.seed_lambda(cell.l1_coefficient, lambdas) if lambdas else None
    return {
        "cell": cell.name, "expansion": cell.expansion, "d_sae": cell.train.sae.d_sae,
        "l1_coefficient": cell.l1_coefficient if cell.train.sae.arch in ("relu_2023", "relu_2024") else None,
        "resampling": "on" if cell.resample else "off", "status": record.get("status", "not run"),
        "steps": (record.get("train") or {}).get("step"), "tokens": (record.get("train") or {}).get("tokens"),
        "dead_pct": ev.get("dead_pct"), "dense_pct": ev.get("dense_pct"), "l0": ev.get("l0"), "fvu": ev.get("fvu"),
        "mse": ev.get("mse"), "ce_loss_score": spliced.get("ce_loss_score"), "kl_div_score": spliced.get("kl_div_score"),
        "resample_rounds": resampling.get("rounds"), "resampled_latents": resampling.get("resampled"),
        "features_min10": analysis.get("features_min10"),
        "monosemantic_pct": MONOSEMANTIC_LATER,
        **{k: None for k in ("seed002_lambda", "seed002_dead_pct", "seed002_monosemantic_pct")},
        **seed002.reference(cell.expansion, lam, cell.resample),
    }


def rows(sweep: SweepConfig) -> list[dict]:
    return [cell_row(sweep, c) for c in sweep.cells()]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def to_csv(table: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: _fmt(row[k]) for k in COLUMNS})
    return out.getvalue()


def _md_cell(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def to_markdown(sweep: SweepConfig, table: list[dict]) -> str:
    shown = [("cell", "cell"), ("expansion", "×"), ("d_sae", "d_sae"), ("l1_coefficient", "λ"),
             ("resampling", "resampling"), ("status", "status"), ("dead_pct", "dead %"), ("l0", "L0"), ("fvu", "FVU"),
             ("ce_loss_score", "ce_loss_score"), ("kl_div_score", "kl_div_score"), ("resampled_latents", "resampled"),
             ("monosemantic_pct", "monosemantic %"), ("seed002_dead_pct", "seed 002 dead %"),
             ("seed002_monosemantic_pct", "seed 002 monosemantic %")]
    lines = [f"# Sweep {Path(sweep.sweep_dir).name}", "",
             f"Base: {sweep.base.sae.arch}, d_in {sweep.base.sae.d_in}, {sweep.base.train.total_steps} steps of "
             f"{sweep.base.train.batch_size} rows on `{sweep.base.data.root}`; {len(table)} cells "
             f"({sum(r['status'] == 'completed' for r in table)} completed). Updated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| " + " | ".join(h for _, h in shown) + " |", "|" + "---|" * len(shown)]
    for row in table:
        lines.append("| " + " | ".join(_md_cell(row[k]) for k, _ in shown) + " |")
    lines += ["", "- dead %: latents that never fired on the held-out window (`eval.max_rows` tokens of the held-out "
              "shards, the trainer's final evaluation); dense % and MSE are in results.csv.",
              "- ce_loss_score, kl_div_score: with the SAE spliced into the model (`stages.spliced_eval`); — where not "
              "computed.",
              f"- monosemantic %: {MONOSEMANTIC_LATER} (seed 002 asked an LLM to label the top and bottom 25 "
              "features by selectivity; features_min10 in results.csv counts the candidates, features firing on at "
              "least 10 tokens).",
              "- seed 002 columns: its published numbers for the same expansion and resampling, matched to its λ by "
              "rank (the larger λ of a two-λ grid stands for its 1e-2, the smaller for its 1e-4): its λ is in other "
              "loss units, and it counts a latent dead when every activation is below 0.07.", "",
              f"![FVU against L0]({FVU_PLOT})", "", f"![dead latents per expansion]({DEAD_PLOT})", "",
              f"## Seed 002's published numbers", "", f"Source: {seed002.SOURCE}.", "", seed002.markdown_tables(), ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    save_png(fig, path, dpi=110)


def plot_fvu_vs_l0(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if r["fvu"] is not None and r["l0"] is not None]
    expansions = sorted({r["expansion"] for r in table})
    colors = {e: plt.cm.viridis(i / max(1, len(expansions) - 1)) for i, e in enumerate(expansions)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for e in expansions:
        for resampling in ("off", "on"):
            pts = sorted((r["l0"], r["fvu"]) for r in done if r["expansion"] == e and r["resampling"] == resampling)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-" if resampling == "on" else "--", color=colors[e], alpha=0.6)
            ax.scatter(xs, ys, s=40, color=colors[e] if resampling == "on" else "white", edgecolors=colors[e],
                       linewidths=1.5, zorder=3, label=f"{e}×, resampling {resampling}")
    if any(r["l0"] > 0 for r in done):
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token, held out)")
    ax.set_ylabel("FVU (held out)")
    ax.set_title("Reconstruction against sparsity, one point per cell (lines join the λ values)")
    ax.title.set_fontsize(9)
    if done:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no finished cell yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_dead_by_expansion(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    lambdas = sorted({r["l1_coefficient"] for r in table if r["l1_coefficient"] is not None}, reverse=True) or [None]
    for ax, resampling in zip(axes, ("off", "on")):
        for i, lam in enumerate(lambdas):
            pts = sorted((r["expansion"], r["dead_pct"]) for r in table if r["resampling"] == resampling
                         and r["l1_coefficient"] == lam and r["dead_pct"] is not None)
            color = f"C{i}"
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=color, label="this sweep" + (f", λ={lam:g}" if lam is not None else ""))
            seed_lam = seed002.seed_lambda(lam, lambdas) if lam is not None else None
            if seed_lam is not None:  # the seed's whole published curve for the λ this one stands for
                ax.plot(seed002.EXPANSIONS, seed002.DEAD_PCT[(seed_lam, resampling == "on")], "s:", color=color,
                        alpha=0.6, label=f"seed 002, λ={seed_lam:g} (its units)")
        if len(lambdas) != 2:  # no λ of this grid stands for one of the seed's: its curves alone
            for j, lam in enumerate(seed002.LAMBDAS):
                ax.plot(seed002.EXPANSIONS, seed002.DEAD_PCT[(lam, resampling == "on")], "s:", color="grey",
                        alpha=0.4 + 0.3 * j, label=f"seed 002, λ={lam:g} (its units)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["expansion"] for r in table} | set(seed002.EXPANSIONS)))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.set_xlabel("expansion factor (d_sae / d_in)")
        ax.set_title(f"resampling {resampling}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("dead latents (%)")
    fig.suptitle("Dead latents per expansion: this sweep (held-out window) and seed 002 (published)", fontsize=9)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)  # POSIX locks: honoured across NFS clients, unlike flock on some mounts
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def write_results(sweep: SweepConfig) -> dict[str, Path]:
    """results.csv, results.md and the two plots in the sweep directory; returns their paths."""
    directory = Path(sweep.sweep_dir)
    paths = {"csv": directory / CSV_FILE, "markdown": directory / MD_FILE, "fvu_plot": directory / FVU_PLOT,
             "dead_plot": directory / DEAD_PLOT}
    with _locked(directory):
        table = rows(sweep)  # read under the lock: a later writer has seen at least as many finished cells
        atomic_write_text(paths["csv"], to_csv(table))
        plot_fvu_vs_l0(table, paths["fvu_plot"])
        plot_dead_by_expansion(table, paths["dead_plot"])
        atomic_write_text(paths["markdown"], to_markdown(sweep, table))
    return paths
