"""How far a labelling run has got, from what is on disk (for `saepipe status` and `submit --resume`): the selected
features with a cached label, under any cache key (the model's name is only known once the endpoint is resolved)."""
from __future__ import annotations

import json

from pipeline.config.label import LabelRunConfig

from .cache import CACHE_DIR, LabelCache


def label_progress(cfg: LabelRunConfig) -> tuple[int, int, bool]:
    """(features cached, features selected, whether labels.json covers them all); (0, 0, False) while the analysis
    is not there yet."""
    from pipeline.analysis.browser import read_features
    from pipeline.errors import SaepipeError

    from .run import analysis_dir_of, labels_dir_of, select_features

    adir = analysis_dir_of(cfg)
    try:
        chosen, _ = select_features(read_features(adir / "features.parquet"), cfg)
    except (SaepipeError, OSError):
        return 0, 0, False
    out = labels_dir_of(cfg)
    try:
        labelled = set(json.loads((out / "labels.json").read_text())["features"])
    except (OSError, ValueError, KeyError, TypeError):
        labelled = set()
    if labelled >= set(chosen):
        return len(chosen), len(chosen), True
    best = 0
    for key_dir in (out / CACHE_DIR).glob("*/"):
        names = {p.name for p in key_dir.glob("*.json")}
        best = max(best, sum(LabelCache.file_name(f) in names for f in chosen))
    return best, len(chosen), False
