"""The cluster path against a real single-node Slurm (slurm/local-cluster/start.sh): an extraction array equal to a
local run of the same plan, a cancelled task resubmitted alone, a training job preempted twice that finishes by
itself bit-identical to an uninterrupted run, a 2-rank job under Slurm's environment, and the whole pipeline chained
with afterok. Under CI=true a skip here is a failure (conftest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.store import ActivationDataset

from conftest import REPO, SAMPLE
from helpers.tiny_training import tiny_dataset, write_tiny_config
from slurm_cluster import last_step, sacct_state, start_cluster, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    conf = start_cluster()
    os.environ["SLURM_CONF"] = conf
    return conf


def saepipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def extract_config(path: Path, root: Path, budget: int = 6000, per_shard: int = 4) -> Path:
    # Small shards: a task is caught part-way when cancelled. Every run compared uses the same shard size, since
    # a shard's contexts are its forward batches and other batch shapes may round bf16 differently.
    path.write_text(yaml.safe_dump({
        "corpus": {"paths": [SAMPLE], "token_budget": budget},
        "extract": {"layer": 2, "ctx_len": 32, "batch_size": 8},
        "store": {"root": str(root), "contexts_per_shard": per_shard, "row_group_rows": 128, "writer_threads": 1},
        "task": {"num_tasks": 4},
        "slurm": {"cpus_per_task": 1, "gpus_per_node": 1, "time_min": 30},
    }))
    return path


def snapshot(root: Path):
    """Every row of the dataset in order, whatever the shard size: its metadata and its activations' bits."""
    import pyarrow as pa

    ds = ActivationDataset.open(root, require_complete=True)
    meta = pa.concat_tables([ds.read_metadata(i) for i in range(ds.num_shards)]).combine_chunks()
    acts = torch.cat([ds.read_acts(i).view(torch.int16) for i in range(ds.num_shards)])
    return meta, acts


def assert_same_dataset(a: Path, b: Path) -> None:
    (meta_a, acts_a), (meta_b, acts_b) = snapshot(a), snapshot(b)
    assert meta_a.num_rows == meta_b.num_rows > 0
    for name in meta_a.column_names:  # dictionary columns compare by value, whatever each shard's dictionary
        assert meta_a.column(name).to_pylist() == meta_b.column(name).to_pylist(), name
    assert torch.equal(acts_a, acts_b)


def plan_without_timing(root: Path) -> dict:
    plan = json.loads((root / "plan.json").read_text())
    plan["totals"].pop("seconds")  # how long planning took is the one field two equal plans may differ in
    return plan


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "submission.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same plan run by the local executor (no Slurm): the rows the array must give."""
    tmp = tmp_path_factory.mktemp("local")
    run = saepipe("submit", "extract", str(extract_config(tmp / "c.yaml", tmp / "ds")), "--cluster", "local")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 completed" in run.stdout
    return tmp / "ds"


def test_array_extraction_equals_a_local_run_of_the_same_plan(cluster, reference, tmp_path):
    root = tmp_path / "ds"
    run = saepipe("submit", "extract", str(extract_config(tmp_path / "c.yaml", root)), "--cluster", "slurm", "--wait")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = record(root)["jobs"]["extract"]
    assert len(jobs) == 1 and sorted(jobs[0]["tasks"]) == ["0", "1", "2", "3"]  # one array, a task per part
    assert plan_without_timing(root) == plan_without_timing(reference)
    for t in range(4):
        manifest = json.loads(next(root.glob(f"tasks/task-{t:05d}-*/manifest.json")).read_text())
        assert manifest["complete"]
    assert_same_dataset(reference, root)
    status = saepipe("status", str(root), "--json")
    assert status.returncode == 0 and all(r["state"] == "COMPLETED" and r["percent"] == 100 for r in json.loads(status.stdout))


