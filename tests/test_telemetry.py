"""The job exporter without a Prometheus: what it serves, its ports and discovery targets with many jobs on one
host, the grace period, stale targets of killed jobs. tests/test_monitoring_live.py scrapes real runs."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.config.telemetry import TelemetryConfig
from pipeline.telemetry import job_telemetry
from pipeline.telemetry.discovery import list_targets, sweep_stale

from conftest import REPO

JOB = REPO / "tests" / "helpers" / "exporter_job.py"


def scrape(url: str) -> dict[str, list]:
    """Samples by series name, as Prometheus stores them (counters with their `_total`)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def config(tmp_path: Path, **kw) -> TelemetryConfig:
    return TelemetryConfig(targets_dir=str(tmp_path / "targets"), grace_s=0, **kw)


class Result:
    def __init__(self, status: str, step: int = 0) -> None:
        self.status, self.step, self.manifest = status, step, {}


def test_training_metrics_are_served_with_prometheus_names(tmp_path):
    tel = job_telemetry(config(tmp_path), "train", tmp_path / "run-a", task=None, rank=0, info={"arch": "topk"})
    try:
        m = tel.metrics
        m.on_setup({"total_steps": 100, "start_step": 20, "batch_size": 8, "checkpoint_every_steps": 10, "requeues": 2})
        m.on_step_end(21)
        m.on_metrics(21, {"loss": float("nan"), "recon_loss": 0.5, "aux_loss": 0.1, "l0": 4.0, "fvu": 0.3, "lr": 1e-3,
                          "grad_norm": 2.0, "dead_pct": 12.5, "tokens": 21 * 8, "tokens_per_s": 80.0,
                          "step_seconds": 0.1, "data_wait_seconds": 0.02})
        m.on_checkpoint(21, tmp_path, 1.5)
        got = scrape(tel.exporter.url)
    finally:
        tel.close()
    value = lambda name, **labels: next(s.value for s in got[name] if all(s.labels.get(k) == v for k, v in labels.items()))  # noqa: E731
    assert math.isnan(value("saepipe_train_loss", term="total"))  # a NaN loss is exported as NaN, for the alert
    assert value("saepipe_train_loss", term="recon") == 0.5
    assert value("saepipe_train_dead_ratio") == 0.125 and value("saepipe_train_step") == 21
    assert value("saepipe_train_tokens_total") == 8  # this process's tokens: one step after resuming at step 20
    assert value("saepipe_requeues") == 2 and value("saepipe_progress_target") == 100
    assert abs(value("saepipe_train_step_seconds", phase="compute") - 0.08) < 1e-9
    assert value("saepipe_train_checkpoint_interval_seconds") == 10 * 0.1
    assert value("saepipe_train_checkpoint_duration_seconds") == 1.5
    info = got["saepipe_job_info"][0].labels
    assert info["run"] == "run-a" and info["stage"] == "train" and info["rank"] == "0" and info["arch"] == "topk"
    for name in ("saepipe_process_resident_memory_bytes", "saepipe_host_memory_total_bytes",
                 "saepipe_filesystem_free_bytes", "saepipe_host_cpu_utilization_ratio", "saepipe_gpu_count"):
        assert name in got, name
    assert not any(n.endswith("_created") for n in got)
    assert not list((tmp_path / "targets").glob("*.json"))  # closed: unannounced


def test_extraction_callbacks_count_tokens_shards_and_skips(tmp_path):
    tel = job_telemetry(config(tmp_path), "extract", tmp_path / "store", task=3)
    try:
        m = tel.metrics
        m.on_setup({"resumed_rows": 100, "token_target": 1000})
        for _ in range(3):
            m.on_batch({"tokens": 50, "body_tokens": 50, "documents": 2, "forward_seconds": 0.25, "pending_shards": 1,
                        "prefetched_shards": 2})
        m.on_shard_committed({"bytes": 4096})
        m.on_skip("invalid_json", 2)
        got = scrape(tel.exporter.url)
        target = json.loads(next((tmp_path / "targets").glob("*.json")).read_text())[0]
    finally:
        tel.close()
    value = lambda name: got[name][0].value  # noqa: E731
    assert value("saepipe_extract_tokens_total") == 150 and value("saepipe_extract_documents_total") == 6
    assert value("saepipe_extract_forward_seconds_total") == 0.75 and value("saepipe_extract_shards_total") == 1
    assert value("saepipe_extract_written_bytes_total") == 4096
    assert got["saepipe_extract_skipped_records_total"][0].labels == {"reason": "invalid_json"}
    assert value("saepipe_progress_done") == 250 and value("saepipe_progress_target") == 1000
    assert target["labels"]["task"] == "3" and target["labels"]["stage"] == "extract"
    assert target["labels"]["run"] == "store" and target["targets"][0].startswith("127.0.0.1:")


