"""The labels as the static browser reads them (scripts, since browsers refuse fetch() on file://):
browser/labels-data.js for the index (every labelled feature's explanation and scores) and browser/labels/<k>.js for
the feature pages, one per block of LABEL_BLOCK features, so a page loads its block's labels, not all of them. Every
block file exists, labelled or not, so that no page asks for a missing script. `saepipe browse` writes them from
labels.parquet; `saepipe label` rewrites them in an existing browser without rebuilding its pages."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from pipeline.io.atomic import atomic_write_text

LABEL_BLOCK = 1024
INDEX_SCRIPT = "labels-data.js"
BLOCK_DIR = "labels"
_FIELDS = ("explanation", "status", "detection_accuracy", "detection_f1", "fuzzing_accuracy", "fuzzing_f1",
           "detection_n", "fuzzing_n", "malformed_answers", "model")


def block_of(feature: int) -> int:
    return feature // LABEL_BLOCK


def _js(name: str, payload) -> str:
    # ensure_ascii also escapes U+2028/2029, which would end a JavaScript string literal in older engines; "</" is
    # escaped so that no explanation can close a script element.
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"window.{name} = {text};\n"


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_label_scripts(browser: Path, table: pa.Table | None, *, d_sae: int) -> None:
    rows = table.to_pylist() if table is not None else []
    by_feature = {int(r["feature"]): {k: _clean(r[k]) for k in _FIELDS} for r in rows if 0 <= r["feature"] < d_sae}
    blocks_dir = browser / BLOCK_DIR
    blocks_dir.mkdir(exist_ok=True)
    for block in range(max(1, -(-d_sae // LABEL_BLOCK))):
        part = {str(f): v for f, v in by_feature.items() if block_of(f) == block}
        atomic_write_text(blocks_dir / f"{block}.js", _js("SAEPIPE_FEATURE_LABELS", part))
    index = {"features": list(by_feature), **{k: [v[k] for v in by_feature.values()]
                                              for k in ("explanation", "status", "detection_accuracy",
                                                        "fuzzing_accuracy")}}
    atomic_write_text(browser / INDEX_SCRIPT, _js("SAEPIPE_LABELS", index))
