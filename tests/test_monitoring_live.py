"""Telemetry against a real Prometheus and Alertmanager (saepipe monitor up): a demo-sized extraction and a short
training run are discovered through file_sd and every query of every dashboard panel returns data from them; a
real browser plots a training metric; a run whose loss turns NaN has its alert delivered to a webhook; an array
task under the local Slurm cluster is discovered with its Slurm labels. Under CI=true a skip here is a failure."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ExtractRunConfig, validate
from pipeline.config.telemetry import TelemetryConfig
from pipeline.config.train import TrainRunConfig
from pipeline.extract.runner import ExtractionRunner
from pipeline.telemetry import job_telemetry
from pipeline.train.trainer import Trainer

from conftest import REPO, SAMPLE, running_under_ci
from helpers.synthetic import write_synthetic_dataset
from monitoring_stack import start_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = REPO / "monitoring" / "prometheus" / "rules" / "saepipe.rules.yml"
DASHBOARDS = REPO / "monitoring" / "grafana" / "dashboards"


def immediate_nan_rule(path: Path) -> Path:
    """The committed NaN-loss alert with `for: 0s` (the shipped rule is already immediate; this pins it)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "SaepipeLossNotFinite")
    rule = {**rule, "alert": "SaepipeLossNotFiniteNow", "for": "0s"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "saepipe-test", "interval": "1s", "rules": [rule]}]}))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    s = start_stack(root, [immediate_nan_rule(root / "nan-now.rules.yml")])
    yield s
    s.monitor("down")
    s.webhook.close()


def telemetry(stack, **kw) -> TelemetryConfig:
    return TelemetryConfig(targets_dir=str(stack.targets), grace_s=0, heartbeat_s=1, **kw)


def corpus_with_bad_records(tmp_path: Path) -> list[str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a good line of text to keep", "meta": {"pile_set_name": "Extra"}}\n{not json\n'
                   '{"meta": {}}\n')
    return [str(bad), SAMPLE]  # first, so that the budget reaches it


def load_dashboard_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", REPO / "monitoring" / "grafana" / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScrapedMidRun:
    """Holds the run at the given steps until Prometheus has scraped them. A 40-step run on a fast machine, or one
    that starts before file_sd has found its target, can otherwise finish between two scrapes; then every sample of
    saepipe_progress_done is the final value, deriv() is 0 and the ETA panels rightly show nothing."""

    def __init__(self, stack, run: str, steps: tuple[int, ...]) -> None:
        self.stack, self.run, self.steps = stack, run, steps

    def on_step_end(self, step: int) -> None:
        if step in self.steps:
            self.stack.wait_for(f'saepipe_progress_done{{run="{self.run}"}} >= {step}', 60,
                                f"step {step} of {self.run} to be scraped")


@pytest.fixture(scope="module")
def live_runs(stack, smollm2, tmp_path_factory):
    """A demo-sized extraction and a short training run on its activations, both with exporters, both kept serving
    (as in their grace period) until the module's tests are done."""
    tmp = tmp_path_factory.mktemp("live")
    ecfg = validate(ExtractRunConfig, {
        "corpus": {"paths": corpus_with_bad_records(tmp), "token_budget": 6000},
        "extract": {"layer": 3, "ctx_len": 64, "batch_size": 8},
        "store": {"root": str(tmp / "live-acts"), "contexts_per_shard": 16, "row_group_rows": 256, "writer_threads": 1},
        "telemetry": telemetry(stack).model_dump()}, "test")
    ext = job_telemetry(ecfg.telemetry, "extract", ecfg.store.root, task=0, info={"model": ecfg.model.name})
    with ExtractionRunner(ecfg, smollm2, callbacks=ext.callbacks, show_progress=False) as runner:
        assert runner.run().status == "completed"
    tcfg = validate(TrainRunConfig, {
        "run_dir": str(tmp / "live-sae"),
        "data": {"root": ecfg.store.root, "eval_shards": 1, "partitions": 1, "init_rows": 512},
        "sae": {"arch": "topk", "d_in": 576, "d_sae": 1152, "k": 8, "dead_tokens": 2048},
        "train": {"batch_size": 128, "steps": 40, "lr": 1e-3, "warmup_steps": 2, "log_every": 5, "threads": 1},
        "eval": {"max_rows": 512, "batch_size": 256, "histogram": False},
        "checkpoint": {"every_steps": 20, "keep_last": 1},
        "telemetry": telemetry(stack).model_dump()}, "test")
    tr = job_telemetry(tcfg.telemetry, "train", tcfg.run_dir, task=None, info={"arch": "topk"})
    with Trainer(tcfg, callbacks=[*tr.callbacks, ScrapedMidRun(stack, "live-sae", (1, 20))],
                 show_progress=False) as trainer:
        assert trainer.fit().status == "completed"
    for run in ("live-acts", "live-sae"):  # both scraped after they finished
        stack.wait_for(f'saepipe_finished{{run="{run}"}} == 1', 60, f"the finished {run} to be scraped")
    time.sleep(3)  # a few more scrapes, for the rate() windows
    yield {"extract": ecfg, "train": tcfg}
    ext.close()
    tr.close()


