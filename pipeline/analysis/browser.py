"""The static feature browser of an analysis directory: DIR/browser/index.html (all features in one sortable,
filterable table) and DIR/browser/features/<id>.html (one page per feature). It opens from disk with no server:
browsers refuse fetch() on file://, so the index's data is a script loaded by <script src> and each feature page is
plain HTML.

It also writes the two browser extras into DIR when they are missing or belong to another SAE: logits.parquet (the
output tokens each feature boosts and suppresses, through the model's final norm and unembedding) and
neighbors.parquet (nearest features by decoder cosine). A rebuild with both in place loads neither SAE nor model.

The browser is built under a temporary name next to its destination and swapped in whole (pipeline.io.atomic)."""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.errors import SaepipeError
from pipeline.io.atomic import fsync_dir, install_dir, remove_orphaned_tmps, tmp_path

from .browser_pages import ExampleBlock, FeatureInfo, TokenText, chips, feature_page, index_data_js, index_page, render_examples
from .figures import DENSE_THRESHOLD, density_histogram_png
from .labels.browser_data import write_label_scripts
from .labels.output import LABELS_PARQUET

log = logging.getLogger(__name__)

FORMAT = "saepipe-analysis/1"
NEIGHBORS = 10
OUTPUT_TOKENS = 10
CHUNK_FEATURES = 512  # features rendered together: bounds the per-token arrays to a few hundred MB at most
ASSETS = ("style.css", "index.js", "label.js")
_EXTRA_KEY = b"saepipe_extra"

FEATURE_COLUMNS = ("feature", "count", "density", "log10_density", "mean_act", "max_act", "selectivity", "hist_edges",
                   "hist_counts", "interval_edges", "interval_counts", "top_tokens")
EXAMPLE_COLUMNS = ("feature", "kind", "interval", "rank", "row", "activation", "doc_id", "subset", "context_id", "pos",
                   "window_start", "token_ids", "acts")


class AnalysisDirError(SaepipeError):
    """An analysis directory that the browser cannot read as one."""


def build_browser(analysis_dir: str | Path, *, model=None, out: str | Path | None = None, show_progress: bool = True,
                  device: str = "auto") -> Path:
    """Build (or rebuild) the browser of `analysis_dir` into `out` (default DIR/browser); returns its index.html.
    `model` (a LoadedModel) is only needed when logits.parquet must be computed; without it the store's model is
    loaded. `device` runs the neighbour search (and a model loaded here)."""
    adir = Path(analysis_dir)
    meta = read_analysis_json(adir)
    features = read_features(adir / "features.parquet")
    d_sae = features.num_rows
    if int(meta.get("d_sae", d_sae)) != d_sae:
        raise AnalysisDirError(f"{adir / 'features.parquet'}: {d_sae} rows, but analysis.json says d_sae={meta['d_sae']}")
    examples = open_examples(adir / "examples.parquet")
    dataset = _open_store(meta, adir)
    text = TokenText(dataset.tokenizer)
    out = Path(out) if out is not None else adir / "browser"

    started = time.perf_counter()
    logits, neighbors = browser_extras(adir, meta, d_sae, text, dataset, model=model, device=device,
                                       show_progress=show_progress)
    extras_s = time.perf_counter() - started

    out.parent.mkdir(parents=True, exist_ok=True)
    for left in remove_orphaned_tmps(out):  # a killed build's half tree: GBs at 65,536 features
        log.info("removed %s, left by a build that was killed", left)
    tmp = tmp_path(out)
    try:
        tmp.mkdir()
        _write_browser(tmp, adir, meta, features, examples, text, logits, neighbors, show_progress=show_progress)
        pages_s = time.perf_counter() - started - extras_s
        sync_tree(tmp)
        synced = time.perf_counter()
        install_dir(tmp, out)  # removes the old browser, if any, once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = time.perf_counter()
    log.info("browser of %d features in %s: %.1f s (extras %.1f s, pages %.1f s, sync %.1f s, swap %.1f s)", d_sae,
             out, done - started, extras_s, pages_s, synced - started - extras_s - pages_s, done - synced)
    return out / "index.html"


# ---- reading the analysis directory ---------------------------------------------------------------------------

