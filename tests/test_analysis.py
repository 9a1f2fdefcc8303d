"""`saepipe analyze`: the streaming statistics equal brute force over all rows (counts, max, mean, histograms, the exact
top-k with ties to the lower row), interval samples lie in their intervals, each example's window holds the store's
tokens with that feature's activation at each of them, and those tokens are what re-tokenising the source document
gives. Bad input is one line and exit 2, before any work."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from pipeline.analysis.analyze import run_analysis
from pipeline.analysis.feature_stats import GroupedSmallest, TopK
from pipeline.cli.main import main
from pipeline.eval.split import split_shards
from pipeline.sae import SAEConfig, export_saelens, load_saelens, make_sae
from pipeline.store import ActivationDataset

from conftest import REPO
from helpers.synthetic import write_synthetic_dataset

TIED = 4  # features 0..3 of the synthetic SAE read one input coordinate each: many exact ties among bf16 inputs


# ---- helpers ---------------------------------------------------------------------------------------------------------

def dense_codes(sae, ds: ActivationDataset, shards: list[int], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's dense code, encoded in the analysis's batches (the same matmuls, so the same float values), and the
    global row of each."""
    codes, rows = [], []
    with torch.no_grad():
        for shard in shards:
            acts = ds.read_acts(shard, torch.float32)
            for start in range(0, acts.shape[0], batch):
                codes.append(sae.encode(acts[start : start + batch]).numpy())
            rows.append(ds.shards[shard].row_offset + np.arange(acts.shape[0]))
    return np.concatenate(codes), np.concatenate(rows)


def brute_top(fired_rows: np.ndarray, fired_feats: np.ndarray, fired_vals: np.ndarray, d_sae: int,
              k: int) -> list[list[int]]:
    """Per feature the rows of its k largest activations, ties to the lower row, by sorting every firing."""
    order = np.lexsort((fired_rows, -fired_vals, fired_feats))
    feats, rows = fired_feats[order], fired_rows[order]
    bounds = np.searchsorted(feats, np.arange(d_sae + 1))
    return [rows[bounds[f] : min(bounds[f] + k, bounds[f + 1])].tolist() for f in range(d_sae)]


