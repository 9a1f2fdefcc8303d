"""The per-feature label cache: one JSON file per finished feature, under a key made of everything that decides its
answers (the analysis, the model, the prompts' version and the example settings). A rerun or a requeued job labels
only the features whose file is missing; a change of model or settings starts a new key and leaves old files alone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.io.atomic import atomic_write_json, json_bytes

CACHE_DIR = "labels-cache"
# The settings of LabelRunConfig that change a feature's prompts or answers (not concurrency, timeouts or the URL).
KEYED_SETTINGS = ("explain_top", "explain_intervals", "score_examples", "batch", "context_tokens", "negative_pool",
                  "seed")


def cache_key(analysis_json: bytes, model: str, cfg, prompt_version: int) -> dict:
    return {"prompt_version": prompt_version, "model": model,
            "analysis_sha256": hashlib.sha256(analysis_json).hexdigest(),
            "temperature": cfg.endpoint.temperature, "explanation_tokens": cfg.endpoint.explanation_tokens,
            **{k: getattr(cfg, k) for k in KEYED_SETTINGS}}


class LabelCache:
    def __init__(self, out_dir: Path, key: dict):
        digest = hashlib.sha256(json_bytes(key)).hexdigest()[:16]
        self.dir = Path(out_dir) / CACHE_DIR / digest
        self.key = key

    @staticmethod
    def file_name(feature: int) -> str:
        return f"{feature:07d}.json"

    def path(self, feature: int) -> Path:
        return self.dir / self.file_name(feature)

    def has(self, feature: int) -> bool:
        return self.path(feature).is_file()

    def get(self, feature: int) -> dict | None:
        try:
            record = json.loads(self.path(feature).read_text())
        except (OSError, ValueError):
            return None  # missing, or damaged: labelled again
        return record if isinstance(record, dict) and record.get("feature") == feature else None

    def put(self, record: dict) -> None:
        if not (self.dir / "key.json").is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / "key.json", self.key)
        atomic_write_json(self.path(int(record["feature"])), record)
