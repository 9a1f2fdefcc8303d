"""`saepipe sweep`: a two-cell grid on a tiny synthetic store through submitit's local executor and through the local
Slurm cluster (the same numbers from both), its results table, a rerun that skips the finished cells, a stopped cell
that resumes from its checkpoint, and bad configs refused in one line before anything runs. Under CI=true the Slurm
test may not skip (conftest)."""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pipeline.cli.main import main
from pipeline.config.sweep import load_sweep_config

from conftest import REPO
from helpers.stopping import StopAfterStep
from helpers.synthetic import write_synthetic_dataset
from slurm_cluster import start_cluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 30


def saepipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("sweep-data") / "acts", d=32, shards=5, rows_per_shard=1024)


def sweep_config(path: Path, store: Path, sweep_dir: Path, **changes) -> Path:
    cfg = {
        "sweep_dir": str(sweep_dir),
        "base": {
            "data": {"root": str(store), "eval_shards": 1, "partitions": 2, "init_rows": 512},
            "sae": {"arch": "relu_2023", "d_in": 32, "d_sae": 64, "l1_coefficient": 1.0, "dead_tokens": 512},
            "train": {"batch_size": 128, "steps": STEPS, "lr": 3e-3, "warmup_steps": 3, "log_every": 5, "threads": 1},
            "eval": {"max_rows": 1024, "batch_size": 256, "histogram": False},
            "checkpoint": {"every_steps": 10, "keep_last": 1},
            "telemetry": {"enabled": False},
        },
        "grid": {"expansion_factors": [2, 4], "l1_coefficients": [1.0], "resampling": [True]},
        "resample": {"every_steps": 10, "window_steps": 2, "sample_inputs": 512},
        "stages": {"spliced_eval": False, "analysis": False},
        "local_parallelism": 2,
        "slurm": {"cpus_per_task": 1, "gpus_per_node": 0, "time_min": 10},
        **changes,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def assert_plausible_table(sweep_dir: Path) -> list[dict]:
    rows = table(sweep_dir)
    assert [r["cell"] for r in rows] == ["x2-l1_1-resample", "x4-l1_1-resample"]
    for row, d_sae in zip(rows, (64, 128)):
        assert row["status"] == "completed" and int(row["d_sae"]) == d_sae and int(row["steps"]) == STEPS
        assert 0 < float(row["fvu"]) < 1 and 0 < float(row["l0"]) <= d_sae and 0 <= float(row["dead_pct"]) <= 100
        assert int(row["resample_rounds"]) == 2  # steps 10 and 20 (none at the last step)
        assert row["monosemantic_pct"] == "labelled later" and row["ce_loss_score"] == ""
    # the doubled dictionary reconstructs better with more active latents
    assert float(rows[1]["fvu"]) < float(rows[0]["fvu"]) and float(rows[1]["l0"]) > float(rows[0]["l0"])
    markdown = (sweep_dir / "results.md").read_text()
    assert "x4-l1_1-resample" in markdown and "Seed 002's published numbers" in markdown and "35.2" in markdown
    for plot in ("fvu_vs_l0.png", "dead_by_expansion.png"):
        data = (sweep_dir / plot).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    return rows


@pytest.fixture(scope="module")
def local_sweep(store, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(config, sweep dir, the command's outcome) of the two-cell grid run by the local executor."""
    tmp = tmp_path_factory.mktemp("local-sweep")
    config = sweep_config(tmp / "sweep.yaml", store, tmp / "sweep")
    return config, tmp / "sweep", saepipe("sweep", str(config), "--executor", "local", "--no-progress")


def test_a_local_sweep_writes_its_table_and_a_rerun_skips_finished_cells(local_sweep):
    config, sweep_dir, run = local_sweep
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 cell(s): 2 completed" in run.stdout
    assert_plausible_table(sweep_dir)
    for cell in ("x2-l1_1-resample", "x4-l1_1-resample"):
        cell_dir = sweep_dir / "cells" / cell
        assert (cell_dir / "final" / "cfg.json").exists() and (cell_dir / "eval" / "final" / "eval.json").exists()
        events = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text().splitlines()
                  if '"event": "resample"' in line]
        assert [e["step"] for e in events] == [10, 20]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert sorted(t for job in record["jobs"] for t in job["tasks"]) == ["0", "1"]
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("cells/*/cell.json")}

    again = saepipe("sweep", str(config), "--executor", "local", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to submit" in again.stdout and "finished, skipped" in again.stderr
    assert json.loads((sweep_dir / "sweep.json").read_text())["jobs"] == record["jobs"]
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("cells/*/cell.json")} == stamps
    status = saepipe("sweep", str(config), "--status")
    assert status.returncode == 0 and "2 cell(s): 2 completed" in status.stdout


@pytest.mark.integration
def test_the_sweep_runs_as_a_slurm_array_and_gives_the_local_numbers(store, local_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", start_cluster())
    slurm_dir = tmp_path / "slurm"
    run = saepipe("sweep", str(sweep_config(tmp_path / "slurm.yaml", store, slurm_dir)), "--executor", "slurm",
                  "--wait", "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout
    (job,) = json.loads((slurm_dir / "sweep.json").read_text())["jobs"]
    assert job["cluster"] == "slurm" and job["tasks"] == {"0": f"{job['job_id']}_0", "1": f"{job['job_id']}_1"}
    script = next((slurm_dir / "submitit").glob(f"{job['job_id']}/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%" in script and "--signal=USR2" in script  # one array; requeue on USR2
    for task in (0, 1):
        started = json.loads((slurm_dir / "jobs" / f"sweep-{task:05d}.json").read_text())
        assert started["job_id"] == f"{job['job_id']}_{task}" and started["restarts"] == 0
    for a, b in zip(assert_plausible_table(local_sweep[1]), assert_plausible_table(slurm_dir)):
        assert a["fvu"] == b["fvu"] and a["l0"] == b["l0"] and a["dead_pct"] == b["dead_pct"]


def test_a_stopped_cell_resumes_from_its_checkpoint(store, tmp_path, caplog, one_thread):
    from pipeline.orchestrate.sweep_cell import cell_done, run_cell

    caplog.set_level(logging.INFO)
    straight = load_sweep_config(sweep_config(tmp_path / "a.yaml", store, tmp_path / "a",
                                              grid={"expansion_factors": [2], "resampling": [True]}))
    stopped = load_sweep_config(sweep_config(tmp_path / "b.yaml", store, tmp_path / "b",
                                             grid={"expansion_factors": [2], "resampling": [True]}))
    (cell_a,), (cell_b,) = straight.cells(), stopped.cells()
    assert run_cell(straight, cell_a, telemetry=False)["status"] == "completed"

    stop = StopAfterStep(15)  # mid-way between the resampling rounds at 10 and 20
    first = run_cell(stopped, cell_b, stop=stop, callbacks=[stop], telemetry=False)
    assert first["status"] == "preempted" and first["step"] == 15 and not cell_done(cell_b, stopped.stages)
    assert (cell_b.run_dir / "checkpoints" / "step_000000015").is_dir()
    second = run_cell(stopped, cell_b, telemetry=False)
    assert second["status"] == "completed" and second["train"]["step"] == STEPS and cell_done(cell_b, stopped.stages)
    assert any("resumed from" in r.getMessage() and "step 15" in r.getMessage() for r in caplog.records)
    a, b = (load_file(str(c.run_dir / "final" / "sae_weights.safetensors")) for c in (cell_a, cell_b))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the resumed cell is bit-identical
    caplog.clear()
    assert run_cell(stopped, cell_b, telemetry=False)["status"] == "completed"  # finished: nothing trained again
    assert any("already finished" in r.getMessage() for r in caplog.records)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_sweep_configs_are_refused_in_one_line_before_anything_runs(store, tmp_path, capsys):
    def refused(name: str, **changes) -> str:
        config = sweep_config(tmp_path / f"{name}.yaml", store, tmp_path / name, **changes)
        err = one_line_error(capsys, ["sweep", str(config), "--executor", "local"])
        assert not (tmp_path / name).exists()
        return err

    base = yaml.safe_load(sweep_config(tmp_path / "x.yaml", store, tmp_path / "x").read_text())["base"]
    topk = {**base, "sae": {"arch": "topk", "d_in": 32, "d_sae": 64, "k": 4}}
    assert "grid: resampling: only the relu_2023 recipe resamples" in refused(
        "topk", base=topk, grid={"expansion_factors": [2]})
    assert "grid: l1_coefficients: λ is the L1 penalty" in refused(
        "topk-l1", base=topk, grid={"expansion_factors": [2], "l1_coefficients": [1.0], "resampling": [False]})
    assert "grid.colour: unknown key" in refused("unknown", grid={"expansion_factors": [2], "colour": "red"})
    assert "repeated value" in refused("repeated", grid={"expansion_factors": [2, 2]})
    assert "expansion factors must be positive" in refused("negative", grid={"expansion_factors": [0]})
    assert "base.sae.d_in" in refused("no-d_in", base={**base, "sae": {"arch": "relu_2023", "d_sae": 64}})
    assert "sae.d_in is 48, but the dataset" in refused("wrong-width", base={**base, "sae": {**base["sae"], "d_in": 48}})

    # a cell directory holding a run of another config is refused, not resumed as this one
    sweep_dir = tmp_path / "taken"
    taken = sweep_config(tmp_path / "taken.yaml", store, sweep_dir)
    cell = sweep_dir / "cells" / "x2-l1_1-resample"
    cell.mkdir(parents=True)
    other = load_sweep_config(taken).cells()[0].train.model_dump(mode="json")
    other["train"]["lr"] = 0.5
    (cell / "config.yaml").write_text(yaml.safe_dump(other))
    err = one_line_error(capsys, ["sweep", str(taken), "--executor", "local"])
    assert "trained with another config (differs in train.lr)" in err
    assert not (sweep_dir / "sweep.json").exists()


def test_the_shipped_sweep_configs_are_the_demo_grid_and_seed_002s(tmp_path):
    from pipeline.config.reference import config_keys
    from pipeline.config.sweep import SweepConfig

    keys = config_keys(SweepConfig)
    assert all(k.help for k in keys), [k.name for k in keys if not k.help]
    assert {"grid.expansion_factors", "grid.l1_coefficients", "grid.resampling", "stages.spliced_eval",
            "executor", "slurm"} <= {k.name for k in keys}
    demo = load_sweep_config(REPO / "configs" / "sweep-demo.yaml", check_modules=False)
    assert len(demo.cells()) == 8 and not demo.stages.spliced_eval and demo.base.sae.arch == "relu_2023"
    full = load_sweep_config(REPO / "configs" / "sweep-seed002.yaml", check_modules=False)
    cells = full.cells()
    assert {(c.expansion, c.resample) for c in cells} == {(e, r) for e in (4, 8, 16, 32) for r in (True, False)}
    assert len(cells) == 16 and len(set(full.grid.l1_coefficients)) == 2 and full.executor == "slurm"
    assert {c.train.sae.d_sae for c in cells} == {576 * e for e in (4, 8, 16, 32)}
    assert all(c.train.sae.resample is not None for c in cells if c.resample)
    assert all(c.train.sae.resample is None for c in cells if not c.resample)
    assert full.stages.spliced_eval and full.stages.analysis and full.resolved_slurm.gpus_per_node == 1
    # overrides address the sweep file's keys, the base's included
    small = load_sweep_config(REPO / "configs" / "sweep-demo.yaml", ["grid.expansion_factors=[3]",
                                                                     "base.train.steps=7"], check_modules=False)
    assert [c.train.sae.d_sae for c in small.cells()] == [3 * 576] * 4 and small.base.train.steps == 7


def test_a_cell_on_real_activations_gets_its_spliced_score_and_analysis(smollm2_sae, smollm2, tmp_path):
    """The steps after training, on the shared SmolLM2 store: ce_loss_score and the analysis land in the table."""
    from pipeline.orchestrate.sweep_cell import run_cell
    from pipeline.orchestrate.sweep_table import write_results

    base = smollm2_sae.train.model_dump(mode="json")
    base["train"].update(steps=20, log_every=10)
    base["telemetry"] = {"enabled": False}
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump({
        "sweep_dir": str(tmp_path / "sweep"), "base": base,
        "grid": {"expansion_factors": [1], "resampling": [False]},
        "stages": {"spliced_eval": True, "spliced_contexts": 1, "analysis": True, "analysis_tokens": 256,
                   "device": "cpu"},
    }))
    sweep = load_sweep_config(config)
    (cell,) = sweep.cells()
    record = run_cell(sweep, cell, telemetry=False, model=smollm2)
    assert record["status"] == "completed" and record["train"]["step"] == 20
    spliced = record["spliced"]
    assert 0 < spliced["ce_clean"] < spliced["ce_sae"] < spliced["ce_zero"] and 0 < spliced["ce_loss_score"] < 1
    assert record["analysis"]["features"] == 576 and (cell.run_dir / "analysis" / "examples.parquet").exists()
    write_results(sweep)
    (row,) = table(tmp_path / "sweep")
    assert float(row["ce_loss_score"]) == pytest.approx(spliced["ce_loss_score"], rel=1e-5)
    assert float(row["kl_div_score"]) == pytest.approx(spliced["kl_div_score"], rel=1e-5)
    assert row["features_min10"] != "" and row["monosemantic_pct"] == "labelled later"
    # a rerun redoes neither step: the record says both were done with these settings
    stamp = (cell.run_dir / "analysis" / "analysis.json").stat().st_mtime_ns
    assert run_cell(sweep, cell, telemetry=False, model=smollm2)["spliced"] == spliced
    assert (cell.run_dir / "analysis" / "analysis.json").stat().st_mtime_ns == stamp