def test_a_cancelled_task_is_reported_and_resubmitted_alone(cluster, reference, tmp_path):
    root = tmp_path / "ds"
    config = extract_config(tmp_path / "c.yaml", root)
    run = saepipe("submit", "extract", str(config), "--cluster", "slurm")
    assert run.returncode == 0, run.stderr[-3000:]
    victim = record(root)["jobs"]["extract"][0]["tasks"]["1"]

    def part_way():
        path = next(root.glob("tasks/task-00001-*/manifest.json"), None)
        if path is None:
            return False
        manifest = json.loads(path.read_text())
        return manifest["shards"] and not manifest["complete"]

    wait_until(part_way, 300, "task 1 to commit a shard")
    subprocess.run(["scancel", victim], check=True)
    wait_until(lambda: sacct_state(victim).startswith("CANCELLED"), 60, "the cancellation")
    array = record(root)["jobs"]["extract"][0]["job_id"]
    wait_until(lambda: all(not sacct_state(f"{array}_{t}").startswith(("PENDING", "RUNNING")) for t in range(4)), 300,
               "the other tasks")
    status = saepipe("status", str(root), "--json")
    assert status.returncode == 1  # a cancelled task fails the run until it is done
    rows = {r["task"]: r for r in json.loads(status.stdout)}
    assert rows["1"]["state"] == "CANCELLED" and 0 < rows["1"]["done"] < rows["1"]["total"]
    assert all(rows[t]["state"] == "COMPLETED" for t in ("0", "2", "3"))

    again = saepipe("submit", "extract", "--resume", str(root), "--wait")
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = record(root)["jobs"]["extract"]
    assert len(jobs) == 2 and list(jobs[1]["tasks"]) == ["1"]  # only the cancelled task went again
    rows = {r["task"]: r for r in json.loads(saepipe("status", str(root), "--json").stdout)}
    assert rows["1"]["state"] == "COMPLETED" and rows["1"]["job_id"] == jobs[1]["tasks"]["1"]
    assert rows["1"]["requeues"] == 0  # a resubmission is a new job, not a requeue
    assert_same_dataset(reference, root)


def training_config(tmp_path: Path, name: str, steps: int, **slurm) -> Path:
    dataset = tiny_dataset(tmp_path) if not (tmp_path / "acts").exists() else tmp_path / "acts"
    path = write_tiny_config(tmp_path / f"{name}.yaml", dataset, tmp_path / name, steps=steps, log_every=20,
                             eval_rows=512, checkpoint={"every_steps": 250, "keep_last": 2})
    cfg = yaml.safe_load(path.read_text())
    cfg["slurm"] = {"cpus_per_task": 1, "gpus_per_node": 0, "time_min": 60, **slurm}
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    step = run_dir / "checkpoints" / f"step_{steps:09d}"
    return {**load_file(str(step / "sae.safetensors")),
            **{f"adam.{k}": v for k, v in load_file(str(step / "optimizer.safetensors")).items()}}


def test_training_preempted_twice_finishes_by_itself_bit_identical(cluster, tmp_path):
    steps = 2400
    straight = saepipe("train", str(training_config(tmp_path, "straight", steps)), "--no-progress")
    assert straight.returncode == 0, straight.stderr[-3000:]
    config = training_config(tmp_path, "preempted", steps)
    run_dir = tmp_path / "preempted"
    assert saepipe("submit", "train", str(config), "--cluster", "slurm").returncode == 0
    job = record(run_dir)["jobs"]["train"][0]["job_id"]
    runs = lambda: json.loads((run_dir / "jobs" / "train.json").read_text())["runs"] if (run_dir / "jobs" / "train.json").exists() else 0  # noqa: E731

    wait_until(lambda: last_step(run_dir) >= 400, 300, "step 400")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # the time-limit / preemption signal
    wait_until(lambda: runs() >= 2 and last_step(run_dir) >= 1000, 300, "the requeued run past step 1000")
    subprocess.run(["scontrol", "requeue", job], check=True)  # preemption by the scheduler: SIGTERM, then requeue
    wait_until(lambda: sacct_state(job) == "COMPLETED" and (run_dir / "status.json").exists(), 600, "the job to finish")
    assert runs() == 3
    a, b = final_weights(tmp_path / "straight", steps), final_weights(run_dir, steps)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    status = json.loads(saepipe("status", str(run_dir), "--json").stdout)
    assert status[0]["state"] == "COMPLETED" and status[0]["requeues"] == 2
    logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*/*_0_log.err"))
    assert "Caught signal SIGUSR2" in logs and "resumed from" in logs


def test_two_ranks_under_slurm_match_one_process(cluster, tmp_path):
    steps = 60
    one = saepipe("train", str(training_config(tmp_path, "one", steps)), "--no-progress")
    assert one.returncode == 0, one.stderr[-3000:]
    run_dir = tmp_path / "two"
    submitted = saepipe("submit", "train", str(training_config(tmp_path, "two", steps, tasks_per_node=2)),
                        "--cluster", "slurm", "--wait")
    assert submitted.returncode == 0, submitted.stderr[-3000:] + submitted.stdout
    for rank in (0, 1):
        log = next((run_dir / "submitit").glob(f"*/*_{rank}_log.err")).read_text()
        assert f"training rank {rank} of 2" in log
    assert "on 2 process(es)" in next((run_dir / "submitit").glob("*/*_0_log.err")).read_text()
    a = load_file(str(tmp_path / "one" / "checkpoints" / f"step_{steps:09d}" / "sae.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step_{steps:09d}" / "sae.safetensors"))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert ((a[name] - b[name]).abs().max() / a[name].abs().max()).item() <= 1e-4, name


