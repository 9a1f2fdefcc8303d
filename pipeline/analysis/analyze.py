"""`saepipe analyze`: one streaming pass of held-out store rows through an SAE, and the per-feature results the browser,
the report and the sweep read (the analysis directory; its layout is described in the module's ANALYSIS_FORMAT).

The pass. Shards are read one ahead in a thread and encoded batch by batch on the device; each batch updates the
running count / sum / max and the exact top-k of every feature, and its sparse codes are spilled to disk (spill.py).
After the pass, when every feature's max is known, the spill is read back twice, a shard at a time: once for the
equal-width histograms and the interval samples, once for the examples' windows (each with that feature's activation
at every token). Memory is O(d_sae * K) plus one shard; nothing grows with the number of tokens but the temp spill.

DIR/analysis.json     what was analysed, with which settings
DIR/features.parquet  one row per feature (all d_sae, dead ones included)
DIR/examples.parquet  the top-k and interval examples, ordered by feature, then top before interval, then rank
"""
from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import ConfigError, StoreError
from pipeline.io.atomic import atomic_replace_dir, json_bytes, remove_orphaned_tmps, tmp_path

from .feature_stats import Binned, IntervalSampler, RunningStats, TopK
from .source import SaeSource, open_sae_source
from .spill import Spill
from .windows import build_windows

log = logging.getLogger(__name__)

ANALYSIS_FORMAT = "saepipe-analysis/1"
ANALYSIS_JSON, FEATURES_PARQUET, EXAMPLES_PARQUET = "analysis.json", "features.parquet", "examples.parquet"
DENSE_DENSITY = 0.1  # a feature firing on more than this share of tokens counts as dense (as in training's eval)
TOP_TOKENS = 5
# Examples held in memory at once while examples.parquet is assembled (one feature bucket's worth).
BUCKET_EXAMPLES = 1 << 18
CPU_PRE_ACT_FLOATS = 1 << 26

FEATURES_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("count", pa.int64()), ("density", pa.float64()), ("log10_density", pa.float64()),
    ("mean_act", pa.float32()), ("max_act", pa.float32()), ("selectivity", pa.float64()),
    ("hist_edges", pa.list_(pa.float32())), ("hist_counts", pa.list_(pa.int64())),
    ("interval_edges", pa.list_(pa.float32())), ("interval_counts", pa.list_(pa.int64())),
    ("top_token_ids", pa.list_(pa.int32())), ("top_tokens", pa.list_(pa.string())),
])
EXAMPLES_SCHEMA = pa.schema([
    ("feature", pa.int32()), ("kind", pa.string()), ("interval", pa.int16()), ("rank", pa.int16()), ("row", pa.int64()),
    ("activation", pa.float32()), ("doc_id", pa.string()), ("subset", pa.string()), ("context_id", pa.int64()),
    ("pos", pa.int32()), ("window_start", pa.int32()), ("token_ids", pa.list_(pa.int32())), ("acts", pa.list_(pa.float32())),
])
_BUCKET_SCHEMA = pa.schema([("example", pa.int64()), *EXAMPLES_SCHEMA])


