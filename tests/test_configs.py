"""Every shipped config validates against its schema (an unknown key or a bad value fails here, not on a cluster),
and the production ones ask for what the README says they do."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ExtractRunConfig, load_config
from pipeline.config.pipeline import load_pipeline_config
from pipeline.config.train import TrainRunConfig

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    if "extract" in data and "train" in data:
        return "pipeline"
    return "train" if "sae" in data else "extract"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    k = kind(path)
    if k == "pipeline":
        run_dir, extract, train = load_pipeline_config(path)
        assert run_dir and train.data.root == extract.store.root
    else:
        cfg = load_config(ExtractRunConfig if k == "extract" else TrainRunConfig, path, [])
        assert cfg.slurm is not None


def test_the_production_pipeline_is_64_one_gpu_tasks_then_8_gpus():
    _, extract, train = load_pipeline_config(REPO / "configs" / "pipeline-llama3.2-3b.yaml")
    assert extract.model.name == "meta-llama/Llama-3.2-3B" and extract.task.num_tasks == 64
    assert extract.slurm.gpus_per_node == 1
    assert train.sae.d_sae == 65536 and train.slurm.gpus_per_node == 8 and train.slurm.tasks_per_node is None
    assert train.data.partitions % 8 == 0  # every rank gets whole partitions of the global batch
