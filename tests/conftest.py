import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "data" / "pile-sample" / "pile-sample-*.jsonl.zst")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Every job the tests run exports metrics (telemetry is on by default); their discovery targets go to a directory of
# this test session, not the user's, and a finished job does not wait for a last scrape unless a test asks it to.
import tempfile  # noqa: E402

os.environ.setdefault("SAEPIPE_TARGETS_DIR", tempfile.mkdtemp(prefix="saepipe-test-targets-"))
os.environ.setdefault("SAEPIPE_TELEMETRY_GRACE_S", "0")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors, where a second OpenMP thread only adds synchronisation (10x
    slower steps measured), and thread-count-independent results."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M, loaded once per session (dequantised once per machine into the cache)."""
    from pipeline.config import ModelConfig
    from pipeline.extract.model import load_model

    return load_model(ModelConfig())


@pytest.fixture(scope="session")
def smollm2_sae(smollm2, tmp_path_factory):
    """A small TopK SAE on real SmolLM2 activations of the sample (tests/helpers/smollm2_sae.py), built once."""
    from helpers.smollm2_sae import build

    return build(tmp_path_factory.mktemp("smollm2-sae"), smollm2, SAMPLE)


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true an integration test (Slurm, Prometheus, chromium, the LLM server) that skips has failed: CI
    installs and starts all of them, so a skip there means the check did not run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and running_under_ci() and item.get_closest_marker("integration") is not None:
        report.outcome = "failed"
        report.longrepr = f"integration test skipped under CI=true: {report.longrepr}"