def run_analysis(run: str | Path, *, store: str | Path | None = None, out: str | Path | None = None,
                 tokens: int | None = None, top_k: int = 20, n_intervals: int = 10, samples_per_interval: int = 5,
                 hist_bins: int = 40, window: int = 16, batch_size: int = 4096, device: str = "auto",
                 show_progress: bool = True, shards: Sequence[int] | None = None, seed: int = 0) -> Path:
    """Analyse the SAE of `run` on its held-out shards (or `shards`, or the first `tokens` rows of them, shard by
    shard); writes the analysis directory `out` (default RUN/analysis for a training run) and returns it."""
    started = time.perf_counter()
    _check_options(tokens=tokens, top_k=top_k, n_intervals=n_intervals, samples_per_interval=samples_per_interval,
                   hist_bins=hist_bins, window=window, batch_size=batch_size)
    dev = _device(device)
    src = open_sae_source(run, store, shards=shards)
    out_dir = _out_dir(src, out)
    plan = _plan(src, tokens)
    work = tmp_path(out_dir.parent / f"{out_dir.name}-work")
    for left in (out_dir, out_dir.parent / f"{out_dir.name}-work"):  # what a killed run left behind: its spill can be GBs
        for path in remove_orphaned_tmps(left):
            log.info("removed %s, left by a run that was killed", path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    spill = Spill(work / "spill")
    phases: dict[str, float] = {}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 3)
        clock[0] = now

    try:
        sae = src.sae.to(dev).eval()
        batch = encode_batch_size(batch_size, sae.cfg.d_sae, dev)
        stats, top = _encode_pass(sae, src, plan, spill, top_k, batch, dev, show_progress)
        phase("encode_pass")
        n_tokens = sum(take for _, take in plan)
        max_act = stats.max.cpu().numpy()
        with one_thread(torch.device("cpu")):
            hist, sampler = _bin_pass(src, plan, spill, max_act, hist_bins, n_intervals, samples_per_interval, seed)
        phase("bin_pass")
        examples = _examples(top, sampler, n_intervals)
        top_ids, buckets = _window_pass(src, plan, spill, examples, top_k, top_k + n_intervals * samples_per_interval,
                                        window, work)
        spill.remove()
        phase("window_pass")
        features = _features_table(stats, n_tokens, hist, sampler, top_ids, src)
        phase("features")
        dead = int((stats.count == 0).sum())
        dense = int((stats.count.double() / max(n_tokens, 1) > DENSE_DENSITY).sum())
        meta = _meta(src, plan, n_tokens, top_k, n_intervals, samples_per_interval, hist_bins, window, seed,
                     dead=dead, dense=dense, examples=len(examples["feature"]))

        def fill(tmp: Path) -> None:
            pq.write_table(features, tmp / FEATURES_PARQUET, compression="zstd")
            _write_examples(tmp / EXAMPLES_PARQUET, buckets)
            phase("write")
            meta["seconds"] = round(time.perf_counter() - started, 3)
            meta["phase_seconds"] = phases
            (tmp / ANALYSIS_JSON).write_bytes(json_bytes(meta))

        atomic_replace_dir(out_dir, fill)
    finally:
        spill.remove()
        shutil.rmtree(work, ignore_errors=True)
    log.info("analysis of %s: %d tokens, %d features (%d dead, %d dense) in %.1f s -> %s", src.sae_dir, n_tokens,
             sae.cfg.d_sae, dead, dense, time.perf_counter() - started, out_dir)
    return out_dir


# ---- checks and planning -------------------------------------------------------------------------------------------

def _check_options(**options) -> None:
    minimum = {"tokens": 1, "top_k": 1, "n_intervals": 1, "samples_per_interval": 0, "hist_bins": 1, "window": 0,
               "batch_size": 1}
    for name, value in options.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum[name]:
            raise ConfigError(f"{name}: {value!r} (need an integer >= {minimum[name]})")
    if options["top_k"] > 10_000 or options["window"] > 1_000:
        raise ConfigError("top_k is at most 10000 and window at most 1000 here")