def read_analysis_json(adir: Path) -> dict:
    path = adir / "analysis.json"
    if not adir.is_dir():
        raise AnalysisDirError(f"{adir}: no such directory (expected an analysis dir written by `saepipe analyze`)")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalysisDirError(f"{path}: missing; run `saepipe analyze` first") from None
    except (OSError, ValueError) as err:
        raise AnalysisDirError(f"{path}: unreadable: {' '.join(str(err).split())}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AnalysisDirError(f"{path}: format {got!r} is not {FORMAT!r}")
    for key in ("store_root", "tokens", "d_sae"):
        if key not in meta:
            raise AnalysisDirError(f"{path}: missing key {key!r}")
    return meta


def _parquet(path: Path, columns) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise AnalysisDirError(f"{path}: missing; run `saepipe analyze` again") from None
    except (OSError, pa.ArrowException) as err:
        raise AnalysisDirError(f"{path}: unreadable: {' '.join(str(err).split())}") from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise AnalysisDirError(f"{path}: missing column(s) {', '.join(missing)}")
    return pf


def read_features(path: Path) -> pa.Table:
    table = _parquet(path, FEATURE_COLUMNS).read(columns=list(FEATURE_COLUMNS)).combine_chunks()
    table = table.sort_by("feature")
    ids = table.column("feature").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise AnalysisDirError(f"{path}: the feature column is not 0..d_sae-1, one row each")
    return table


def open_examples(path: Path) -> pq.ParquetFile:
    return _parquet(path, EXAMPLE_COLUMNS)


def _open_store(meta: dict, adir: Path):
    from pipeline.store import ActivationDataset

    root = Path(meta["store_root"])
    if not root.is_dir():
        raise AnalysisDirError(f"{adir / 'analysis.json'}: its store {root} does not exist (the tokenizer that "
                               "decodes the examples lives there)")
    return ActivationDataset.open(root)


def example_chunks(pf: pq.ParquetFile, d_sae: int, chunk: int = CHUNK_FEATURES):
    """(lo, hi, ExampleBlock of features lo..hi-1), covering 0..d_sae. A file written in feature order (row groups
    with increasing feature ranges, as `saepipe analyze` writes it) streams row group by row group; any other order
    is read whole and sorted."""
    groups = pf.metadata.num_row_groups
    col = pf.schema_arrow.names.index("feature")
    stats = [pf.metadata.row_group(g).column(col).statistics for g in range(groups)]
    in_order = all(s is not None and s.has_min_max for s in stats) and all(
        stats[g].max <= stats[g + 1].min for g in range(groups - 1))
    if not in_order:
        table = pf.read(columns=list(EXAMPLE_COLUMNS))
        yield from _split(table, 0, d_sae, chunk)
        return
    lo, pending = 0, []
    for g in range(groups):
        pending.append(pf.read_row_group(g, columns=list(EXAMPLE_COLUMNS)))
        complete = int(stats[g + 1].min) if g + 1 < groups else d_sae  # every feature below is whole now
        if complete - lo >= chunk or g + 1 == groups:
            table = pa.concat_tables(pending)
            feats = table.column("feature")
            done = pc.less(feats, complete)
            yield from _split(table.filter(done), lo, complete, chunk)
            pending, lo = [table.filter(pc.invert(done))], complete
    if lo < d_sae:
        yield from _split(pa.concat_tables(pending) if pending else None, lo, d_sae, chunk)


def _split(table: pa.Table | None, lo: int, hi: int, chunk: int):
    block = _block(table)
    bounds = np.searchsorted(block.feature, np.arange(lo, hi + 1))
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        yield a, b, _slice(block, int(bounds[a - lo]), int(bounds[b - lo]))


def _block(table: pa.Table | None) -> ExampleBlock:
    if table is None or table.num_rows == 0:
        empty = np.zeros(0, np.int64)
        return ExampleBlock(empty.astype(np.int32), empty.astype(bool), empty.astype(np.int16), empty.astype(np.int16),
                            empty, empty.astype(np.float32), [], [], empty, empty.astype(np.int32),
                            empty.astype(np.int32), np.zeros(1, np.int64), empty.astype(np.int32),
                            empty.astype(np.float32))
    table = table.combine_chunks()
    feature = table.column("feature").to_numpy()
    is_top = pc.equal(table.column("kind"), "top").to_numpy(zero_copy_only=False)
    interval = table.column("interval").to_numpy()
    rank = table.column("rank").to_numpy()
    order = np.lexsort((rank, interval, ~is_top, feature))
    table = table.take(order)
    token_ids, acts = table.column("token_ids").combine_chunks(), table.column("acts").combine_chunks()
    lengths = pc.list_value_length(token_ids).to_numpy(zero_copy_only=False)
    if token_ids.null_count or not np.array_equal(lengths, pc.list_value_length(acts).to_numpy(zero_copy_only=False)):
        raise AnalysisDirError("examples.parquet: token_ids and acts differ in length (or are null) for some example")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ExampleBlock(
        feature=feature[order], is_top=is_top[order], interval=interval[order], rank=rank[order],
        row=table.column("row").to_numpy(), activation=table.column("activation").to_numpy(),
        doc_id=table.column("doc_id").to_pylist(), subset=table.column("subset").to_pylist(),
        context_id=table.column("context_id").to_numpy(), pos=table.column("pos").to_numpy(),
        window_start=table.column("window_start").to_numpy(), offsets=offsets,
        ids=token_ids.flatten().to_numpy().astype(np.int32, copy=False),
        acts=acts.flatten().to_numpy().astype(np.float32, copy=False))


def _slice(b: ExampleBlock, a: int, z: int) -> ExampleBlock:
    t0, t1 = int(b.offsets[a]), int(b.offsets[z])
    return ExampleBlock(b.feature[a:z], b.is_top[a:z], b.interval[a:z], b.rank[a:z], b.row[a:z], b.activation[a:z],
                        b.doc_id[a:z], b.subset[a:z], b.context_id[a:z], b.pos[a:z], b.window_start[a:z],
                        b.offsets[a:z + 1] - t0, b.ids[t0:t1], b.acts[t0:t1])


# ---- browser extras: output tokens and decoder neighbours ---------------------------------------------------------

def sae_fingerprint(sae_dir: Path) -> dict | None:
    """Names, sizes and modification times of the SAE's files: extras computed from other weights are stale."""
    from pipeline.sae.export import LEGACY_WEIGHTS_FILE, SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE

    files = [sae_dir / n for n in (SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE)]
    found = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}
    return {"sae_dir": str(sae_dir.resolve()), "files": found} if len(found) >= 2 else None