def test_the_whole_pipeline_chains_training_after_the_array(cluster, tmp_path):
    run_dir = tmp_path / "pipeline"
    run = saepipe("submit", "pipeline", str(REPO / "configs" / "pipeline-demo.yaml"), "--cluster", "slurm", "--wait",
                  f"run_dir={run_dir}", f"extract.store.root={tmp_path / 'acts'}", f"train.run_dir={tmp_path / 'sae'}",
                  "extract.corpus.token_budget=12000", "extract.extract.layer=2", "extract.store.contexts_per_shard=16",
                  "extract.store.row_group_rows=256", "train.train.tokens=null", "train.train.steps=20",
                  "train.train.batch_size=256", "train.data.partitions=2", "train.data.init_rows=1024",
                  "train.sae.d_sae=1152", "train.eval.max_rows=1024", "train.train.log_every=5",
                  "analyze.tokens=3000", "analyze.eval_contexts=4", "analyze.top_k=5",
                  "label.n=1", "label.min_count=5", "label.score_examples=2", "label.negative_pool=32")
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout
    rec = record(run_dir)["jobs"]
    assert len(rec["extract"]) == 1 and len(rec["extract"][0]["tasks"]) == 4 and len(rec["train"]) == 1
    script = next((run_dir / "submitit").glob(f"{rec['train'][0]['job_id']}/*_submission.sh")).read_text()
    assert f"--dependency=afterok:{rec['extract'][0]['job_id']}" in script
    script = next((run_dir / "submitit").glob(f"{rec['analyze'][0]['job_id']}/*_submission.sh")).read_text()
    assert f"--dependency=afterok:{rec['train'][0]['job_id']}" in script
    started = json.loads((run_dir / "jobs" / "train.json").read_text())["started"]
    ended = max(p.stat().st_mtime for p in (tmp_path / "acts").glob("tasks/*/manifest.json"))
    assert started > ended  # training ran only after every extraction task had committed its last shard
    analysed = json.loads((run_dir / "jobs" / "analyze.json").read_text())["started"]
    assert analysed > (tmp_path / "sae" / "final" / "cfg.json").stat().st_mtime  # and the analysis after training
    script = next((run_dir / "submitit").glob(f"{rec['label'][0]['job_id']}/*_submission.sh")).read_text()
    assert f"--dependency=afterok:{rec['analyze'][0]['job_id']}" in script  # then the labelling after the analysis
    status = saepipe("status", str(run_dir), "--json")
    rows = json.loads(status.stdout)
    assert status.returncode == 0 and len(rows) == 7 and all(r["state"] == "COMPLETED" for r in rows)
    assert [r["stage"] for r in rows][-2:] == ["analyze", "label"] and rows[-2]["done"] == rows[-2]["total"] == 3
    assert rows[-1]["done"] == rows[-1]["total"] == 1 and rows[-1]["unit"] == "features"
    analysis = tmp_path / "sae" / "analysis"
    labels = pq.read_table(analysis / "labels.parquet").to_pylist()
    assert len(labels) == 1 and labels[0]["explanation_raw"]  # explained by the server the job started itself
    spliced = json.loads((analysis / "spliced.json").read_text())
    assert spliced["ce_clean"] <= spliced["ce_sae"] <= spliced["ce_zero"]
    assert (analysis / "features.parquet").exists() and (analysis / "browser" / "index.html").exists()