def check_against_brute_force(out: Path, z: np.ndarray, rows: np.ndarray, ds: ActivationDataset, *, top_k: int,
                              window: int, per_interval: int) -> None:
    features = pq.read_table(out / "features.parquet")
    ex = pq.read_table(out / "examples.parquet")
    col = {name: ex.column(name).to_numpy() for name in ("feature", "interval", "rank", "row", "activation", "pos",
                                                          "window_start", "context_id")}
    is_top = ex.column("kind").to_numpy(zero_copy_only=False) == "top"
    d_sae = z.shape[1]
    index_of = np.full(ds.num_rows, -1)
    index_of[rows] = np.arange(len(rows))
    assert features.column("feature").to_pylist() == list(range(d_sae))
    at, fired_feats = np.nonzero(z > 0)
    fired_vals, fired_rows = z[at, fired_feats], rows[at]
    count = features.column("count").to_numpy()
    np.testing.assert_array_equal(count, np.bincount(fired_feats, minlength=d_sae))
    np.testing.assert_array_equal(features.column("max_act").to_numpy(), z.max(0))
    mean = np.bincount(fired_feats, weights=fired_vals.astype(np.float64), minlength=d_sae) / np.maximum(count, 1)
    np.testing.assert_allclose(features.column("mean_act").to_numpy(), mean, rtol=1e-6)
    assert features.column("log10_density").null_count == (count == 0).sum()

    # the exact top-k, strongest first, ties to the lower row
    top = brute_top(fired_rows, fired_feats, fired_vals, d_sae, top_k)
    for f in range(d_sae):
        mine = is_top & (col["feature"] == f)
        assert col["row"][mine].tolist() == top[f], f"feature {f}"
        assert col["rank"][mine].tolist() == list(range(len(top[f])))
    # every example's activation is its row's
    np.testing.assert_array_equal(col["activation"], z[index_of[col["row"]], col["feature"]])

    # histograms and intervals over [0, max] with the stored edges, as np.histogram counts with them
    hist_edges, hist_counts = features.column("hist_edges").to_pylist(), features.column("hist_counts").to_pylist()
    int_edges = np.array(features.column("interval_edges").to_pylist(), np.float32)
    int_counts = np.array(features.column("interval_counts").to_pylist())
    by_feature = np.argsort(fired_feats, kind="stable")
    bounds = np.searchsorted(fired_feats[by_feature], np.arange(d_sae + 1))
    for f in np.flatnonzero(count):
        values = fired_vals[by_feature[bounds[f] : bounds[f + 1]]]
        assert hist_counts[f] == np.histogram(values, bins=np.array(hist_edges[f], np.float32))[0].tolist()
        assert int_counts[f].tolist() == np.histogram(values, bins=int_edges[f])[0].tolist()
    assert (np.array(hist_counts).sum(1) == count).all() and (int_counts.sum(1) == count).all()
    f, i, a = col["feature"][~is_top], col["interval"][~is_top], col["activation"][~is_top]
    last = i == int_edges.shape[1] - 2
    assert ((int_edges[f, i] <= a) & ((a < int_edges[f, i + 1]) | (last & (a == int_edges[f, -1])))).all()
    groups, sizes = np.unique(f * 1000 + i, return_counts=True)
    wanted = np.minimum(int_counts, per_interval)
    assert (wanted[groups // 1000, groups % 1000] == sizes).all() and sizes.sum() == wanted.sum()
    assert len(np.unique(np.stack([f, col["row"][~is_top]]), axis=1)[0]) == len(f)  # no token sampled twice
    check_windows(ex, col, z, index_of, ds, window)


def check_windows(ex, col: dict, z: np.ndarray, index_of: np.ndarray, ds: ActivationDataset, window: int) -> None:
    """Each window: the store's tokens at consecutive positions of the example's context, that feature's activation
    at each, the activating token at `pos`."""
    meta = ds.read_metadata(columns=["context_id", "pos", "token_id"])
    ctx, pos, tok = (meta.column(c).to_numpy() for c in ("context_id", "pos", "token_id"))
    tokens, acts = ex.column("token_ids").combine_chunks(), ex.column("acts").combine_chunks()
    lengths = tokens.value_lengths().to_numpy()
    assert (acts.value_lengths().to_numpy() == lengths).all()
    assert ((1 <= lengths) & (lengths <= 2 * window + 1)).all()
    offset_in = col["pos"] - col["window_start"]
    assert ((0 <= offset_in) & (offset_in < lengths)).all()
    first = col["row"] - offset_in
    starts = np.cumsum(lengths) - lengths
    at = np.repeat(first - starts, lengths) + np.arange(lengths.sum())  # the store row of every window token
    which = np.repeat(np.arange(len(lengths)), lengths)
    assert (ctx[at] == col["context_id"][which]).all()
    assert (pos[at] == np.repeat(col["window_start"] - starts, lengths) + np.arange(lengths.sum())).all()
    assert (tok[at] == tokens.values.to_numpy()).all()
    np.testing.assert_array_equal(acts.values.to_numpy(), z[index_of[at], col["feature"][which]])
    assert (acts.values.to_numpy()[starts + offset_in] == col["activation"]).all()


# ---- the streaming merge on its own ------------------------------------------------------------------------------------

def test_grouped_smallest_equals_brute_force_in_any_order_with_ties():
    gen = torch.Generator().manual_seed(0)
    n, groups, m = 3000, 7, 5
    group = torch.randint(groups, (n,), generator=gen)
    key = torch.randint(20, (n,), generator=gen)  # heavy ties on the key
    row = torch.randperm(n, generator=gen)  # offered out of row order: the tie fallback must run
    early, late = GroupedSmallest(groups, m), GroupedSmallest(groups, m)
    early._flush_at = 40  # merges whenever 40 candidates are pending; `late` only when flushed
    for i, chunk in enumerate(torch.arange(n).split(97)):
        for table in (early, late):
            table.offer(group[chunk], key[chunk], row[chunk], key[chunk].float())
        if i % 3 == 0:
            late.flush()
    for table in (early, late):
        table.flush()
        for g in range(groups):
            mine = group == g
            expected = sorted(zip(key[mine].tolist(), row[mine].tolist()))[:m]
            assert list(zip(table.key[g].tolist(), table.row[g].tolist())) == expected


def test_topk_orders_by_activation_then_lower_row():
    top = TopK(2, 3)
    top.update(torch.tensor([0, 0, 1, 0]), torch.tensor([1.0, 2.0, 0.5, 2.0]), torch.tensor([10, 11, 12, 13]))
    top.update(torch.tensor([0, 1]), torch.tensor([2.0, 0.25]), torch.tensor([14, 15]))
    top.flush()
    assert top.row[0].tolist() == [11, 13, 14] and top.value[0].tolist() == [2.0, 2.0, 2.0]
    assert top.row[1, :2].tolist() == [12, 15] and not bool(top.filled()[1, 2])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu_2023", "relu_2024"])
def test_encode_sparse_is_the_nonzero_part_of_encode(arch):
    sae = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=48, k=5, seed=3)).eval()
    if arch == "batchtopk":
        sae.threshold.fill_(0.3)
    with torch.no_grad():
        x = torch.randn(40, 16)
        z = sae.encode(x)
        rows, feats, vals = sae.encode_sparse(x)
    dense = torch.zeros_like(z)
    dense[rows, feats] = vals
    assert torch.equal(dense, z) and bool((vals > 0).all()) and bool((rows[1:] >= rows[:-1]).all())


