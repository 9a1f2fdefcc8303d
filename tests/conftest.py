import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "data" / "pile-sample" / "pile-sample-*.jsonl.zst")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M, loaded once per session (dequantised once per machine into the cache)."""
    from pipeline.config import ModelConfig
    from pipeline.extract.model import load_model

    return load_model(ModelConfig())
