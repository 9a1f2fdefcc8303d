"""`saepipe submit` and `saepipe status` without Slurm: submitit's local executor runs the same jobs as child
processes. What is checked here holds on every machine; tests/test_slurm.py runs the cluster side."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO
from helpers.tiny_training import tiny_dataset, write_tiny_config


def saepipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def tiny_train_config(tmp_path: Path, name: str = "run", **changes) -> Path:
    path = write_tiny_config(tmp_path / f"{name}.yaml", tiny_dataset(tmp_path) if not (tmp_path / "acts").exists()
                             else tmp_path / "acts", tmp_path / name, steps=30, log_every=10, eval_rows=512,
                             checkpoint={"every_steps": 10, "keep_last": 1})
    cfg = yaml.safe_load(path.read_text())
    cfg["slurm"] = {"cpus_per_task": 1, "gpus_per_node": 0}
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_local_training_job_is_recorded_and_reported(tmp_path):
    config = tiny_train_config(tmp_path)
    run = saepipe("submit", "train", str(config), "--cluster", "local")
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "submission.json").read_text())
    assert record["kind"] == "train" and record["cluster"] == "local" and len(record["jobs"]["train"]) == 1
    assert record["configs"]["train"]["sae"]["d_sae"] == 256  # the resolved config, defaults filled in
    assert "train.train.lr" not in record["configs"]["train"]
    job = json.loads((run_dir / "jobs" / "train.json").read_text())
    assert job["runs"] == 1 and job["restarts"] == 0 and Path(job["stdout"]).exists()
    status = saepipe("status", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["state"] == "COMPLETED" and row["done"] == row["total"] == 30 and row["percent"] == 100
    assert (run_dir / "final" / "cfg.json").exists()
    human = saepipe("status", str(run_dir))
    assert "1 task(s): 1 completed" in human.stdout

    again = saepipe("submit", "train", "--resume", str(run_dir))
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len(json.loads((run_dir / "submission.json").read_text())["jobs"]["train"]) == 1


def test_a_run_directory_holding_another_config_is_refused(tmp_path):
    assert saepipe("submit", "train", str(tiny_train_config(tmp_path)), "--cluster", "local").returncode == 0
    before = (tmp_path / "run" / "submission.json").read_bytes()
    other = saepipe("submit", "train", str(tiny_train_config(tmp_path, train__lr=1e-3)), "--cluster", "local")
    assert other.returncode == 2
    (line,) = other.stderr.strip().splitlines()
    assert "holds a submission of another config" in line and "train.train" in line and "--resume" in line
    assert (tmp_path / "run" / "submission.json").read_bytes() == before
    # the launch settings are not what a run computes: they may change between submissions
    relaunch = saepipe("submit", "train", str(tiny_train_config(tmp_path, slurm__time_min=90)), "--cluster", "local")
    assert relaunch.returncode == 0, relaunch.stderr


def test_bad_training_input_is_refused_before_anything_is_submitted(tmp_path):
    config = tiny_train_config(tmp_path, sae__d_in=64)  # the store holds 32-wide rows
    run = saepipe("submit", "train", str(config), "--cluster", "local")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "64" in run.stderr
    assert not (tmp_path / "run").exists()
    uneven = saepipe("submit", "train", str(tiny_train_config(tmp_path, "uneven", slurm__tasks_per_node=3)),
                     "--cluster", "local")
    assert uneven.returncode == 2 and "multiple of the number of processes 3" in uneven.stderr
    assert not (tmp_path / "uneven").exists()


def test_a_failed_job_makes_status_exit_1_and_resume_resubmits_it(tmp_path):
    config = tiny_train_config(tmp_path)
    # The store passes the submit-time checks and is broken afterwards: the job itself fails.
    shard = next((tmp_path / "acts").glob("tasks/*/acts-*.parquet"))
    original = shard.read_bytes()
    run_dir = tmp_path / "run"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["verify_checksums"] = True
    config.write_text(yaml.safe_dump(cfg))
    middle = len(original) // 2  # a data page, not the footer: the store opens, the job's checksum pass fails
    shard.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :])
    run = saepipe("submit", "train", str(config), "--cluster", "local")
    assert run.returncode == 1, run.stdout + run.stderr  # the status printed after the wait: a failed task
    status = saepipe("status", str(run_dir), "--json")
    assert status.returncode == 1 and json.loads(status.stdout)[0]["state"] == "FAILED"
    shard.write_bytes(original)
    again = saepipe("submit", "train", "--resume", str(run_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(json.loads((run_dir / "submission.json").read_text())["jobs"]["train"]) == 2
    assert json.loads(saepipe("status", str(run_dir), "--json").stdout)[0]["state"] == "COMPLETED"
