"""A stand-in job for the telemetry tests: starts a job's telemetry (exporter + discovery target) as a training
rank, reports a few steps, prints its metrics URL, then waits for `release` to appear and closes (after the grace
period). Run: python exporter_job.py TARGETS_DIR RANK RELEASE_FILE GRACE_S"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config.telemetry import TelemetryConfig  # noqa: E402
from pipeline.telemetry import job_telemetry  # noqa: E402


def main() -> None:
    targets, rank, release, grace = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    cfg = TelemetryConfig(targets_dir=targets, grace_s=grace, heartbeat_s=0.5, stale_after_s=5)
    tel = job_telemetry(cfg, "train", "/tmp/saepipe-exporter-test-run", task=None, rank=rank)
    tel.metrics.on_setup({"total_steps": 10, "start_step": 0, "batch_size": 4, "checkpoint_every_steps": 5})
    for step in range(1, 4):
        tel.metrics.on_step_end(step)
    print(tel.exporter.url, flush=True)
    while not release.exists():
        time.sleep(0.05)

    class Done:
        status = "completed"
        step = 10

    tel.on_finish(Done())
    tel.metrics.on_finish(Done())
    tel.close()


if __name__ == "__main__":
    main()