def test_disabled_telemetry_exports_nothing(tmp_path):
    tel = job_telemetry(config(tmp_path, enabled=False), "train", tmp_path, task=None)
    assert tel.callbacks == [] and tel.exporter is None
    tel.close()
    assert not (tmp_path / "targets").exists()


def test_no_free_port_runs_the_job_without_metrics(tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        tel = job_telemetry(config(tmp_path, port_range=(port, port)), "train", tmp_path, task=None)
    assert tel.exporter is None and tel.callbacks == []
    assert any("no free port" in r.message for r in caplog.records)


def test_eight_jobs_on_one_host_get_eight_ports_and_leave_no_target(tmp_path):
    targets, release = tmp_path / "targets", tmp_path / "release"
    jobs = [subprocess.Popen([sys.executable, str(JOB), str(targets), str(r), str(release), "1.5"],
                             stdout=subprocess.PIPE, text=True) for r in range(8)]
    try:
        urls = [j.stdout.readline().strip() for j in jobs]
        assert len(set(urls)) == 8 and all(u.startswith("http://127.0.0.1:") for u in urls)
        listed = list_targets(targets)
        assert len(listed) == 8 and sorted(t["labels"]["rank"] for t in listed) == [str(r) for r in range(8)]
        assert {f"http://{t['target']}/metrics" for t in listed} == set(urls)
        for url in urls:
            assert scrape(url)["saepipe_train_step"][0].value == 3
        release.touch()
        time.sleep(0.5)
        # within the grace period the finished jobs still serve, and stay announced, so the last scrapes land
        assert len(list_targets(targets)) == 8 and scrape(urls[0])["saepipe_finished"][0].value == 1
        for j in jobs:
            assert j.wait(timeout=30) == 0
    finally:
        for j in jobs:
            j.kill()
    assert list_targets(targets) == []


def test_a_killed_job_leaves_a_stale_target_that_is_swept(tmp_path):
    targets = tmp_path / "targets"
    job = subprocess.Popen([sys.executable, str(JOB), str(targets), "0", str(tmp_path / "never"), "0"],
                           stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().startswith("http://")
    assert sweep_stale(targets, 300) == []  # alive: kept
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    (stale,) = targets.glob("*.json")  # SIGKILL: no chance to clean up
    # the next job to start on this host sweeps it (its pid is dead), before announcing itself
    tel = job_telemetry(config(tmp_path), "train", tmp_path / "next", task=None)
    try:
        assert not stale.exists() and len(list(targets.glob("*.json"))) == 1
    finally:
        tel.close()


def test_a_target_from_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    other = targets / "far.json"
    other.write_text(json.dumps([{"targets": ["node7:9800"], "labels": {
        "run": "r", "__saepipe_host": "node7", "__saepipe_pid": "1", "__saepipe_started": "0"}}]))
    assert sweep_stale(targets, 60) == []  # refreshed just now
    old = time.time() - 120
    os.utime(other, (old, old))
    assert sweep_stale(targets, 60) == [other] and not other.exists()


def test_the_metric_reference_lists_exactly_what_exporters_serve(tmp_path):
    import re

    documented = set(re.findall(r"`(saepipe_\w+)", (REPO / "monitoring" / "METRICS.md").read_text()))
    served: set[str] = set()
    for stage in ("extract", "train"):
        tel = job_telemetry(config(tmp_path), stage, tmp_path / stage, task=0 if stage == "extract" else None)
        try:
            # labelled series appear with their first value
            if stage == "extract":
                tel.metrics.on_skip("invalid_json", 1)
            else:
                tel.metrics.on_metrics(1, {"loss": 1.0, "step_seconds": 0.1, "data_wait_seconds": 0.01})
            served |= set(scrape(tel.exporter.url))
        finally:
            tel.close()
    gpu = {n for n in documented if n.startswith("saepipe_gpu_") and n != "saepipe_gpu_count"}
    has_gpu = any(n in served for n in gpu)
    assert served - documented == set(), "served but not in monitoring/METRICS.md"
    assert documented - served - (set() if has_gpu else gpu) == set(), "documented but not served"