def test_every_dashboard_query_returns_data_from_the_runs(stack, live_runs):
    builder = load_dashboard_builder()
    files = sorted(DASHBOARDS.glob("*.json"))
    assert len(files) >= 4
    gpus = stack.query("max(saepipe_gpu_count)")
    has_gpu = bool(gpus) and float(gpus[0]["value"][1]) > 0
    checked, empty, without_gpu = 0, [], []
    for path in files:
        dashboard = json.loads(path.read_text())
        for title, expr in builder.panel_queries(dashboard):
            # Grafana's variables as Grafana expands them with both runs selected (and All for the others)
            query = builder.concrete(expr, {"run": "live-acts|live-sae"}, rate_interval="30s")
            if not has_gpu and re.search(r"saepipe_gpu_(?!count)", expr):
                without_gpu.append(f"{path.name}: {title}")  # NVML absent: no GPU series exist to show
                continue
            checked += 1
            if not stack.query(query):
                empty.append(f"{path.name} / {title}: {query}")
    assert checked >= 20 and not empty, "panels without data:\n" + "\n".join(empty)
    if without_gpu:
        print(f"{len(without_gpu)} GPU panel queries not checked (no NVML on this machine): {without_gpu}")


def test_targets_carry_the_job_labels(stack, live_runs):
    (train,) = stack.query('up{job="saepipe", run="live-sae"}')
    assert train["value"][1] == "1"
    labels = train["metric"]
    assert labels["stage"] == "train" and labels["task"] == "-" and labels["rank"] == "0" and labels["host"]
    assert not any(k.startswith("__saepipe") for k in labels)
    (extract,) = stack.query('saepipe_extract_skipped_records_total{run="live-acts", reason="invalid_json"}')
    assert float(extract["value"][1]) == 1 and extract["metric"]["task"] == "0"


