"""What telemetry costs a job: extraction time with the exporter (fed by every batch and shard, and scraped every
second by a stand-in for Prometheus) over the same extraction without it, as the median of per-round ratios
(rounds alternate which goes first); and how long one scrape of a training job's exporter takes.

    python benchmarks/telemetry.py [--quick] [--rounds N] [--tokens N]

Prints one JSON line: overhead (goal <= 1.01), scrape_ms_median, scrape_ms_max (goal <= 10).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import ExtractRunConfig, ModelConfig, validate  # noqa: E402
from pipeline.config.telemetry import TelemetryConfig  # noqa: E402
from pipeline.extract.model import load_model  # noqa: E402
from pipeline.extract.runner import ExtractionRunner  # noqa: E402
from pipeline.telemetry import job_telemetry  # noqa: E402

SAMPLE = str(REPO / "data" / "pile-sample" / "pile-sample-*.jsonl.zst")


def scraper(url: str, stop: threading.Event, every_s: float = 1.0) -> threading.Thread:
    def loop():
        while not stop.wait(every_s):
            urllib.request.urlopen(url, timeout=5).read()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def extract_once(loaded, root: str, tokens: int, targets: str | None) -> float:
    cfg = validate(ExtractRunConfig, {
        "corpus": {"paths": [SAMPLE], "token_budget": tokens}, "extract": {"layer": 15, "ctx_len": 128},
        "store": {"root": root, "contexts_per_shard": 32}}, "benchmark")
    t0 = time.perf_counter()
    if targets is None:
        with ExtractionRunner(cfg, loaded, show_progress=False) as runner:
            runner.run()
        return time.perf_counter() - t0
    tel = job_telemetry(TelemetryConfig(targets_dir=targets, grace_s=0), "extract", root, task=0)
    stop = threading.Event()
    thread = scraper(tel.exporter.url, stop)
    try:
        with ExtractionRunner(cfg, loaded, callbacks=tel.callbacks, show_progress=False) as runner:
            runner.run()
        return time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
        tel.close()


def scrape_times(targets: str, n: int = 50) -> list[float]:
    tel = job_telemetry(TelemetryConfig(targets_dir=targets, grace_s=0), "train", targets + "/run", task=None)
    m = tel.metrics
    m.on_setup({"total_steps": 1000, "start_step": 0, "batch_size": 4096, "checkpoint_every_steps": 100})
    m.on_metrics(10, {"loss": 1.0, "recon_loss": 0.9, "aux_loss": 0.1, "l0": 64, "fvu": 0.2, "lr": 1e-4,
                      "grad_norm": 1.0, "dead_pct": 1.0, "tokens": 40960, "tokens_per_s": 1e5, "step_seconds": 0.04,
                      "data_wait_seconds": 0.001})
    m.on_eval(10, {"fvu": 0.2, "l0": 64, "dead_pct": 1.0})
    urllib.request.urlopen(tel.exporter.url).read()  # the first scrape starts psutil's CPU interval
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        urllib.request.urlopen(tel.exporter.url).read()
        out.append((time.perf_counter() - t0) * 1000)
    tel.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 6k tokens")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="budget per extraction (default 16k; --quick 6k)")
    ap.add_argument("--scrape-only", action="store_true", help="only the scrape timing (no model, no extraction)")
    args = ap.parse_args()
    if args.scrape_only:
        with tempfile.TemporaryDirectory() as tmp:
            scrapes = scrape_times(f"{tmp}/targets", n=200)
        print(json.dumps({"benchmark": "telemetry-scrape", "scrapes": len(scrapes),
                          "scrape_ms_median": round(statistics.median(scrapes), 2),
                          "scrape_ms_p90": round(sorted(scrapes)[int(0.9 * len(scrapes))], 2),
                          "scrape_ms_max": round(max(scrapes), 2), "goals": {"scrape_ms": "<= 10"}}))
        return
    rounds = args.rounds or (3 if args.quick else 7)
    tokens = args.tokens or (6_000 if args.quick else 16_000)
    loaded = load_model(ModelConfig(), show_progress=False)
    ratios, with_s, without_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        extract_once(loaded, f"{tmp}/warm", 2_000, None)  # first-use costs (kernels, caches) outside the rounds
        for r in range(rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            times = {}
            for telemetry in order:
                root = f"{tmp}/r{r}-{int(telemetry)}"
                times[telemetry] = extract_once(loaded, root, tokens, f"{tmp}/targets" if telemetry else None)
            ratios.append(times[True] / times[False])
            with_s.append(times[True])
            without_s.append(times[False])
        scrapes = scrape_times(f"{tmp}/targets")
    print(json.dumps({
        "benchmark": "telemetry", "rounds": rounds, "tokens_per_round": tokens,
        "seconds_with_median": round(statistics.median(with_s), 3),
        "seconds_without_median": round(statistics.median(without_s), 3),
        "ratios": [round(x, 4) for x in ratios],
        "scrape_ms_median": round(statistics.median(scrapes), 2), "scrape_ms_max": round(max(scrapes), 2),
        "goals": {"overhead": "<= 1.01", "scrape_ms": "<= 10"},
        "overhead": round(statistics.median(ratios), 4),
    }))


if __name__ == "__main__":
    main()
