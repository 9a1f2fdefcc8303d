"""The terminal view of a labelling run: overall scores, then one line per feature."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from .output import LABELS_PARQUET, LABELS_PNG


def _pct(v) -> str:
    return "   —" if v is None else f"{v:4.0%}"


def format_labels(out_dir: Path, summary: dict, *, max_rows: int = 30) -> str:
    overall = summary.get("overall") or {}
    lines = []
    for scorer in ("detection", "fuzzing"):
        s = overall.get(scorer) or {}
        lines.append(f"{scorer:9}  accuracy {_pct(s.get('accuracy'))}  F1 {_pct(s.get('f1'))}  over {s.get('n', 0)} "
                     f"excerpts of {s.get('features_scored', 0)} features")
    statuses = ", ".join(f"{v} {k}" for k, v in (overall.get("statuses") or {}).items())
    lines.append(f"explanations: {statuses}; malformed answers {overall.get('malformed_answers', 0)} of "
                 f"{overall.get('answers', 0)}; labelled now {summary.get('labelled_now', 0)}, cached "
                 f"{len(summary.get('features', [])) - summary.get('labelled_now', 0)}")
    table = pq.read_table(Path(out_dir) / LABELS_PARQUET,
                          columns=["feature", "status", "detection_accuracy", "fuzzing_accuracy", "explanation"])
    lines.append(f"{'feature':>8}  {'detect':>6}  {'fuzz':>6}  explanation")
    for r in table.to_pylist()[:max_rows]:
        text = r["explanation"] if r["status"] == "ok" else f"({r['status']})"
        lines.append(f"{r['feature']:>8}  {_pct(r['detection_accuracy']):>6}  {_pct(r['fuzzing_accuracy']):>6}  {text}")
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more in {Path(out_dir) / LABELS_PARQUET}")
    lines.append(f"results: {Path(out_dir) / LABELS_PARQUET}, plot: {Path(out_dir) / LABELS_PNG}")
    return "\n".join(lines)