def encode_batch_size(batch_size: int, d_sae: int, dev: torch.device) -> int:
    """Rows per encode batch. On CPU the dense [batch, d_sae] pre-activation is kept within CPU_PRE_ACT_FLOATS: at
    d_sae 65,536 on 2 cores, 4,096-row batches (1 GiB of pre-activation) encoded 3x slower than 1,024-row ones."""
    if dev.type == "cpu":
        return max(1, min(batch_size, CPU_PRE_ACT_FLOATS // d_sae))
    return batch_size


@contextmanager
def one_thread(dev: torch.device):
    """One torch thread on CPU for the bookkeeping between encodes: its many small ops each pay OpenMP's fork/join,
    which on a busy 2-core machine made them 10-100x slower than on one thread (the GEMMs keep all threads)."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r}, but CUDA is not available here")
    return dev


def _out_dir(src: SaeSource, out: str | Path | None) -> Path:
    if out is None:
        if src.run_dir is None:
            raise ConfigError(f"{src.sae_dir} is a bare SAELens dir: pass --out for the analysis directory")
        out_dir = src.run_dir / "analysis"
    else:
        out_dir = Path(out)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / ANALYSIS_JSON).is_file():
            raise ConfigError(f"--out {out_dir}: a non-empty directory that is no analysis ({ANALYSIS_JSON}); "
                              "refusing to replace it")
    for precious in (src.sae_dir, src.store_root, src.run_dir):
        if precious is not None and out_dir.resolve() == Path(precious).resolve():
            raise ConfigError(f"--out {out_dir}: is the SAE, run or store directory itself")
    return out_dir


def _plan(src: SaeSource, tokens: int | None) -> list[tuple[int, int]]:
    """(shard, rows taken from its start) in order, up to the token budget."""
    plan, left = [], tokens
    for shard in src.held_out_shards:
        rows = src.dataset.shards[shard].rows
        take = rows if left is None else min(rows, left)
        if take:
            plan.append((shard, take))
        if left is not None:
            left -= take
            if left == 0:
                break
    if tokens is not None and left:
        log.warning("--tokens %d: the shards to analyse hold only %d rows; analysing all of them", tokens, tokens - left)
    return plan


# ---- the encode pass -----------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode_pass(sae, src: SaeSource, plan, spill: Spill, top_k: int, batch_size: int, dev: torch.device,
                 show_progress: bool):
    from tqdm import tqdm

    d_sae = sae.cfg.d_sae
    stats, top = RunningStats(d_sae, dev), TopK(d_sae, top_k, dev)
    dataset = src.dataset

    def read(item):
        shard, take = item
        return dataset.read_acts(shard, torch.bfloat16)[:take]

    total = sum(take for _, take in plan)
    with ThreadPoolExecutor(1) as pool, tqdm(total=total, unit="tok", unit_scale=True, desc="analyze",
                                              disable=not show_progress, delay=1.0) as bar:
        ahead = pool.submit(read, plan[0])
        for i, (shard, take) in enumerate(plan):
            acts = ahead.result()
            if i + 1 < len(plan):
                ahead = pool.submit(read, plan[i + 1])  # the next shard decodes while this one encodes
            first_row = dataset.shards[shard].row_offset
            for start in range(0, take, batch_size):
                x = acts[start : start + batch_size].to(dev, torch.float32)
                with one_thread(dev):
                    if not bool(torch.isfinite(x).all()):
                        raise StoreError(f"{dataset.shards[shard].acts_path}: non-finite activations in rows "
                                         f"{start}..{start + x.shape[0] - 1}")
                rows, feats, vals = sae.encode_sparse(x)
                with one_thread(dev):
                    stats.update(feats, vals)
                    top.update(feats, vals, rows + (first_row + start))
                    spill.append(shard, (rows + start).cpu().numpy(), feats.cpu().numpy(), vals.float().cpu().numpy())
                bar.update(x.shape[0])
    spill.close_file()
    with one_thread(dev):
        top.flush()
    return stats, top


# ---- after the pass: bins and samples, then windows ----------------------------------------------------------------

def _bin_pass(src: SaeSource, plan, spill: Spill, max_act: np.ndarray, hist_bins: int, n_intervals: int,
              per_interval: int, seed: int) -> tuple[Binned, IntervalSampler]:
    hist = Binned(max_act, hist_bins)
    sampler = IntervalSampler(max_act, n_intervals, per_interval, seed)
    for shard, _ in plan:
        first_row = src.dataset.shards[shard].row_offset
        for codes in spill.chunks(shard):
            feats, vals = codes["feature"], codes["value"]
            hist.add(feats, vals)
            sampler.add(feats, vals, codes["row"].astype(np.int64) + first_row)
    if sampler.table is not None:
        sampler.table.flush()
    return hist, sampler


def _examples(top: TopK, sampler: IntervalSampler, n_intervals: int) -> dict[str, np.ndarray]:
    """Every example to show, in the order of examples.parquet (feature; top first, by rank; then interval by
    interval, each sample strongest first)."""
    d_sae, k = top.row.shape
    t_filled = top.filled().cpu().numpy()
    t_feat = np.repeat(np.arange(d_sae), k).reshape(d_sae, k)[t_filled]
    t_rank = np.tile(np.arange(k), d_sae).reshape(d_sae, k)[t_filled]
    t_row = top.row.cpu().numpy()[t_filled]
    t_act = top.value.cpu().numpy()[t_filled]

    s_group = s_row = np.empty(0, np.int64)
    s_act = np.empty(0, np.float32)
    table = sampler.table
    if table is not None:
        groups, m = table.row.shape
        s_filled = table.filled().numpy()
        s_group = np.repeat(np.arange(groups), m).reshape(groups, m)[s_filled]
        s_row = table.row.numpy()[s_filled]
        s_act = table.value.numpy()[s_filled]
    # within an interval: strongest first, ties to the lower row
    order = np.lexsort((s_row, -s_act, s_group))
    s_group, s_row, s_act = s_group[order], s_row[order], s_act[order]
    _, first, counts = np.unique(s_group, return_index=True, return_counts=True)
    s_rank = np.arange(len(s_group)) - np.repeat(first, counts)

    ex = {
        "feature": np.concatenate([t_feat, s_group // n_intervals]).astype(np.int64),
        "kind": np.concatenate([np.zeros(len(t_feat), np.int8), np.ones(len(s_group), np.int8)]),
        "interval": np.concatenate([np.full(len(t_feat), -1), s_group % n_intervals]).astype(np.int64),
        "rank": np.concatenate([t_rank, s_rank]).astype(np.int64),
        "row": np.concatenate([t_row, s_row]).astype(np.int64),
        "activation": np.concatenate([t_act, s_act]).astype(np.float32),
    }
    order = np.lexsort((ex["rank"], ex["interval"], ex["kind"], ex["feature"]))
    return {name: a[order] for name, a in ex.items()}


def _window_pass(src: SaeSource, plan, spill: Spill, ex: dict[str, np.ndarray], top_k: int, per_feature: int,
                 window: int, work: Path) -> tuple[np.ndarray, list[Path]]:
    """Windows of all examples, shard by shard, appended to per-feature-bucket Arrow files; also the token at each
    top example ([d_sae, top_k], -1 where a feature has fewer). Examples are indexed in their final order, so a
    bucket (a range of features) is a contiguous run of them."""
    dataset = src.dataset
    d_sae = src.sae.cfg.d_sae
    bucket_features = max(1, BUCKET_EXAMPLES // per_feature)
    bucket_of = ex["feature"] // bucket_features
    paths = [work / f"examples-{b:05d}.arrow" for b in range(-(-d_sae // bucket_features))]
    writers: dict[int, pa.RecordBatchStreamWriter] = {}
    top_ids = np.full((d_sae, top_k), -1, np.int32)
    by_row = np.argsort(ex["row"], kind="stable")
    sorted_rows = ex["row"][by_row]
    try:
        for shard, take in plan:
            first_row = dataset.shards[shard].row_offset
            a, b = np.searchsorted(sorted_rows, [first_row, first_row + take])
            if a == b:
                continue
            meta = _ShardMeta(dataset, shard, take)
            codes = spill.read(shard)
            codes = codes[np.lexsort((codes["row"], codes["feature"]))]
            in_shard = np.sort(by_row[a:b])  # example ids, so by feature
            for start in range(0, len(in_shard), BUCKET_EXAMPLES):
                ids = in_shard[start : start + BUCKET_EXAMPLES]
                batch = _example_batch(ids, ex, meta, codes, first_row, window, top_ids)
                buckets = bucket_of[ids]
                edges = np.flatnonzero(np.diff(buckets)) + 1
                for lo, hi in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(ids)]])):
                    bk = int(buckets[lo])
                    if bk not in writers:
                        writers[bk] = pa.ipc.new_stream(str(paths[bk]), _BUCKET_SCHEMA)
                    writers[bk].write_batch(batch.slice(lo, hi - lo))
    finally:
        for w in writers.values():
            w.close()
    return top_ids, [paths[b] for b in sorted(writers)]


class _ShardMeta:
    """The per-row metadata of the analysed rows of one shard, as numpy arrays (strings as dictionary codes)."""

    def __init__(self, dataset, shard: int, take: int):
        table = dataset.read_metadata(shard, ["context_id", "pos", "token_id", "doc_id", "subset"]).slice(0, take)
        self.context_id = table.column("context_id").to_numpy()
        self.pos = table.column("pos").to_numpy()
        self.token_id = table.column("token_id").to_numpy()
        self.strings = {name: table.column(name).combine_chunks() for name in ("doc_id", "subset")}

    def string_column(self, name: str, rows: np.ndarray) -> pa.Array:
        column = self.strings[name]
        return column.dictionary.take(pa.array(column.indices.to_numpy()[rows]))


def _example_batch(ids: np.ndarray, ex: dict[str, np.ndarray], meta: _ShardMeta, codes: np.ndarray, first_row: int,
                   window: int, top_ids: np.ndarray) -> pa.RecordBatch:
    local = ex["row"][ids] - first_row
    feats = ex["feature"][ids]
    # this chunk's features are a contiguous range: only their codes can fall in its windows
    lo, hi = np.searchsorted(codes["feature"], [feats[0], feats[-1] + 1])
    win = build_windows(meta.context_id, meta.pos, meta.token_id, feats, local, window, codes[lo:hi])
    is_top = ex["kind"][ids] == 0
    top_ids[feats[is_top], ex["rank"][ids][is_top]] = meta.token_id[local[is_top]]
    offsets = pa.array(win.offsets.astype(np.int32))
    return pa.record_batch([
        pa.array(ids.astype(np.int64)),
        pa.array(feats.astype(np.int32)),
        pa.DictionaryArray.from_arrays(pa.array(ex["kind"][ids]), pa.array(["top", "interval"])).cast(pa.string()),
        pa.array(ex["interval"][ids].astype(np.int16)),
        pa.array(ex["rank"][ids].astype(np.int16)),
        pa.array(ex["row"][ids]),
        pa.array(ex["activation"][ids]),
        meta.string_column("doc_id", local),
        meta.string_column("subset", local),
        pa.array(meta.context_id[local].astype(np.int64)),
        pa.array(meta.pos[local].astype(np.int32)),
        pa.array(meta.pos[win.start].astype(np.int32)),
        pa.ListArray.from_arrays(offsets, pa.array(win.token_ids)),
        pa.ListArray.from_arrays(offsets, pa.array(win.acts)),
    ], schema=_BUCKET_SCHEMA)


def _write_examples(path: Path, buckets: list[Path]) -> None:
    # Dictionaries only on the string columns: on the token and activation lists they cost a third of the write
    # time and make the file larger.
    with pq.ParquetWriter(path, EXAMPLES_SCHEMA, compression="zstd", use_dictionary=["kind", "doc_id", "subset"],
                          write_statistics=["feature", "kind", "interval", "rank", "row", "activation"]) as writer:
        for bucket in buckets:
            with pa.ipc.open_stream(str(bucket)) as reader:
                table = reader.read_all()
            table = table.sort_by("example").drop_columns(["example"])
            writer.write_table(table, row_group_size=1 << 16)
            bucket.unlink()


# ---- results -------------------------------------------------------------------------------------------------------

def _features_table(stats: RunningStats, n_tokens: int, hist: Binned, sampler: IntervalSampler, top_ids: np.ndarray,
                    src: SaeSource) -> pa.Table:
    count = stats.count.cpu().numpy()
    d_sae = len(count)
    total = stats.sum.cpu().numpy()
    live = count > 0
    density = count / max(n_tokens, 1)
    mean_act = np.where(live, total / np.maximum(count, 1), 0.0)
    selectivity = np.divide(mean_act, np.log(count + 1.0), out=np.zeros(d_sae), where=live)
    log10 = np.full(d_sae, np.nan)
    log10[live] = np.log10(density[live])
    owner, flat_ids = most_common_tokens(top_ids, TOP_TOKENS)
    decode = _token_decoder(src, set(np.unique(flat_ids).tolist()))
    common_offsets = np.searchsorted(owner, np.arange(d_sae + 1)).astype(np.int32)
    return pa.Table.from_arrays([
        pa.array(np.arange(d_sae, dtype=np.int32)),
        pa.array(count.astype(np.int64)),
        pa.array(density.astype(np.float64)),
        pa.array(log10, mask=~live),
        pa.array(mean_act.astype(np.float32)),
        pa.array(stats.max.cpu().numpy().astype(np.float32)),
        pa.array(selectivity.astype(np.float64)),
        _fixed_lists(hist.edges, pa.float32()),
        _fixed_lists(hist.counts, pa.int64()),
        _fixed_lists(sampler.edges, pa.float32()),
        _fixed_lists(sampler.counts, pa.int64()),
        pa.ListArray.from_arrays(pa.array(common_offsets), pa.array(flat_ids, pa.int32())),
        pa.ListArray.from_arrays(pa.array(common_offsets), pa.array([decode(t) for t in flat_ids.tolist()], pa.string())),
    ], schema=FEATURES_SCHEMA)


def _fixed_lists(matrix: np.ndarray, type_: pa.DataType) -> pa.Array:
    n, width = matrix.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).ravel(), type_))


def most_common_tokens(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `ids` ([rows, k], -1 = none) up to n distinct ids, most frequent first, ties to the one seen first
    (the stronger example); as (row, id) pairs ordered by row."""
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    rank = np.tile(np.arange(ids.shape[1]), ids.shape[0])
    flat = ids.ravel().astype(np.int64)
    keep = flat >= 0
    rows, rank, flat = rows[keep], rank[keep], flat[keep]
    _, first, counts = np.unique(rows * (int(flat.max(initial=0)) + 1) + flat, return_index=True, return_counts=True)
    pair_rows, pair_ids, pair_rank = rows[first], flat[first], rank[first]
    order = np.lexsort((pair_rank, -counts, pair_rows))
    pair_rows, pair_ids = pair_rows[order], pair_ids[order]
    starts = np.searchsorted(pair_rows, pair_rows)  # first pair of the same row
    chosen = np.arange(len(pair_rows)) - starts < n
    return pair_rows[chosen], pair_ids[chosen].astype(np.int32)


def _token_decoder(src: SaeSource, ids: set[int]):
    """id -> text, for the ids given; a store without its tokenizer gets placeholders (and a warning)."""
    try:
        tok = src.dataset.tokenizer
    except StoreError as err:
        log.warning("top tokens shown as ids: %s", err)
        return lambda t: f"<{t}>"
    ordered = sorted(ids)
    texts = dict(zip(ordered, tok.batch_decode([[t] for t in ordered]))) if ordered else {}
    return texts.__getitem__


def _meta(src: SaeSource, plan, n_tokens: int, top_k: int, n_intervals: int, samples_per_interval: int,
          hist_bins: int, window: int, seed: int, **counts) -> dict:
    meta = src.dataset.meta
    return {
        "format": ANALYSIS_FORMAT,
        "sae_dir": str(Path(src.sae_dir).resolve()),
        "store_root": str(Path(src.store_root).resolve()),
        "run_dir": str(Path(src.run_dir).resolve()) if src.run_dir is not None else None,
        "shards": [shard for shard, _ in plan],
        "rows_per_shard": [take for _, take in plan],
        "tokens": n_tokens,
        "d_in": src.sae.cfg.d_in,
        "d_sae": src.sae.cfg.d_sae,
        "arch": src.sae.arch,
        "top_k": top_k,
        "n_intervals": n_intervals,
        "samples_per_interval": samples_per_interval,
        "hist_bins": hist_bins,
        "window": window,
        "seed": seed,
        "dense_density": DENSE_DENSITY,
        **counts,
        "model": {"name": _model_name(meta.model), "revision": meta.revision, "dtype": meta.compute_dtype},
        "layer": meta.layer,
        "hook": meta.hook,
        "ctx_len": meta.ctx_len,
        "exclude_first": meta.exclude_first,
        "seconds": None,
    }


def _model_name(source: str) -> str:
    """The ModelConfig name of the model the store records by its source (the bundled GGUF has a short name)."""
    from pipeline.extract.preflight import SMOLLM2, model_source

    return SMOLLM2 if source == model_source(SMOLLM2) else source
