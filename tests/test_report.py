"""`saepipe report RUN` (seed 000's checks) on SAEs trained on real SmolLM2 activations: a 2023-recipe ReLU SAE with
dead-latent resampling (the trainer's resample events give the loss before and after each round), and the shared TopK
SAE, which never resamples and never has more than k active latents. The ablation list is checked against a direct
recomputation on the rows it names, and its tokens against the store's own token ids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main
from pipeline.config import validate
from pipeline.config.train import TrainRunConfig
from pipeline.sae import load_saelens
from pipeline.store import ActivationDataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ("density.png", "resampling.png", "topk.png", "ablation.png")


@pytest.fixture(scope="module")
def relu_run(smollm2_sae, tmp_path_factory) -> Path:
    """A 4x ReLU SAE (2023 recipe, λ = 3: mean L0 ≈ 15, a few tokens above 64) resampling every 15 of 60 steps the
    latents silent for the last step (by step 45 some are)."""
    from pipeline.train.trainer import Trainer

    cfg = validate(TrainRunConfig, {
        "run_dir": str(tmp_path_factory.mktemp("report") / "relu"),
        "data": {"root": str(smollm2_sae.store_root), "eval_shards": 1, "partitions": 2, "init_rows": 2048},
        "sae": {"arch": "relu_2023", "d_in": 576, "d_sae": 2304, "l1_coefficient": 3.0, "dead_tokens": 20_000,
                "resample": {"every_steps": 15, "window_steps": 1, "sample_inputs": 4096, "max_rounds": 3}},
        "train": {"batch_size": 512, "steps": 60, "lr": 2e-3, "warmup_steps": 5, "log_every": 5, "seed": 0},
        "eval": {"max_rows": 4096, "batch_size": 1024, "histogram": False},
        "checkpoint": {"every_steps": 60, "keep_last": 1},
        "telemetry": {"enabled": False},
    }, "relu_run")
    with Trainer(cfg, show_progress=False) as trainer:
        assert trainer.fit().status == "completed"
    return Path(cfg.run_dir)


def report_of(run: Path, capsys, *args: str, out_dir: Path | None = None) -> tuple[dict, str]:
    """(report.json, the terminal summary) of `saepipe report RUN` (into out_dir, default RUN/report)."""
    out_dir = out_dir or run / "report"
    assert main(["report", str(run), "--no-progress", "--out", str(out_dir), *args]) == 0
    out = capsys.readouterr().out
    assert f"report: {out_dir / 'report.md'}" in out
    return json.loads((out_dir / "report.json").read_text()), out


def test_the_report_of_a_resampled_relu_run(relu_run, capsys):
    events = [json.loads(line) for line in (relu_run / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert [e["step"] for e in events] == [15, 30, 45]
    report, out = report_of(relu_run, capsys, "--tokens", "0")  # every held-out row
    held_out = ActivationDataset.open(report["store_root"]).shards[report["shards"][0]].rows
    assert report["format"] == "saepipe-report/1" and report["tokens"] == held_out and report["d_sae"] == 2304

    rounds = report["resampling"]["rounds"]
    assert [r["step"] for r in rounds] == [15, 30, 45] and report["resampling"]["resampled_total"] > 0
    for r in rounds:
        values = [r[k] for k in ("loss_before", "loss_after", "fvu_before", "fvu_after")]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert (r["loss_after"] != r["loss_before"]) == (r["resampled"] > 0)  # the edit is what moved it
        assert r["train_loss_before"] is not None and r["train_step_after"] == r["step"] + 5
    assert "resampling: 3 round(s)" in out

    rec = report["reconstruction"]
    assert rec["tokens_over_top_pct"] > 0  # else keeping the top 64 would change nothing
    assert 0 < rec["fvu_all"] <= rec["fvu_top"] < rec["fvu_frequent"]
    assert 0 <= report["dead"]["pct"] <= report["dead"]["pct_seed002_rule"] <= 100

    markdown = (relu_run / "report" / "report.md").read_text()
    assert "## Loss before and after resampling" in markdown and "| 30 | 2 |" in markdown
    assert "no resampling in this run" not in markdown and "Reconstruction with the top 64 latents" in markdown
    for name in PNGS:
        data = (relu_run / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name


def test_the_ablation_list_points_at_real_rows(relu_run, smollm2_sae, capsys):
    report, _ = report_of(relu_run, capsys, "--tokens", "600", "--latents", "3", "--examples", "4", "--top", "16")
    rec = report["reconstruction"]
    assert report["tokens"] == 600 and rec["tokens_over_top_pct"] > 10 and rec["fvu_all"] < rec["fvu_top"]
    dataset = ActivationDataset.open(smollm2_sae.store_root)
    sae = load_saelens(relu_run / "final")
    shard = report["shards"][0]
    first, rows = dataset.shards[shard].row_offset, dataset.shards[shard].rows
    assert len(report["ablation"]) == 3
    totals = [a["total_delta"] for a in report["ablation"]]
    assert totals == sorted(totals, reverse=True) and totals[-1] > 0
    for latent in report["ablation"]:
        assert 1 <= len(latent["tokens"]) <= 4
        deltas = [t["delta"] for t in latent["tokens"]]
        assert deltas == sorted(deltas, reverse=True)
        for t in latent["tokens"]:
            assert first <= t["row"] < first + min(rows, 600)  # one of the held-out rows read
            s, local = dataset.locate(t["row"])
            token_id = dataset.read_metadata(s, ["token_id"]).column("token_id")[local].as_py()
            assert t["token_id"] == token_id and t["token"] == dataset.tokenizer.decode([token_id])
            assert f"«{t['token']}»" in t["context"]
            # Zero the latent on that row by hand: the squared error rises by the reported Δ.
            x = dataset.read_acts(s, dtype=torch.float32)[local : local + 1]
            z = sae.encode(x)
            assert z[0, latent["latent"]].item() == pytest.approx(t["activation"], rel=1e-4)
            ablated = z.clone()
            ablated[0, latent["latent"]] = 0
            err = (x - sae.decode(z)).pow(2).sum().item()
            err_ablated = (x - sae.decode(ablated)).pow(2).sum().item()
            assert err_ablated - err == pytest.approx(t["delta"], rel=1e-3, abs=1e-3 * err)
            assert err == pytest.approx(t["sq_err"], rel=1e-3)


def test_a_run_without_resampling_says_so_and_topk_loses_nothing(smollm2_sae, tmp_path, capsys):
    # into tmp_path: the shared run directory stays as the other tests expect it
    report, out = report_of(smollm2_sae.run_dir, capsys, "--tokens", "1024", "--latents", "2", out_dir=tmp_path / "r")
    assert report["resampling"]["rounds"] == [] and "no resampling in this run" in out
    assert "No resampling in this run: this recipe" in (tmp_path / "r" / "report.md").read_text()
    rec = report["reconstruction"]
    assert rec["l0_max"] <= 32 and rec["tokens_over_top_pct"] == 0 and rec["fvu_top"] == rec["fvu_all"]


def test_bad_report_input_is_one_line(smollm2_sae, tmp_path, capsys):
    def refused(argv: list[str]) -> str:
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "no such directory" in refused([str(tmp_path / "missing")])
    assert "give --out for a bare SAELens dir" in refused([str(smollm2_sae.sae_dir)])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert "is not a report directory" in refused([str(smollm2_sae.run_dir), "--out", str(foreign)])
    assert (foreign / "keep.txt").read_text() == "mine"
    assert "top must be positive" in refused([str(smollm2_sae.run_dir), "--top", "0", "--out", str(tmp_path / "r")])
