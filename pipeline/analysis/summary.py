"""A short account of an analysis directory: what was analysed, how many features are dead or dense, and the most
selective features with their top tokens (what `saepipe analyze` prints)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

# A feature seen on a handful of tokens has the highest selectivity (mean_act / ln(count + 1)) by construction; the
# summary ranks those firing at least this often, when there are any.
MIN_COUNT = 5


def summarize(analysis_dir: str | Path, *, top: int = 10) -> dict:
    analysis_dir = Path(analysis_dir)
    meta = json.loads((analysis_dir / "analysis.json").read_text())
    table = pq.read_table(analysis_dir / "features.parquet",
                          columns=["feature", "count", "density", "max_act", "selectivity", "top_tokens"])
    count = table.column("count").to_numpy()
    density = table.column("density").to_numpy()
    selectivity = table.column("selectivity").to_numpy()
    eligible = np.flatnonzero(count >= MIN_COUNT)
    if eligible.size == 0:
        eligible = np.flatnonzero(count > 0)
    best = eligible[np.lexsort((eligible, -selectivity[eligible]))][:top]
    tokens = table.column("top_tokens")
    max_act = table.column("max_act").to_numpy()
    return {
        "analysis_dir": str(analysis_dir),
        "sae_dir": meta["sae_dir"],
        "tokens": meta["tokens"],
        "d_sae": meta["d_sae"],
        "dead": int((count == 0).sum()),
        "dense": int((density > meta.get("dense_density", 0.1)).sum()),
        "seconds": meta.get("seconds"),
        "most_selective": [
            {"feature": int(f), "selectivity": round(float(selectivity[f]), 4), "count": int(count[f]),
             "max_act": round(float(max_act[f]), 4), "top_tokens": tokens[int(f)].as_py()}
            for f in best
        ],
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"analysed {summary['tokens']:,} tokens through {summary['d_sae']:,} features in {summary['seconds']} s",
        f"  dead {summary['dead']:,} ({100 * summary['dead'] / max(summary['d_sae'], 1):.1f}%), "
        f"dense {summary['dense']:,} ({100 * summary['dense'] / max(summary['d_sae'], 1):.1f}%)",
        "  most selective features (mean_act / ln(count + 1)):",
    ]
    for f in summary["most_selective"]:
        shown = ", ".join(repr(t) for t in f["top_tokens"])
        lines.append(f"    #{f['feature']:<6} selectivity {f['selectivity']:<8.4g} fires {f['count']:>7,}x  "
                     f"max {f['max_act']:<8.4g} top tokens: {shown}")
    lines.append(f"  written to {summary['analysis_dir']}")
    return "\n".join(lines)
