"""`saepipe label` throughput against the local endpoint: `transformers serve` with SmolLM2-135M-Instruct on loopback,
started here, on CPU.

Prints one JSON line:
  features_per_min           features labelled (explained, detection- and fuzzing-scored) per minute of the run's
                             work (from the endpoint check to the last answer; the server's start is not in it)
  outside_endpoint_fraction  share of that wall time when no request was in flight: example loading, the
                             non-activating pool's encode, prompt building, parsing, caching. Goal <= 0.05.
  requests_per_min, requests, features, endpoint_start_s, malformed_share, detection_accuracy, fuzzing_accuracy

    python benchmarks/label.py [--quick] [--run RUN] [--features N] [--concurrency C]

Without --run it trains the tests' small SmolLM2 SAE first (16k tokens of layer 15, 150 steps; about a minute) and
analyses its held-out shard. --quick labels 3 features with configs/label-demo.yaml's settings (under 3 minutes on 2
cores with the SAE build); the default labels 12.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def analysed_run(root: Path) -> tuple[Path, Path]:
    from helpers.smollm2_sae import build

    from pipeline.analysis.analyze import run_analysis
    from pipeline.config import ModelConfig
    from pipeline.extract.model import load_model

    sample = str(REPO / "data" / "pile-sample" / "*.jsonl.zst")
    sae = build(root, load_model(ModelConfig(), show_progress=False), sample)
    return sae.run_dir, run_analysis(sae.run_dir, out=root / "analysis", show_progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 features")
    p.add_argument("--run", help="a trained and analysed run to label (default: build the small SmolLM2 SAE)")
    p.add_argument("--features", type=int, help="features to label (default 12, --quick 3)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight (the local server answers one at "
                                                                 "a time; 2 keeps it busy)")
    args = p.parse_args()

    import yaml

    from pipeline.analysis.labels.local_server import serve
    from pipeline.analysis.labels.run import run_labelling
    from pipeline.config import validate
    from pipeline.config.label import LabelRunConfig, LocalServerConfig

    n = args.features or (3 if args.quick else 12)
    with tempfile.TemporaryDirectory(prefix="saepipe-label-bench-") as tmp:
        tmp = Path(tmp)
        if args.run:
            run, adir = Path(args.run), Path(args.run) / "analysis"
        else:
            run, adir = analysed_run(tmp)
        base = yaml.safe_load((REPO / "configs" / "label-demo.yaml").read_text())
        base["endpoint"].pop("serve")
        t0 = time.perf_counter()
        with serve(LocalServerConfig()) as server:
            start_s = time.perf_counter() - t0
            cfg = validate(LabelRunConfig, {**base, "run": str(run), "analysis": str(adir), "n": n, "min_count": 10,
                                            "out": str(tmp / "labels"),
                                            "endpoint": {**base["endpoint"], "base_url": server.base_url,
                                                         "model": server.model, "concurrency": args.concurrency}},
                           "benchmark")
            outcome = run_labelling(cfg, show_progress=False)
    s = outcome.summary
    o = s["overall"]
    print(json.dumps({
        "features_per_min": round(len(outcome.features) / s["work_seconds"] * 60, 2),
        "outside_endpoint_fraction": s["outside_endpoint_fraction"],
        "requests_per_min": round(s["requests"] / s["work_seconds"] * 60, 1),
        "requests": s["requests"], "features": len(outcome.features), "work_seconds": s["work_seconds"],
        "endpoint_start_s": round(start_s, 1),
        "malformed_share": round(o["malformed_answers"] / max(o["answers"], 1), 3),
        "detection_accuracy": o["detection"]["accuracy"], "fuzzing_accuracy": o["fuzzing"]["accuracy"],
        "concurrency": args.concurrency,
    }))


if __name__ == "__main__":
    main()
