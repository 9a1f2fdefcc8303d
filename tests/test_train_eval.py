"""Held-out evaluation (MSE, FVU, L0, dead/dense, density histogram), the PCA baseline, the variant comparison,
and what a run leaves behind: metrics JSONL, metrics hooks, eval files, the SAELens export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.config.sae import SAEConfig
from pipeline.config.train import TrainConfig, TrainRunConfig
from pipeline.eval import PCABaseline, evaluate, held_out_shards, pca_topk_fvu, save_density_histogram
from pipeline.sae import load_saelens, make_sae
from pipeline.train import compare_variants
from pipeline.train.schedule import lr_at
from pipeline.train.trainer import Trainer

from helpers.synthetic import write_synthetic_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "acts", d=32, shards=6, rows_per_shard=1024)


def run_config(tmp_path: Path, dataset: Path, *overrides: str) -> TrainRunConfig:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(dataset), "eval_shards": 1, "partitions": 2, "init_rows": 1024},
        "sae": {"arch": "topk", "d_in": 32, "d_sae": 128, "k": 4, "dead_tokens": 4096},
        "train": {"batch_size": 256, "steps": 300, "lr": 3e-3, "warmup_steps": 10, "log_every": 50, "threads": 1},
        "eval": {"max_rows": 1024, "batch_size": 512, "every_steps": 150},
        "checkpoint": {"every_steps": 1000},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(TrainRunConfig, path, list(overrides))


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu_2024", d_in=8, d_sae=16, normalize_input=False))
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # four latents that never fire
        sae.b_enc[4] = 100.0  # one that always fires
    rows = torch.randn(300, 8) + 3.0
    result = evaluate(sae, rows.to(torch.bfloat16), batch_size=64, dense_threshold=0.5, device=torch.device("cpu"))

    x = rows.to(torch.bfloat16).float()
    z = sae.encode(x).detach()
    err = (x - sae.decode(z).detach()).double()
    assert result.rows == 300
    assert result.mse == pytest.approx(err.pow(2).mean().item(), rel=1e-5)
    assert result.fvu == pytest.approx((err.pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()).item(), rel=1e-5)
    assert result.l0 == pytest.approx((z != 0).sum(1).double().mean().item())
    density = (z != 0).double().mean(0)
    assert torch.allclose(result.density, density)
    assert result.dead_pct == pytest.approx(100 * (density == 0).double().mean().item())
    assert result.dead_pct >= 100 * 4 / 16
    assert result.dense_pct == pytest.approx(100 * (density > 0.5).double().mean().item())
    assert result.dense_pct >= 100 / 16


def test_density_histogram_is_a_png(tmp_path):
    save_density_histogram(torch.tensor([0.0, 1e-4, 1e-3, 0.2, 0.5]), tmp_path / "a" / "density.png", "t")
    save_density_histogram(torch.zeros(10), tmp_path / "dead.png")  # every latent dead: still a plot
    for path in (tmp_path / "a" / "density.png", tmp_path / "dead.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_pca_baseline_bounds():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(2000, 6, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + 7.0
    held_out = torch.randn(500, 6, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + 7.0
    pca = PCABaseline(train, held_out)
    curve = [pca.fvu(k) for k in range(7)]
    assert curve[6] == pytest.approx(0.0, abs=1e-12)  # all components: exact reconstruction
    assert curve[0] >= 1.0  # no component: the training mean, no better than the held-out mean
    assert all(a > b for a, b in zip(curve, curve[1:]))
    assert curve[1] == pytest.approx(1 - 25 / 39.26, abs=0.05)  # the largest axis carries 25 of the 39.26 variance
    assert pca_topk_fvu(train, held_out, 2) == curve[2]


def test_sae_variants_beat_pca_on_sparse_data(dataset, tmp_path):
    base = run_config(tmp_path, dataset, "eval.every_steps=0", "eval.histogram=false", "train.log_every=100")
    variants = {
        "topk": [],
        "batchtopk": ["sae.arch=batchtopk"],
        "relu_2023": ["sae.arch=relu_2023", "sae.l1_coefficient=1"],
        "relu_2024": ["sae.arch=relu_2024", "sae.l1_coefficient=1"],
    }
    results = compare_variants(base, variants, tmp_path / "variants")
    assert set(results) == {*variants, "pca_topk"}
    assert results["pca_topk"]["k"] == 4
    for name in variants:
        r = results[name]
        assert 0 <= r["dead_pct"] <= 100 and 0 <= r["dense_pct"] <= 100 and r["l0"] > 0
        # A sparse code of the same size beats the best linear one: the data is sparse in a 128-direction dictionary.
        assert r["fvu"] < r["pca_fvu_at_l0"], (name, r)
    assert results["topk"]["l0"] == pytest.approx(4.0)
    assert results["topk"]["fvu"] < results["pca_topk"]["fvu"]
    assert (tmp_path / "variants" / "relu_2024" / "final").is_dir()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []

    def on_metrics(self, step: int, metrics: dict) -> None:
        self.events.append(("metrics", step, metrics))

    def on_eval(self, step: int, metrics: dict) -> None:
        self.events.append(("eval", step, metrics))

    def on_checkpoint(self, step: int, path: Path, seconds: float) -> None:
        self.events.append(("checkpoint", step, {"path": path, "seconds": seconds}))


class Broken:
    def on_metrics(self, step: int, metrics: dict) -> None:
        raise ZeroDivisionError  # a broken exporter must not stop training


def test_a_run_logs_evaluates_and_exports(dataset, tmp_path):
    cfg = run_config(tmp_path, dataset)
    recorder = Recorder()
    trainer = Trainer(cfg, callbacks=[Broken(), recorder])
    result = trainer.fit()
    trainer.close()
    assert result.status == "completed" and result.step == 300

    run = Path(cfg.run_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(50, 301, 50))
    assert {"lr", "loss", "recon_loss", "grad_norm", "l0", "fvu", "dead_pct", "tokens", "tokens_per_s", "step_seconds", "data_wait_seconds"} <= train_records[0].keys()
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    eval_records = [r for r in records if "eval/fvu" in r]
    assert [r["step"] for r in eval_records] == [150, 300]
    # The callbacks saw what the JSONL got (less the wall-clock stamp and the eval/ prefix), in order.
    seen = {kind: [(s, m) for k, s, m in recorder.events if k == kind] for kind in ("metrics", "eval", "checkpoint")}
    assert [s for s, _ in seen["metrics"]] == [r["step"] for r in train_records]
    assert seen["metrics"][-1][1] == {k: v for k, v in train_records[-1].items() if k != "time"}
    assert [s for s, _ in seen["eval"]] == [150, 300]
    assert {f"eval/{k}": v for k, v in seen["eval"][-1][1].items() if k != "step"} == {
        k: v for k, v in eval_records[-1].items() if k not in ("time", "step")}
    assert [s for s, _ in seen["checkpoint"]][-1] == 300 and all(m["seconds"] >= 0 for _, m in seen["checkpoint"])

    for tag in ("step_000000150", "final"):
        metrics = json.loads((run / "eval" / tag / "eval.json").read_text())
        assert 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(4.0)
        assert (run / "eval" / tag / "density.png").read_bytes()[:8] == PNG_MAGIC
    assert result.eval == json.loads((run / "eval" / "final" / "eval.json").read_text())

    exported = load_saelens(run / "final")
    x = torch.randn(16, 32) + 1.0
    assert torch.allclose(exported.decode(exported.encode(x)), trainer.sae.decode(trainer.sae.encode(x)), atol=1e-4, rtol=1e-4)


def test_lr_schedule_warmup_plateau_decay():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, decay="linear", decay_start=0.8, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[99] == pytest.approx(1e-4 + 0.9e-3 * 1 / 20)
    cosine = TrainConfig(steps=100, lr=1e-3, warmup_steps=0, decay="cosine", decay_start=0.5)
    assert lr_at(50, cosine) == pytest.approx(1e-3) and lr_at(75, cosine) == pytest.approx(0.5e-3)
    assert lr_at(99, TrainConfig(steps=100, warmup_steps=0, decay="none")) == TrainConfig(steps=1).lr


def test_held_out_shards_are_spread_over_the_store():
    assert held_out_shards(11, 2) == [2, 8]
    assert held_out_shards(6, 1) == [3]
    assert held_out_shards(5, 5) == [0, 1, 2, 3, 4]
    for n in range(2, 40):
        for k in range(1, n):
            picked = held_out_shards(n, k)
            assert len(set(picked)) == k and 0 <= min(picked) and max(picked) < n
            # the shard holding the middle of each of k equal stretches of the stream: neither end is left out
            assert all(int(i * n / k) <= s < (i + 1) * n / k for i, s in enumerate(picked))