# ---- a synthetic store and a ReLU SAE with tied activations -------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis-synthetic")
    store = write_synthetic_dataset(base / "acts", d=32, shards=5, rows_per_shard=512, row_group_rows=128)
    sae = make_sae(SAEConfig(arch="relu_2023", d_in=32, d_sae=24, seed=1))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparser
        for f in range(TIED):
            sae.W_enc[:, f] = 0
            sae.W_enc[f, f] = 2.0 ** f  # an exact product of a bf16 input: equal inputs, equal activations
            sae.b_enc[f] = 0
    sae_dir = export_saelens(sae, base / "sae")
    return base, store, sae_dir


def test_streaming_statistics_equal_brute_force_over_all_rows(synthetic, tmp_path):
    base, store, sae_dir = synthetic
    out = run_analysis(sae_dir, store=store, out=tmp_path / "analysis", shards=[3, 0, 1, 4, 2], batch_size=50,
                       top_k=8, n_intervals=4, samples_per_interval=3, hist_bins=7, window=3, show_progress=False)
    ds = ActivationDataset.open(store)
    sae = load_saelens(sae_dir)
    z, rows = dense_codes(sae, ds, [3, 0, 1, 4, 2], 50)
    check_against_brute_force(out, z, rows, ds, top_k=8, window=3, per_interval=3)
    # the tie-breaking was exercised: some tied feature shows equal activations in its top-k
    tops = pq.read_table(out / "examples.parquet", filters=[("kind", "=", "top")]).to_pylist()
    assert any(len({e["activation"] for e in tops if e["feature"] == f}) < len([e for e in tops if e["feature"] == f])
               for f in range(TIED))
    meta = json.loads((out / "analysis.json").read_text())
    assert meta["format"] == "saepipe-analysis/1" and meta["tokens"] == len(rows) and meta["shards"] == [3, 0, 1, 4, 2]
    assert {meta[k] for k in ("top_k", "n_intervals", "samples_per_interval", "hist_bins", "window")} == {8, 4, 3, 7}
    # the spill and every temp file are gone: only the analysis directory is left next to it
    assert [p.name for p in tmp_path.iterdir()] == ["analysis"]
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "examples.parquet", "features.parquet"]

    # The samples depend on the seed and the data, not on the batching: the exactly computed features agree.
    again = run_analysis(sae_dir, store=store, out=tmp_path / "again", shards=[3, 0, 1, 4, 2], batch_size=37,
                         top_k=8, n_intervals=4, samples_per_interval=3, hist_bins=7, window=3, show_progress=False)
    reseeded = run_analysis(sae_dir, store=store, out=tmp_path / "reseeded", shards=[3, 0, 1, 4, 2], batch_size=50,
                            top_k=8, n_intervals=4, samples_per_interval=3, hist_bins=7, window=3, seed=1,
                            show_progress=False)
    def sample(d: Path):
        t = pq.read_table(d / "examples.parquet").to_pylist()
        return [(e["feature"], e["interval"], e["row"]) for e in t if e["kind"] == "interval" and e["feature"] < TIED]
    assert sample(again) == sample(out) != sample(reseeded)


