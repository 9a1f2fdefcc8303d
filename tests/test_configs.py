"""Every shipped config validates against its schema (an unknown key or a bad value fails here, not on a cluster),
and the production ones ask for what the README says they do."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, ExtractRunConfig, load_config
from pipeline.config.analysis import AnalysisRunConfig
from pipeline.config.pipeline import load_pipeline_config
from pipeline.config.train import TrainRunConfig

from conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    if "extract" in data and "train" in data:
        return "pipeline"
    if "run" in data and "endpoint" in data:
        return "label"
    if "run" in data and "top_k" in data:
        return "analysis"
    if "grid" in data and "base" in data:
        return "sweep"
    return "train" if "sae" in data else "extract"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    k = kind(path)
    if k == "pipeline":
        run_dir, stages = load_pipeline_config(path)
        extract, train = stages["extract"], stages["train"]
        assert run_dir and train.data.root == extract.store.root
        assert stages["analyze"].run == train.run_dir
        if "label" in stages:
            assert stages["label"].run == train.run_dir
    elif k == "sweep":
        from pipeline.config.sweep import load_sweep_config

        assert load_sweep_config(path).cells()
    else:
        from pipeline.config.label import LabelRunConfig

        models = {"extract": ExtractRunConfig, "train": TrainRunConfig, "analysis": AnalysisRunConfig,
                  "label": LabelRunConfig}
        cfg = load_config(models[k], path, [])
        assert cfg.slurm is not None


def test_the_production_pipeline_is_64_one_gpu_tasks_then_8_gpus():
    _, stages = load_pipeline_config(REPO / "configs" / "pipeline-llama3.2-3b.yaml")
    extract, train = stages["extract"], stages["train"]
    assert extract.model.name == "meta-llama/Llama-3.2-3B" and extract.task.num_tasks == 64
    assert extract.slurm.gpus_per_node == 1
    assert train.sae.d_sae == 65536 and train.slurm.gpus_per_node == 8 and train.slurm.tasks_per_node is None
    assert train.data.partitions % 8 == 0  # every rank gets whole partitions of the global batch


def test_a_pipeline_may_leave_the_analysis_out_and_rejects_unknown_analysis_keys(tmp_path):
    base = yaml.safe_load((REPO / "configs" / "pipeline-demo.yaml").read_text())
    for stage in ("extract", "train", "label"):
        base[stage]["from"] = str(REPO / "configs" / base[stage]["from"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**base, "analyze": False, "label": False}))
    assert set(load_pipeline_config(path)[1]) == {"extract", "train"}
    path.write_text(yaml.safe_dump({**base, "analyze": False}))
    with pytest.raises(ConfigError, match="label: labels the analysis"):
        load_pipeline_config(path)
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "label"}))
    assert set(load_pipeline_config(path)[1]) == {"extract", "train", "analyze"}  # labelling is opt-in
    path.write_text(yaml.safe_dump({**base, "label": {**base["label"], "n_features": 3}}))
    with pytest.raises(ConfigError, match="label: invalid config: n_features: unknown key"):
        load_pipeline_config(path)
    stages = load_pipeline_config(REPO / "configs" / "pipeline-demo.yaml")[1]
    assert stages["label"].analysis is None and stages["label"].endpoint.serve is not None
    path.write_text(yaml.safe_dump({**base, "analyze": {"top_k": 5}}))
    assert load_pipeline_config(path)[1]["analyze"].top_k == 5
    path.write_text(yaml.safe_dump({**base, "analyze": {"topk": 5}}))
    with pytest.raises(ConfigError, match="topk"):
        load_pipeline_config(path)
