"""The feature browser at production width: a synthetic analysis directory of 65,536 features (log-normal densities,
5% dead, 20 top examples and up to 50 interval samples per live feature, 33-token windows of real SmolLM2 tokens of
the bundled sample), a random TopK SAE of that width in SAELens format, and the real SmolLM2 for the output tokens.
The browser is built twice (first build: computes logits.parquet and neighbors.parquet; rebuild: reuses them) and
the index is opened in headless Chromium, which times itself (performance.now() written into the DOM).

Prints one JSON line:
  d_sae, examples, build_seconds         the first build, extras included
  neighbors_seconds, logits_seconds      its two extras (decoder cosine top-10, output tokens through the unembedding)
  rebuild_seconds                        a rebuild with the extras in place (pages, and removing the old browser)
  build_cpu_seconds, rebuild_cpu_seconds the CPU time of both (all threads): on a shared machine, what the work costs
  size_mb, files                         the browser directory
  index_open_ms                          navigation start to the table rendered, sorted and ready (the page's clock)
  index_sort_ms                          the slowest of sorting by each numeric column (click to rendered rows)
  index_search_ms                        a token search over all features
  index_open_sort_ms                     index_open_ms + index_sort_ms (goal < 3000)
  index_load_event_ms                    navigation start to the end of the load event (the page's clock)
  index_load_wall_ms                     a new tab, Page.navigate and the load event, as the test client sees it

    python benchmarks/browser.py [--dir /tmp] [--d-sae 65536] [--device auto] [--keep]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers.chromium import Chromium  # noqa: E402
from helpers.synthetic import write_synthetic_dataset  # noqa: E402
from pipeline.analysis import browser as browser_mod  # noqa: E402
from pipeline.analysis.browser import build_browser  # noqa: E402
from pipeline.analysis.analyze import EXAMPLES_SCHEMA, FEATURES_SCHEMA  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.config.sae import SAEConfig  # noqa: E402
from pipeline.extract.model import load_model  # noqa: E402
from pipeline.sae import make_sae  # noqa: E402
from pipeline.sae.export import export_saelens  # noqa: E402

TOP_K, INTERVALS, SAMPLES, BINS, WINDOW = 20, 10, 5, 40, 16
TOKENS = 10_000_000
ROW_GROUP = 1 << 17


def corpus_tokens(tokenizer, chars: int = 3_000_000) -> np.ndarray:
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(open(REPO / "data/pile-sample/pile-sample-00.jsonl.zst", "rb"))
    text = []
    for line in io.TextIOWrapper(raw, encoding="utf-8"):
        text.append(json.loads(line)["text"])
        if sum(map(len, text)) > chars:
            break
    return np.asarray(tokenizer("\n".join(text))["input_ids"], np.int32)


def lists(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))


def write_analysis(adir: Path, store: Path, sae_dir: Path, d_sae: int, corpus: np.ndarray, tokenizer, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    adir.mkdir(parents=True)
    log10 = rng.normal(-3.2, 0.8, d_sae).clip(-6.9, -0.3)
    count = np.round(10 ** log10 * TOKENS).astype(np.int64)
    count[rng.random(d_sae) < 0.05] = 0
    alive = count > 0
    density = count / TOKENS
    max_act = np.where(alive, rng.gamma(4, 1.5, d_sae), 0).astype(np.float32)
    mean_act = np.where(alive, max_act * rng.uniform(0.2, 0.5, d_sae), 0).astype(np.float32)
    shape = np.exp(-np.linspace(0, 4, BINS))
    hist = np.stack([rng.multinomial(int(c), shape / shape.sum()) for c in count])
    interval_counts = hist.reshape(d_sae, INTERVALS, BINS // INTERVALS).sum(2)
    edges = lambda n: (np.linspace(0, 1, n + 1)[None, :] * max_act[:, None]).astype(np.float32)  # noqa: E731
    top_ids = corpus[rng.integers(0, len(corpus), (d_sae, 5))]
    top_text = np.array(tokenizer.batch_decode([[int(i)] for i in top_ids.ravel()]), object).reshape(d_sae, 5)
    features = pa.table([
        pa.array(np.arange(d_sae, dtype=np.int32)), pa.array(count), pa.array(density),
        pa.array(np.where(alive, np.log10(np.maximum(density, 1e-300)), np.nan), mask=~alive),
        pa.array(mean_act), pa.array(max_act), pa.array(mean_act / np.log(count + 1.0 + ~alive)),  # 0 when dead: mean_act is 0 there
        lists(edges(BINS).ravel(), np.full(d_sae, BINS + 1), pa.float32()),
        lists(hist.ravel(), np.full(d_sae, BINS), pa.int64()),
        lists(edges(INTERVALS).ravel(), np.full(d_sae, INTERVALS + 1), pa.float32()),
        lists(interval_counts.ravel(), np.full(d_sae, INTERVALS), pa.int64()),
        lists(np.where(alive[:, None], top_ids, 0).ravel(), np.where(alive, 5, 0), pa.int32()),
        lists(top_text[alive].ravel(), np.where(alive, 5, 0), pa.string()),
    ], schema=FEATURES_SCHEMA)
    pq.write_table(features, adir / "features.parquet")

    # per live feature: min(count, 20) top examples, then up to 5 samples of each non-empty interval
    n_top = np.minimum(count, TOP_K)
    n_int = np.minimum(interval_counts, SAMPLES) * alive[:, None]
    n_ex = int(n_top.sum() + n_int.sum())
    feat = np.concatenate([np.repeat(np.arange(d_sae), n_top), np.repeat(np.repeat(np.arange(d_sae), INTERVALS),
                                                                         n_int.ravel())]).astype(np.int32)
    kind_top = np.arange(n_ex) < n_top.sum()
    interval = np.concatenate([np.full(int(n_top.sum()), -1), np.repeat(np.tile(np.arange(INTERVALS), d_sae),
                                                                        n_int.ravel())]).astype(np.int16)
    order = np.lexsort((interval, ~kind_top, feat))
    feat, kind_top, interval = feat[order], kind_top[order], interval[order]
    group_start = np.r_[0, np.flatnonzero((np.diff(feat) != 0) | (np.diff(interval) != 0)) + 1]
    rank = (np.arange(n_ex) - np.repeat(group_start, np.diff(np.r_[group_start, n_ex]))).astype(np.int16)
    width = 2 * WINDOW + 1
    start = rng.integers(0, len(corpus) - width, n_ex)
    activation = np.where(kind_top, max_act[feat] * (1 - rank / 40), max_act[feat] * (interval + 0.5) / INTERVALS)
    pos = np.full(n_ex, 40, np.int32)
    with pq.ParquetWriter(adir / "examples.parquet", EXAMPLES_SCHEMA) as writer:
        for a in range(0, n_ex, ROW_GROUP):
            z = min(n_ex, a + ROW_GROUP)
            m = z - a
            token_ids = corpus[start[a:z, None] + np.arange(width)]
            # about one token in twelve of a window also fires, weaker than the example's own token
            acts = np.where(rng.random((m, width)) < 0.08, rng.random((m, width)) * 0.6, 0) * max_act[feat[a:z], None]
            acts[:, WINDOW] = activation[a:z]
            writer.write_table(pa.table([
                pa.array(feat[a:z]), pa.array(np.where(kind_top[a:z], "top", "interval")), pa.array(interval[a:z]),
                pa.array(rank[a:z]), pa.array(start[a:z].astype(np.int64)), pa.array(activation[a:z].astype(np.float32)),
                pa.array([f"pile-sample-00.jsonl.zst:{s // 700}" for s in start[a:z]]), pa.array(["Pile-CC"] * m),
                pa.array(start[a:z] // 127), pa.array(pos[a:z]), pa.array(pos[a:z] - WINDOW),
                lists(token_ids.ravel(), np.full(m, width), pa.int32()),
                lists(acts.astype(np.float32).ravel(), np.full(m, width), pa.float32()),
            ], schema=EXAMPLES_SCHEMA))
    meta = {"format": "saepipe-analysis/1", "sae_dir": str(sae_dir), "store_root": str(store), "shards": [0],
            "tokens": TOKENS, "d_in": 576, "d_sae": d_sae, "top_k": TOP_K, "n_intervals": INTERVALS,
            "samples_per_interval": SAMPLES, "hist_bins": BINS, "window": WINDOW,
            "model": {"name": "smollm2", "revision": None, "dtype": "float32"}, "layer": 15, "hook": "resid_post",
            "seconds": 0.0}
    (adir / "analysis.json").write_text(json.dumps(meta, indent=2))
    return n_ex


def timed_extras():
    """Wrap the two extras so that the first build reports their times."""
    import pipeline.analysis.geometry as geometry
    import pipeline.analysis.unembed as unembed

    times = {}

    def wrap(module, name, key):
        inner = getattr(module, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            out = inner(*a, **kw)
            times[key] = time.perf_counter() - t
            return out
        setattr(module, name, timed)

    wrap(geometry, "decoder_neighbors", "neighbors_seconds")
    wrap(unembed, "output_token_effects", "logits_seconds")
    return times


def index_timings(index: Path) -> dict:
    with Chromium() as chromium:
        t = time.perf_counter()
        page = chromium.open(index.resolve().as_uri(), timeout=120)
        wall = (time.perf_counter() - t) * 1000
        problems = page.problems()
        ready = float(page.evaluate("document.body.dataset.readyMs"))
        loaded = float(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
        sorts = []
        for key in ("density", "count", "max_act", "mean_act", "selectivity", "density", "feature"):
            sorts.append(page.evaluate(
                "new Promise(done => { const t = performance.now();"
                f" document.querySelector('.thead [data-key={key}]').click();"
                " requestAnimationFrame(() => done(performance.now() - t)); })"))
        search = page.evaluate(
            "new Promise(done => { const s = document.getElementById('search'); const t = performance.now();"
            " s.value = 'the'; s.dispatchEvent(new Event('input'));"
            " requestAnimationFrame(() => done(performance.now() - t)); })")
        rows = page.evaluate("document.querySelectorAll('#rows .frow').length")
    return {"index_open_ms": round(ready, 1), "index_sort_ms": round(max(sorts), 1),
            "index_search_ms": round(search, 1), "index_open_sort_ms": round(ready + max(sorts), 1),
            "index_load_event_ms": round(loaded, 1), "index_load_wall_ms": round(wall, 1), "index_rows_in_dom": rows, "console_problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (a real disk, not /dev/shm)")
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--device", default="auto", help="device of the neighbour search and the model")
    ap.add_argument("--keep", action="store_true", help="keep the analysis dir and print its path")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="saepipe-bench-browser-", dir=args.dir))
    try:
        model = load_model(ModelConfig(device=args.device), show_progress=False)
        store = write_synthetic_dataset(work / "store", d=576, shards=1, rows_per_shard=64)
        model.tokenizer.save_pretrained(str(store / "tokenizer"))
        sae = make_sae(SAEConfig(arch="topk", d_in=576, d_sae=args.d_sae, k=64))
        sae_dir = export_saelens(sae, work / "sae")
        del sae
        n_ex = write_analysis(work / "analysis", store, sae_dir, args.d_sae, corpus_tokens(model.tokenizer),
                              model.tokenizer)

        times = timed_extras()
        t, cpu = time.perf_counter(), time.process_time()
        index = build_browser(work / "analysis", model=model, device=args.device, show_progress=False)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - cpu
        t, cpu = time.perf_counter(), time.process_time()
        index = build_browser(work / "analysis", device=args.device, show_progress=False)
        rebuild_s, rebuild_cpu = time.perf_counter() - t, time.process_time() - cpu
        files = [p for p in index.parent.rglob("*") if p.is_file()]
        result = {"d_sae": args.d_sae, "examples": n_ex, "build_seconds": round(build_s, 1),
                  "neighbors_seconds": round(times.get("neighbors_seconds", float("nan")), 1),
                  "logits_seconds": round(times.get("logits_seconds", float("nan")), 1),
                  "rebuild_seconds": round(rebuild_s, 1), "build_cpu_seconds": round(build_cpu, 1),
                  "rebuild_cpu_seconds": round(rebuild_cpu, 1),
                  "size_mb": round(sum(p.stat().st_size for p in files) / 1e6, 1), "files": len(files),
                  "chunk_features": browser_mod.CHUNK_FEATURES, **index_timings(index)}
        if args.keep:
            result["analysis_dir"] = str(work / "analysis")
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