def test_duckdb_reads_the_analysis(synthetic, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    base, store, sae_dir = synthetic
    out = run_analysis(sae_dir, store=store, out=tmp_path / "a", shards=[1, 0], tokens=700, show_progress=False)
    con = duckdb.connect()
    n, live = con.execute(f"select count(*), count(*) filter (where count > 0) from '{out / 'features.parquet'}'").fetchone()
    assert n == 24 and live > 0
    rows = con.execute(f"""select f.feature, e.rank, len(e.token_ids) = len(e.acts) from '{out / 'features.parquet'}' f
                           join '{out / 'examples.parquet'}' e using (feature)
                           where e.kind = 'top' and e.rank = 0 order by f.selectivity desc limit 3""").fetchall()
    assert len(rows) == 3 and all(r[1] == 0 and r[2] for r in rows)
    meta = json.loads((out / "analysis.json").read_text())
    assert (meta["tokens"], meta["shards"], meta["rows_per_shard"]) == (700, [1, 0], [512, 188])  # the budget, in order


# ---- the real SmolLM2 SAE ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(smollm2_sae, tmp_path_factory):
    """The demo SAE analysed over every shard of its store (16k tokens), in small batches so the merges are many."""
    ds = ActivationDataset.open(smollm2_sae.store_root)
    shards = list(range(ds.num_shards))
    out = run_analysis(smollm2_sae.sae_dir, store=smollm2_sae.store_root, out=tmp_path_factory.mktemp("real") / "a",
                       shards=shards, batch_size=512, show_progress=False)
    return out, ds, shards


def test_real_sae_top_k_and_windows_equal_brute_force(real, smollm2_sae):
    out, ds, shards = real
    z, rows = dense_codes(load_saelens(smollm2_sae.sae_dir), ds, shards, 512)
    check_against_brute_force(out, z, rows, ds, top_k=20, window=16, per_interval=5)
    features = pq.read_table(out / "features.parquet")
    live = [r for r in features.to_pylist() if r["count"] > 0]
    assert live and all(r["top_tokens"] and len(r["top_tokens"]) == len(r["top_token_ids"]) <= 5 for r in live)
    tok = ds.tokenizer
    assert all(r["top_tokens"][0] == tok.decode([r["top_token_ids"][0]]) for r in live[:20])


def read_document(doc_id: str) -> str:
    """The text of a sample-corpus record by its doc id (`FILE:LINE`, the physical line, from 1)."""
    name, line = doc_id.rsplit(":", 1)
    with open(REPO / "data" / "pile-sample" / name, "rb") as fh:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for i, raw in enumerate(text, 1):
            if i == int(line):
                return json.loads(raw)["text"]
    raise AssertionError(f"{doc_id}: no such line")


def test_contexts_shown_equal_the_retokenised_source_document(real):
    out, ds, _ = real
    tok = ds.tokenizer
    features = pq.read_table(out / "features.parquet", columns=["feature", "selectivity", "count"]).to_pylist()
    chosen = [f["feature"] for f in sorted(features, key=lambda f: -f["selectivity"]) if f["count"] >= 5][:6]
    examples = pq.read_table(out / "examples.parquet", filters=[("feature", "in", chosen), ("rank", "<", 2)]).to_pylist()
    assert len(examples) >= 12
    contexts = {}
    for shard in range(ds.num_shards):
        t = ds.read_contexts(shard)
        contexts.update(zip(t.column("context_id").to_pylist(), t.column("doc_start").to_pylist()))
    whole = 0
    for e in examples:
        text = read_document(e["doc_id"])
        doc = tok(text, add_special_tokens=False)["input_ids"]
        # context position p holds the document's token doc_start + p - 1 (position 0 is BOS)
        first = contexts[e["context_id"]] + e["window_start"] - 1
        assert doc[first : first + len(e["token_ids"])] == e["token_ids"], e["doc_id"]
        shown = tok.decode(e["token_ids"])
        if "\ufffd" not in shown:  # a window cut inside a multi-byte character decodes with a replacement mark
            assert shown in text
            whole += 1
        assert ds.lookup(e["row"]).token == tok.decode([e["token_ids"][e["pos"] - e["window_start"]]])
    assert whole >= len(examples) // 2


def test_training_run_defaults_and_cli_summary(smollm2_sae, tmp_path, capsys):
    run = tmp_path / "run"  # a copy, so that this test's analysis does not land in the shared fixture's run dir
    run.mkdir()
    shutil.copy(smollm2_sae.run_dir / "config.yaml", run)
    shutil.copytree(smollm2_sae.sae_dir, run / "final")
    assert main(["analyze", str(run), "--tokens", "300", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 300 and summary["analysis_dir"] == str(run / "analysis")
    assert summary["most_selective"] and all(f["top_tokens"] for f in summary["most_selective"])
    meta = json.loads((run / "analysis" / "analysis.json").read_text())
    assert meta["shards"] == split_shards(ActivationDataset.open(smollm2_sae.store_root), 1).eval[:1]
    assert meta["model"]["name"] == "smollm2" and (meta["layer"], meta["hook"]) == (15, "resid_post")
    # the text summary: counts, the most selective features with their tokens, the path
    assert main(["analyze", str(run), "--tokens", "300", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "analysed 300 tokens" in text and "most selective" in text and str(run / "analysis") in text


def test_bare_saelens_dir_with_store(smollm2_sae, tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    shutil.copytree(smollm2_sae.sae_dir, sae_dir)
    out = tmp_path / "out"
    assert main(["analyze", str(sae_dir), "--store", str(smollm2_sae.store_root), "--out", str(out), "--tokens", "256",
                 "--top-k", "5", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 256
    assert pq.read_table(out / "examples.parquet", filters=[("kind", "=", "top")]).column("rank").to_numpy().max() == 4


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saepipe analyze: error: "), err
    return err


def test_bad_input_is_one_line(smollm2_sae, synthetic, tmp_path, capsys):
    store, sae, out = str(smollm2_sae.store_root), str(smollm2_sae.sae_dir), str(tmp_path / "o")
    _, _, small_sae = synthetic

    def error(*argv: str) -> str:
        return one_line_error(capsys, ["analyze", *argv])

    assert "no such directory" in error(str(tmp_path / "nope"), "--out", out)
    assert "neither a training run" in error(str(tmp_path), "--out", out)
    assert "--out" in error(sae, "--store", store)
    assert "d_in=32" in error(str(small_sae), "--store", store, "--out", out)
    assert "does not exist" in error(sae, "--store", str(tmp_path / "x"), "--out", out)
    assert "top_k" in error(sae, "--store", store, "--out", out, "--top-k", "0")
    assert "out of range" in error(sae, "--store", store, "--out", out, "--shards", "0,99")
    assert "not a list of shard" in error(sae, "--store", store, "--out", out, "--shards", "a-b")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert "refusing" in error(sae, "--store", store, "--out", str(tmp_path / "precious"))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    other_layer = tmp_path / "bad-sae"
    shutil.copytree(smollm2_sae.sae_dir, other_layer)
    cfg = json.loads((other_layer / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.3.hook_resid_post"
    (other_layer / "cfg.json").write_text(json.dumps(cfg))
    assert "blocks.3" in error(str(other_layer), "--store", store, "--out", out)
    assert not (tmp_path / "o").exists()
