"""Crash safety: SIGKILL an extraction task at many moments around shard commits, re-run it each time, and end with
exactly the rows of an uninterrupted run: no partial, duplicate or missing rows, nothing half-written visible."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.store import ActivationDataset

from conftest import REPO, SAMPLE

KILL_POINTS = ["before_write:1", "tmp_written:2", "ctx_renamed:3", "acts_renamed:4", "manifest_written:5"]


def write_config(path, root):
    path.write_text(yaml.safe_dump({
        "corpus": {"paths": [SAMPLE], "token_budget": 3000},
        "extract": {"layer": 1, "ctx_len": 32, "batch_size": 8},
        "store": {"root": str(root), "contexts_per_shard": 8, "row_group_rows": 64},
    }))
    return path


def extract(config, crash_at=None, wait=True):
    """`saepipe extract CONFIG`; with crash_at ("phase:shard"), the same CLI run SIGKILLs itself at that point."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pipeline.cli.main", "extract"] if crash_at is None else \
        [sys.executable, str(REPO / "tests" / "helpers" / "killed_extract.py"), crash_at]
    cmd += [str(config), "--no-progress"]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def manifest_shards(root):
    path = root / "tasks" / "task-00000-of-00001" / "manifest.json"
    return json.loads(path.read_text())["shards"] if path.exists() else []


def snapshot(root):
    ds = ActivationDataset.open(root)
    meta = [ds.read_metadata(i) for i in range(ds.num_shards)]
    acts = [ds.read_acts(i, dtype=torch.bfloat16).view(torch.int16) for i in range(ds.num_shards)]
    return meta, acts


def assert_consistent(root):
    """What a reader can see after a crash: the dataset opens, every visible shard file is whole, no row twice."""
    ds = ActivationDataset.open(root)
    task_dir = root / "tasks" / "task-00000-of-00001"
    for f in task_dir.glob("*.parquet"):
        assert f.name.startswith(("acts-", "ctx-")), f"stray file visible to globbing readers: {f.name}"
        pq.read_table(f)  # raises on a partial file
    seen = set()
    for i in range(ds.num_shards):
        t = ds.read_metadata(i).to_pydict()
        for key in zip(t["context_id"], t["pos"]):
            assert key not in seen
            seen.add(key)


@pytest.mark.slow
def test_killed_task_resumes_to_identical_rows(tmp_path):
    base_root, crash_root = tmp_path / "base", tmp_path / "crash"
    done = extract(write_config(tmp_path / "base.yaml", base_root))
    assert done.returncode == 0, done.stdout + done.stderr
    n_shards = len(manifest_shards(base_root))
    assert n_shards >= 8, "the test needs enough shards to kill around"

    config = write_config(tmp_path / "crash.yaml", crash_root)
    for n, point in enumerate(KILL_POINTS):
        run = extract(config, crash_at=point)
        assert run.returncode == -signal.SIGKILL, f"{point}: expected a SIGKILL, got {run.returncode}\n{run.stderr[-2000:]}"
        assert_consistent(crash_root)
        # every run after the first finds the lease of a killed process on this host and takes it over
        assert n == 0 or "taking over the lease" in run.stderr and "its process is gone" in run.stderr, run.stderr

    # one more kill from outside, at whatever moment the next shard is in
    before = len(manifest_shards(crash_root))
    proc = extract(config, wait=False)
    deadline = time.time() + 120
    while len(manifest_shards(crash_root)) <= before and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_consistent(crash_root)

    final = extract(config)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_consistent(crash_root)
    (meta_a, acts_a), (meta_b, acts_b) = snapshot(base_root), snapshot(crash_root)
    assert len(meta_a) == len(meta_b) == n_shards
    for ma, mb, aa, ab in zip(meta_a, meta_b, acts_a, acts_b):
        assert ma.equals(mb)
        assert torch.equal(aa, ab)
    visible = sorted(p.name for p in (crash_root / "tasks" / "task-00000-of-00001").iterdir() if p.suffix == ".parquet")
    listed = sorted([s["acts_file"] for s in manifest_shards(crash_root)] + [s["ctx_file"] for s in manifest_shards(crash_root)])
    assert visible == listed