def test_chromium_plots_a_training_metric_in_prometheus(stack, live_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if running_under_ci():
            pytest.fail("chromium is missing under CI")
        pytest.skip("no chromium (apt-get install chromium)")

    def shot(expr: str, name: str) -> Path:
        out = tmp_path / name
        url = (f"{stack.url}/graph?g0.expr={expr}&g0.tab=0&g0.range_input=1m&g0.stacked=0&g0.show_exemplars=0")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,1000", "--virtual-time-budget=15000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
        return out

    def coloured_pixels(path: Path) -> int:
        import matplotlib.image

        img = matplotlib.image.imread(str(path))[..., :3]
        spread = img.max(axis=2) - img.min(axis=2)
        return int((spread > 0.25).sum())

    plotted = shot('saepipe_train_loss%7Brun%3D%22live-sae%22%7D', "prometheus-train-loss.png")
    blank = shot("saepipe_no_such_metric", "prometheus-empty.png")
    artifacts = Path(os.environ.get("SAEPIPE_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    if artifacts.resolve() != tmp_path.resolve():
        shutil.copy(plotted, artifacts / plotted.name)
    # the page around the plot (navigation, buttons) is the same in both; the plotted series are what differs
    extra = coloured_pixels(plotted) - coloured_pixels(blank)
    print(f"screenshot {artifacts / plotted.name}: {extra} more coloured pixels than with no series")
    assert extra > 500


def test_a_nan_loss_alert_reaches_the_webhook_naming_run_and_task(stack, tmp_path):
    data = write_synthetic_dataset(tmp_path / "nan-acts", d=32, shards=4, rows_per_shard=1024, nan_shards=(1, 2))
    cfg = validate(TrainRunConfig, {
        "run_dir": str(tmp_path / "nan-run"),
        "data": {"root": str(data), "eval_shards": 1, "partitions": 1, "init_rows": 256},
        # no data-dependent initialisation, which would refuse NaN rows before the first step
        "sae": {"arch": "topk", "d_in": 32, "d_sae": 128, "k": 2, "dead_tokens": 512, "normalize_input": False,
                "b_dec_init": "zeros"},
        "train": {"batch_size": 128, "steps": 30, "lr": 1e-3, "warmup_steps": 1, "log_every": 5, "threads": 1},
        "eval": {"max_rows": 256, "batch_size": 256, "histogram": False},
        "checkpoint": {"every_steps": 100, "keep_last": 1},
        "telemetry": telemetry(stack).model_dump()}, "test")
    tel = job_telemetry(cfg.telemetry, "train", cfg.run_dir, task=None)
    try:
        with Trainer(cfg, callbacks=tel.callbacks, show_progress=False) as trainer:
            trainer.fit()
        stack.wait_for('saepipe_train_loss{run="nan-run", term="total"} != saepipe_train_loss{run="nan-run", term="total"}',
                       60, "the NaN loss to be scraped")
        deadline = time.time() + 90
        alert = None
        while alert is None and time.time() < deadline:
            for payload in list(stack.webhook.payloads):
                for a in payload.get("alerts", []):
                    if a["labels"].get("alertname") == "SaepipeLossNotFiniteNow" and a["labels"].get("run") == "nan-run":
                        alert = a
            time.sleep(0.5)
    finally:
        tel.close()
    assert alert is not None, f"no NaN-loss alert delivered; payloads: {stack.webhook.payloads[-3:]}"
    assert alert["status"] == "firing" and alert["labels"]["stage"] == "train" and alert["labels"]["task"] == "-"
    assert "nan-run" in json.dumps(alert["annotations"])


def test_an_array_task_under_slurm_is_discovered_with_its_slurm_labels(stack, tmp_path):
    from slurm_cluster import start_cluster

    os.environ["SLURM_CONF"] = start_cluster()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "corpus": {"paths": [SAMPLE], "token_budget": 3000},
        "extract": {"layer": 2, "ctx_len": 32, "batch_size": 8},
        "store": {"root": str(tmp_path / "slurm-acts"), "contexts_per_shard": 8, "row_group_rows": 128, "writer_threads": 1},
        "task": {"num_tasks": 2},
        "slurm": {"cpus_per_task": 1, "gpus_per_node": 1, "time_min": 30},
        "telemetry": {"targets_dir": str(stack.targets), "grace_s": 30, "heartbeat_s": 1},
    }))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "submit", "extract", str(config), "--cluster", "slurm"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "slurm-acts" / "submission.json").read_text())
    array = record["jobs"]["extract"][0]["job_id"]
    try:
        (found,) = stack.wait_for('saepipe_job_info{run="slurm-acts", array_task_id="1"}', 240, "array task 1's exporter")
        labels = found["metric"]
        assert labels["stage"] == "extract" and labels["task"] == "1" and labels["slurm_job_id"]
        assert labels["hpc_job"] == labels["slurm_job_id"]
        assert record["jobs"]["extract"][0]["tasks"]["1"] == f"{array}_1"
    finally:
        subprocess.run(["scancel", array], capture_output=True)
