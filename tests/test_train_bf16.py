"""bf16 mixed precision through the real trainer (CPU autocast takes the same path as the GPU's): every recipe trains,
its parameters, gradients and Adam moments stay fp32, and its loss curve tracks the fp32 run's.

Tolerance: 5% per logged interval (relative to the fp32 loss). bf16 keeps 8 significant bits, so the dense GEMMs'
outputs are rounded to ~0.4%; over 40 steps at the same data and seed the curves measured within 0.1% (ReLU) to 1.5%
(BatchTopK, whose selection flips a few latents near the cut), while the loss itself falls several-fold: a real bf16
bug (a gradient in the wrong dtype, a sum in bf16) moves it far more."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.config.train import TrainRunConfig
from pipeline.train.checkpoint import step_dir_name
from pipeline.train.trainer import Trainer

from helpers.tiny_training import tiny_dataset, write_tiny_config

STEPS = 40
ARCHS = {
    "topk": ["sae.arch=topk", "sae.k=4"],
    "batchtopk": ["sae.arch=batchtopk", "sae.k=4"],
    "relu_2023": ["sae.arch=relu_2023", "sae.l1_coefficient=1", "train.lr=0.01",
                  "sae.resample={every_steps: 16, window_steps: 4, sample_inputs: 512}"],
    "relu_2024": ["sae.arch=relu_2024", "sae.l1_coefficient=0.1", "train.lr=0.01"],
}
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def train(dataset: Path, run_dir: Path, overrides: list[str], precision: str) -> tuple[list[float], list[float]]:
    config = write_tiny_config(run_dir.with_suffix(".yaml"), dataset, run_dir, steps=STEPS, log_every=5, eval_rows=512,
                               checkpoint={"every_steps": 1000})
    cfg = load_config(TrainRunConfig, config, [*overrides, f"train.precision={precision}", "train.device=cpu",
                                               "train.warmup_steps=5"])
    with Trainer(cfg, show_progress=False) as trainer:
        assert trainer.fit().status == "completed"
        assert trainer.precision == ("bf16" if precision == "bf16" else "no")
        assert all(p.dtype == torch.float32 for p in trainer.sae.parameters())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    return [r["loss"] for r in logged], [r["recon_loss"] for r in logged]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_autocast_trains_every_recipe_and_tracks_fp32(arch, dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fp32, fp32_recon = train(dataset, tmp_path / "fp32", ARCHS[arch], "fp32")
    bf16, _ = train(dataset, tmp_path / "bf16", ARCHS[arch], "bf16")
    assert any("bf16 autocast" in r.getMessage() for r in caplog.records if r.getMessage().startswith("training "))
    assert len(fp32) == len(bf16) == STEPS // 5
    # the fp32 run learns (else the comparison says nothing); relu_2024's total loss rises with its λ warm-up
    assert fp32_recon[-1] < 0.7 * fp32_recon[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    print(f"{arch}: bf16 vs fp32 loss curve, worst relative difference {worst:.4f}")
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert worst <= TOLERANCE, (fp32, bf16)
    # what a checkpoint of the bf16 run holds: fp32 weights and fp32 Adam moments
    step = tmp_path / "bf16" / "checkpoints" / step_dir_name(STEPS)
    weights, moments = load_file(str(step / "sae.safetensors")), load_file(str(step / "optimizer.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for k, t in moments.items() if "exp_avg" in k} == {torch.float32}
