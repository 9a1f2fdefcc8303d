"""What `saepipe label` leaves for people and tools: labels.parquet (one row per labelled feature), labels.json (the
run's settings, endpoint and overall scores), labels.png (the per-feature scores), and the browser's label data when
the analysis has a browser."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_write_bytes, atomic_write_json

from .prompts import PROMPT_VERSION
from .scoring import Tally

log = logging.getLogger(__name__)

LABELS_FORMAT = "saepipe-labels/1"
LABELS_PARQUET, LABELS_JSON, LABELS_PNG = "labels.parquet", "labels.json", "labels.png"
SCORERS = ("detection", "fuzzing")
METRICS = ("accuracy", "f1", "precision", "recall")

LABELS_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("explanation", pa.string()), ("status", pa.string()),
    *[(f"{s}_{m}", pa.float64()) for s in SCORERS for m in METRICS],
    *[(f"{s}_n", pa.int32()) for s in SCORERS],
    ("malformed_answers", pa.int32()), ("answers", pa.int32()),
    ("explanation_raw", pa.string()), ("malformed_raw", pa.list_(pa.string())), ("model", pa.string()),
])


def labels_table(records: list[dict], model: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in LABELS_SCHEMA.names}
    for r in records:
        cols["feature"].append(r["feature"])
        cols["explanation"].append(r["explanation"])
        cols["status"].append(r["status"])
        for s in SCORERS:
            score = r.get(s) or {}
            for m in METRICS:
                cols[f"{s}_{m}"].append(score.get(m))
            cols[f"{s}_n"].append(score.get("n", 0))
        malformed = [a["raw"] for a in r["answers"] if a["said"] is None]
        cols["malformed_answers"].append(len(malformed))
        cols["answers"].append(len(r["answers"]))
        cols["explanation_raw"].append(r["explanation_raw"])
        cols["malformed_raw"].append(malformed)
        cols["model"].append(model)
    return pa.table(cols, schema=LABELS_SCHEMA)


def overall(records: list[dict]) -> dict:
    """Per scorer: the pooled (micro) metrics over every scored excerpt, and the mean of the per-feature accuracy and
    F1 over the features that have one."""
    out = {}
    for s in SCORERS:
        pooled = Tally()
        accs, f1s = [], []
        for r in records:
            score = r.get(s)
            if not score:
                continue
            pooled = pooled.merge(Tally(score["tp"], score["fp"], score["tn"], score["fn"], score["malformed"],
                                        score["answers"]))
            if score["accuracy"] is not None:
                accs.append(score["accuracy"])
            if score["f1"] is not None:
                f1s.append(score["f1"])
        out[s] = {**pooled.metrics(), "mean_accuracy": sum(accs) / len(accs) if accs else None,
                  "mean_f1": sum(f1s) / len(f1s) if f1s else None, "features_scored": len(accs)}
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out["statuses"] = statuses
    out["malformed_answers"] = sum(1 for r in records for a in r["answers"] if a["said"] is None)
    out["answers"] = sum(len(r["answers"]) for r in records)
    return out


def write_outputs(out_dir: Path, analysis_dir: Path, records: list[dict], *, d_sae: int, spec, cfg, timing: dict,
                  labelled_now: int, skipped_rare: list[int]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = labels_table(records, spec.model)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(out_dir / LABELS_PARQUET, buf.getvalue())
    summary = {
        "format": LABELS_FORMAT, "analysis_dir": str(Path(analysis_dir).resolve()),
        "endpoint": {"base_url": spec.base_url, "model": spec.model, "temperature": spec.temperature},
        "prompt_version": PROMPT_VERSION,
        "settings": {k: getattr(cfg, k) for k in ("select", "n", "min_count", "explain_top", "explain_intervals", "score_examples",
                                                    "batch", "context_tokens", "negative_pool", "seed")},
        "features": [r["feature"] for r in records], "labelled_now": labelled_now, "skipped_rare": skipped_rare,
        "overall": overall(records), **timing,
    }
    atomic_write_json(out_dir / LABELS_JSON, summary)
    _plot(out_dir / LABELS_PNG, table)
    browser = Path(analysis_dir) / "browser"
    if (browser / "index.html").is_file() and Path(out_dir).resolve() == Path(analysis_dir).resolve():
        from .browser_data import write_label_scripts

        write_label_scripts(browser, table, d_sae=d_sae)
    log.info("labels of %d feature(s) -> %s (detection accuracy %s, fuzzing accuracy %s; %d malformed answers)",
             len(records), out_dir / LABELS_PARQUET, _pct(summary["overall"]["detection"]["accuracy"]),
             _pct(summary["overall"]["fuzzing"]["accuracy"]), summary["overall"]["malformed_answers"])
    return summary


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def _plot(path: Path, table: pa.Table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io.records import save_png

    det = table.column("detection_accuracy").to_pylist()
    fuz = table.column("fuzzing_accuracy").to_pylist()
    both = [(d, f) for d, f in zip(det, fuz) if d is not None and f is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, values, name in ((axes[0], det, "detection"), (axes[1], fuz, "fuzzing")):
        scored = [v for v in values if v is not None]
        ax.hist(scored, bins=[i / 10 for i in range(11)], color="#4c72b0", edgecolor="white")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{name} accuracy per feature (0.5 = chance)")
        ax.set_ylabel("features")
        ax.set_title(f"{name}: {len(scored)} of {len(values)} features scored")
    fig.suptitle(f"explanation scores, {len(both)} features with both" if both else "explanation scores")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
