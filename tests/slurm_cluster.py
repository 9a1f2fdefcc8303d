"""The local single-node Slurm cluster for the tests: started by slurm/local-cluster/start.sh under CI (or with
SAEPIPE_TEST_SLURM=1); otherwise an already running one (SLURM_CONF set and answering) is used, and without one the
tests skip with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, running_under_ci

START = REPO / "slurm" / "local-cluster" / "start.sh"


def start_cluster() -> str:
    """SLURM_CONF of a running cluster, starting the local one when this run may."""
    if running_under_ci() or os.environ.get("SAEPIPE_TEST_SLURM") == "1":
        t0 = time.perf_counter()
        run = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"slurm/local-cluster/start.sh failed:\n{run.stderr[-3000:]}")
        conf = run.stdout.strip().splitlines()[-1].split("=", 1)[1]
        print(f"local Slurm cluster up in {time.perf_counter() - t0:.1f} s ({conf})")
        return conf
    conf = os.environ.get("SLURM_CONF")
    if conf and Path(conf).is_file():
        ping = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, env=dict(os.environ, SLURM_CONF=conf))
        if ping.returncode == 0:
            return conf
    pytest.skip("no Slurm cluster: run slurm/local-cluster/start.sh and export the SLURM_CONF it prints "
                "(CI=true starts it)")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    lines = [line.split()[0] for line in out.splitlines() if line.strip()]
    return lines[0] if lines else ""


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    return steps[-1] if steps else 0