def _read_extra(path: Path, fingerprint: dict | None, d_sae: int, settings: dict) -> pa.Table | None:
    """The extra at `path` if it was computed from this SAE with these settings, else None."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        return None
    recorded = json.loads((pf.schema_arrow.metadata or {}).get(_EXTRA_KEY, b"null"))
    if not isinstance(recorded, dict) or recorded.get("settings") != settings or pf.metadata.num_rows != d_sae:
        return None
    # an analysis dir copied without its SAE keeps extras it can no longer check
    if fingerprint is not None and recorded.get("sae") != fingerprint:
        return None
    return pf.read()


def _write_extra(path: Path, table: pa.Table, fingerprint: dict, settings: dict) -> None:
    table = table.replace_schema_metadata({_EXTRA_KEY: json.dumps({"sae": fingerprint, "settings": settings})})
    tmp = tmp_path(path)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def browser_extras(adir: Path, meta: dict, d_sae: int, text: TokenText, dataset, *, model=None, device="auto",
                   show_progress: bool = True) -> tuple[pa.Table, pa.Table]:
    """(logits, neighbors) tables, read from DIR when current, else computed and written there."""
    sae_dir = Path(meta.get("sae_dir") or "")
    fingerprint = sae_fingerprint(sae_dir) if meta.get("sae_dir") else None
    logit_settings, neighbor_settings = {"top": OUTPUT_TOKENS}, {"k": NEIGHBORS}
    logits = _read_extra(adir / "logits.parquet", fingerprint, d_sae, logit_settings)
    neighbors = _read_extra(adir / "neighbors.parquet", fingerprint, d_sae, neighbor_settings)
    if logits is not None and neighbors is not None:
        return logits, neighbors
    if fingerprint is None:
        raise AnalysisDirError(f"{adir / 'analysis.json'}: sae_dir {str(sae_dir)!r} holds no SAELens-format SAE, which "
                               "logits.parquet and neighbors.parquet are computed from")
    import torch

    from pipeline.extract.model import resolve_device
    from pipeline.sae import load_saelens

    sae = load_saelens(sae_dir)
    if sae.cfg.d_sae != d_sae:
        raise AnalysisDirError(f"{sae_dir}: the SAE has d_sae={sae.cfg.d_sae}, but the analysis has {d_sae} features")
    dev = resolve_device(device)
    if neighbors is None:
        from .geometry import decoder_neighbors

        ids, cos = decoder_neighbors(sae.W_dec, k=NEIGHBORS, device=dev, show_progress=show_progress)
        neighbors = pa.table({
            "feature": pa.array(np.arange(d_sae, dtype=np.int32)),
            "neighbor_ids": _lists(ids, pa.int32()),
            "cosines": _lists(cos, pa.float32())})
        _write_extra(adir / "neighbors.parquet", neighbors, fingerprint, neighbor_settings)
    if logits is None:
        from .unembed import output_token_effects

        if model is None:
            from pipeline.extract.model import load_model

            model = load_model(model_config(meta, dataset, device), show_progress=show_progress)
        if model.model.config.hidden_size != sae.cfg.d_in:
            raise AnalysisDirError(f"{sae_dir}: the SAE takes d_in={sae.cfg.d_in}, but the model's hidden size is "
                                   f"{model.model.config.hidden_size}")
        with torch.no_grad():
            effects = output_token_effects(sae, model, top=OUTPUT_TOKENS)
        cols = {"feature": pa.array(np.arange(d_sae, dtype=np.int32))}
        for side in ("boost", "suppress"):
            ids = effects[f"{side}_ids"].numpy().astype(np.int32)
            cols[f"{side}_ids"] = _lists(ids, pa.int32())
            cols[f"{side}_tokens"] = _lists(np.array(text.strings(ids.ravel()), object).reshape(ids.shape), pa.string())
            cols[f"{side}_values"] = _lists(effects[f"{side}_values"].numpy().astype(np.float32), pa.float32())
        logits = pa.table(cols)
        _write_extra(adir / "logits.parquet", logits, fingerprint, logit_settings)
    return logits, neighbors


def _lists(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32)) if rows else pa.array([0], pa.int32())
    values = pa.array(matrix.ravel().tolist() if matrix.dtype == object else matrix.ravel(), value_type)
    return pa.ListArray.from_arrays(offsets, values)


def model_config(meta: dict, dataset, device: str):
    """The model to unembed through: analysis.json's `model` when it is a model config, else the store's model."""
    from pydantic import ValidationError

    from pipeline.config import ModelConfig
    from pipeline.extract.model import SMOLLM2
    from pipeline.extract.preflight import model_source

    raw = meta.get("model")
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        fields = {k: raw[k] for k in ("name", "revision", "dtype", "cache_dir") if raw.get(k) is not None}
        if fields["name"] == model_source(SMOLLM2):
            fields["name"] = SMOLLM2
        try:
            return ModelConfig(**fields, device=device)
        except ValidationError as err:
            raise AnalysisDirError(f"analysis.json: model {raw!r}: {' '.join(str(err).split())}") from None
    from .spliced_eval import store_model_config

    return store_model_config(dataset, device)


# ---- writing --------------------------------------------------------------------------------------------------

def read_labels(adir: Path) -> pa.Table | None:
    """labels.parquet of `saepipe label`, when the analysis has one (the browser shows it)."""
    path = adir / LABELS_PARQUET
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        log.warning("%s: unreadable, the browser shows no labels: %s", path, " ".join(str(err).split()))
        return None


def _write_browser(root: Path, adir: Path, meta: dict, features: pa.Table, examples: pq.ParquetFile,
                   text: TokenText, logits: pa.Table, neighbors: pa.Table, *, show_progress: bool) -> None:
    d_sae = features.num_rows
    col = {name: features.column(name) for name in FEATURE_COLUMNS}
    count = col["count"].to_numpy()
    density = col["density"].to_numpy()
    log10 = col["log10_density"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
    max_act = col["max_act"].to_numpy().astype(np.float32)
    mean_act = col["mean_act"].to_numpy().astype(np.float32)
    selectivity = col["selectivity"].to_numpy()
    top_tokens = col["top_tokens"].to_pylist()
    dead = int((count == 0).sum())
    dense = int((density > DENSE_THRESHOLD).sum())
    # a training run's directory names it better than its export's ("final")
    title = f"saepipe features · {Path(str(meta.get('run_dir') or meta.get('sae_dir') or 'SAE')).name}"

    for name in ASSETS:
        (root / name).write_bytes(resources.files("pipeline.analysis").joinpath("browser_assets", name).read_bytes())
    (root / "density.png").write_bytes(density_histogram_png(log10, dead=dead, total=d_sae))
    (root / "index-data.js").write_text(index_data_js(count=count, density=density, max_act=max_act,
                                                      mean_act=mean_act, selectivity=selectivity,
                                                      top_tokens=[t or [] for t in top_tokens]), encoding="utf-8")
    (root / "index.html").write_text(index_page(meta=meta, d_sae=d_sae, dead=dead, dense=dense, title=title),
                                     encoding="utf-8")
    write_label_scripts(root, read_labels(adir), d_sae=d_sae)

    pages = root / "features"
    pages.mkdir()
    tokens = int(meta["tokens"])
    top_chips = [chips(t or []) for t in top_tokens]
    neighbor_ids = _list_matrix(neighbors.column("neighbor_ids"), np.int64)
    neighbor_cos = _list_matrix(neighbors.column("cosines"), np.float64)
    ragged = {name: Ragged(col[name]) for name in ("hist_edges", "hist_counts", "interval_edges", "interval_counts")}
    sides = {side: (logits.column(f"{side}_tokens").to_pylist(), _list_matrix(logits.column(f"{side}_values"), np.float64))
             for side in ("boost", "suppress")}
    with tqdm(total=d_sae, desc="feature pages", unit="page", disable=not show_progress) as bar:
        for lo, hi, block in example_chunks(examples, d_sae):
            html_of = render_examples(block, text, max_act)
            bounds = np.searchsorted(block.feature, np.arange(lo, hi + 1))
            for f in range(lo, hi):
                a, z = int(bounds[f - lo]), int(bounds[f - lo + 1])
                top_html, by_interval = [], {}
                for e in range(a, z):
                    if block.is_top[e]:
                        top_html.append(html_of[e])
                    else:
                        by_interval.setdefault(int(block.interval[e]), []).append(html_of[e])
                info = FeatureInfo(
                    feature=f, count=int(count[f]), density=float(density[f]),
                    log10_density=None if math.isnan(log10[f]) else float(log10[f]),
                    mean_act=float(mean_act[f]), max_act=float(max_act[f]), selectivity=float(selectivity[f]),
                    hist_edges=ragged["hist_edges"].row(f), hist_counts=ragged["hist_counts"].row(f),
                    interval_edges=ragged["interval_edges"].row(f), interval_counts=ragged["interval_counts"].row(f),
                    top_tokens=top_tokens[f] or [],
                    boosts=list(zip(sides["boost"][0][f], sides["boost"][1][f].tolist())),
                    suppresses=list(zip(sides["suppress"][0][f], sides["suppress"][1][f].tolist())),
                    neighbors=[(int(j), float(c), top_chips[j]) for j, c in zip(neighbor_ids[f], neighbor_cos[f])])
                page = feature_page(info, d_sae=d_sae, tokens=tokens, top_html=top_html, interval_html=by_interval,
                                    page_title=title)
                (pages / f"{f}.html").write_bytes(page.encode("utf-8"))
            bar.update(hi - lo)


class Ragged:
    """A list column as flat values and offsets: row access without a pyarrow scalar per call."""

    def __init__(self, column: pa.ChunkedArray):
        arr = column.combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        self.offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.values = arr.flatten().to_numpy(zero_copy_only=False)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def _list_matrix(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """A list column whose lists all have one length, as a [rows, width] matrix."""
    arr = column.combine_chunks()
    rows = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return values.reshape(rows, -1) if rows else values.reshape(0, 0)


def sync_tree(root: Path) -> None:
    """Make every file under `root` durable before it is swapped in: one syncfs(2) for the file system, where
    fsyncing 65,536 pages one by one would take tens of seconds."""
    fd = os.open(root, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is not None and libc.syncfs(fd) == 0:
            return
    except OSError:
        pass
    finally:
        os.close(fd)
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*(p for p in root.rglob("*") if p.is_dir()), root]:
        fsync_dir(path)
