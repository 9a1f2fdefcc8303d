"""The static feature browser, built from a real analysis (run_analysis on the smollm2_sae fixture) and the real model,
rendered by a real headless Chromium: no console errors, non-blank screenshots, the table rows, sorting and search
of the index, and feature pages whose contexts are the examples' tokens. Decoder neighbours against brute force.
The Chromium tests are integration tests: skipped without chromium locally, a failure under CI=true."""
from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.analysis.browser import AnalysisDirError, build_browser
from pipeline.analysis.browser_pages import TokenText, display_text, render_examples
from pipeline.analysis.geometry import decoder_neighbors
from pipeline.cli.main import main
from pipeline.errors import SaepipeError
from pipeline.sae import load_saelens
from pipeline.store import ActivationDataset

from conftest import running_under_ci
from helpers.chromium import Chromium, find_chromium

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


# ---- decoder geometry -------------------------------------------------------------------------------------------

def test_decoder_neighbors_equal_brute_force_across_blocks():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(203, 12, generator=gen)
    w[5] = 3.0 * w[17]            # same direction, other norm: cosine 1
    w[40] = 0.0                   # an untrained row: cosine 0 with everything
    ids, cos = decoder_neighbors(w, k=7, block=16)  # 13 blocks, the last one partial
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    full = unit @ unit.T
    full.fill_diagonal_(-2.0)
    want = full.topk(7, dim=1)
    assert ids.shape == (203, 7) and ids.dtype == np.int32 and cos.dtype == np.float32
    np.testing.assert_allclose(cos, want.values.numpy(), atol=1e-5)
    assert (ids != np.arange(203)[:, None]).all()  # never itself
    assert ids[5, 0] == 17 and ids[17, 0] == 5 and cos[5, 0] == pytest.approx(1.0, abs=1e-5)
    # ids agree wherever the cosines are not tied
    gap = np.diff(want.values.numpy(), axis=1)
    clear = np.ones_like(ids, bool)
    clear[:, 1:] &= np.abs(gap) > 1e-5
    clear[:, :-1] &= np.abs(gap) > 1e-5
    assert (ids[clear] == want.indices.numpy()[clear]).all()
    np.testing.assert_allclose(cos[40], 0.0, atol=1e-6)


# ---- the real browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(smollm2_sae, smollm2, tmp_path_factory):
    from pipeline.analysis.analyze import run_analysis

    adir = run_analysis(smollm2_sae.run_dir, out=tmp_path_factory.mktemp("browser") / "analysis", show_progress=False)
    index = build_browser(adir, model=smollm2, show_progress=False)
    features = pq.read_table(adir / "features.parquet").sort_by("feature")
    examples = pq.read_table(adir / "examples.parquet")
    tokenizer = ActivationDataset.open(smollm2_sae.store_root).tokenizer
    return adir, index, features, examples, tokenizer


@pytest.fixture(scope="module")
def chromium():
    if find_chromium() is None:
        if running_under_ci():
            pytest.fail("chromium is missing under CI")
        pytest.skip("no chromium (apt-get install chromium)")
    with Chromium() as browser:
        yield browser


def non_blank(path: Path) -> tuple[float, int]:
    """(pixel standard deviation, number of strongly coloured pixels) of a screenshot."""
    import matplotlib.image

    img = matplotlib.image.imread(str(path))[..., :3]
    return float(img.std()), int(((img.max(axis=2) - img.min(axis=2)) > 0.25).sum())


def open_clean(chromium, path: Path, tmp_path: Path, name: str):
    page = chromium.open(path.resolve().as_uri())
    shot = page.screenshot(tmp_path / f"{name}.png")
    assert page.problems() == [], f"{path.name}: console errors"
    return page, shot


def test_browser_files_and_extras(built, smollm2_sae, smollm2):
    adir, index, features, _, tokenizer = built
    d_sae = features.num_rows
    root = index.parent
    assert index == adir / "browser" / "index.html"
    assert sorted(int(p.stem) for p in (root / "features").glob("*.html")) == list(range(d_sae))
    assert not [p for p in adir.iterdir() if p.name.startswith(".tmp-")]  # the temp build was swapped in
    sae = load_saelens(smollm2_sae.sae_dir)
    neighbors = pq.read_table(adir / "neighbors.parquet")
    want_ids, want_cos = decoder_neighbors(sae.W_dec, k=10)
    np.testing.assert_allclose(np.stack(neighbors.column("cosines").to_numpy(zero_copy_only=False)), want_cos, atol=1e-5)
    logits = pq.read_table(adir / "logits.parquet")
    assert logits.column("feature").to_pylist() == list(range(d_sae))
    f = 7
    boost = logits.column("boost_ids")[f].as_py()
    assert logits.column("boost_tokens")[f].as_py() == [tokenizer.decode([i]) for i in boost]
    values = logits.column("boost_values")[f].as_py()
    suppress = logits.column("suppress_values")[f].as_py()
    assert values == sorted(values, reverse=True) and suppress == sorted(suppress) and values[-1] > suppress[-1]
    # the direct path by hand: decoder row · final norm gain · unembedding
    w_u = smollm2.model.get_output_embeddings().weight.detach().float()
    direct = (sae.W_dec[f].float() * smollm2.model.model.norm.weight.float()) @ w_u.T
    assert direct.argmax().item() == boost[0]


def test_rebuild_through_the_cli_reuses_the_extras(built, capsys):
    adir, index, _, _, _ = built
    stamps = {n: (adir / n).stat().st_mtime_ns for n in ("logits.parquet", "neighbors.parquet")}
    page = index.parent / "features" / "0.html"
    page.write_text("stale")
    # the half-built tree of a build killed earlier (its writer's pid is gone) is removed by the next build
    import os
    import subprocess
    import sys

    from pipeline.io.atomic import tmp_path

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    orphan = Path(str(tmp_path(index.parent)).replace(f"~{os.getpid()}~", f"~{dead}~"))
    (orphan / "features").mkdir(parents=True)
    assert main(["browse", str(adir), "--open-path"]) == 0
    assert not orphan.exists()
    assert capsys.readouterr().out.strip() == index.resolve().as_uri()
    assert page.read_text() != "stale"  # rebuilt, without recomputing what the SAE has not changed
    assert {n: (adir / n).stat().st_mtime_ns for n in stamps} == stamps


def test_bad_analysis_dirs_fail_in_one_line(tmp_path, built, capsys):
    assert main(["browse", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saepipe browse: error:") and "no such directory" in err and "\n" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "analysis.json").write_text(json.dumps({"format": "saepipe-analysis/0"}))
    with pytest.raises(AnalysisDirError, match="format 'saepipe-analysis/0'"):
        build_browser(bad)
    adir = built[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(adir / "analysis.json", copy)
    shutil.copy(adir / "features.parquet", copy)
    with pytest.raises(SaepipeError, match="examples.parquet: missing"):
        build_browser(copy)


def test_split_characters_and_markup_render_as_the_decoded_text(built):
    """Byte-level tokens holding parts of one UTF-8 character show that character once, not U+FFFD per piece."""
    import html as html_lib
    import re

    from pipeline.analysis.browser import _block

    tokenizer = built[4]
    text = "naïve “quoted” ภาษาไทย 𠮷野家 🦩 <b>&amp;\n\tend"
    ids = tokenizer.encode(text, add_special_tokens=False)
    tt = TokenText(tokenizer)
    tt.ensure(np.asarray(ids))
    assert tt.partial[ids].any()  # the sample does exercise split characters
    n = len(ids)
    table = pa.table({"feature": pa.array([0], pa.int32()), "kind": ["top"], "interval": pa.array([-1], pa.int16()),
                      "rank": pa.array([0], pa.int16()), "row": [5], "activation": pa.array([2.0], pa.float32()),
                      "doc_id": ["d"], "subset": ["s"], "context_id": [1], "pos": pa.array([3], pa.int32()),
                      "window_start": pa.array([1], pa.int32()), "token_ids": pa.array([ids], pa.list_(pa.int32())),
                      "acts": pa.array([[float(i % 3) for i in range(n)]], pa.list_(pa.float32()))})
    (out,) = render_examples(_block(table), tt, np.array([2.0], np.float32))
    toks = re.search(r"<p class=toks>(.*)</p></div>$", out).group(1)
    assert html_lib.unescape(re.sub(r"<[^>]+>", "", toks)) == display_text(text)
    assert "<b>&" not in toks and "\ufffd" not in toks
    assert re.search(r"<b class=a10 title=[^>]*>", toks)  # position 3 - window_start 1: the activating token


@pytest.mark.integration
def test_index_renders_sorts_and_searches_in_chromium(built, chromium, tmp_path):
    adir, index, features, _, _ = built
    page, shot = open_clean(chromium, index, tmp_path, "index")
    spread, coloured = non_blank(shot)
    assert spread > 0.05 and coloured > 2000, (spread, coloured)  # text, table and the blue density histogram
    count = features.column("count").to_numpy()
    tops = features.column("top_tokens").to_pylist()
    cards = page.evaluate("[...document.querySelectorAll('.card b')].map(e => e.textContent)")
    assert cards[:3] == [f"{len(count):,}", f"{int((count > 0).sum()):,}", f"{int((count == 0).sum()):,}"]
    rows_js = ("[...document.querySelectorAll('#rows .frow')].filter(r => r.style.display !== 'none')"
               ".map(r => [+r.dataset.feature, r.querySelector('a').textContent,"
               " [...r.querySelectorAll('.chip')].map(c => c.textContent)])")
    rows = page.evaluate(rows_js)
    assert 20 <= len(rows) < 200  # only the rows in view (and a margin) are in the DOM
    assert [r[0] for r in rows] == list(range(len(rows)))
    for fid, label, chips in rows:
        assert label == str(fid) and chips == [display_text(t) for t in tops[fid] or []]

    page.evaluate("document.querySelector('.thead [data-key=max_act]').click()")
    max_act = features.column("max_act").to_numpy()
    want = np.lexsort((np.arange(len(max_act)), -max_act))[:5]
    assert [r[0] for r in page.evaluate(rows_js)[:5]] == want.tolist()
    assert "sort=max_act" in page.evaluate("location.hash")

    token = next(t for t in (tops[i] or [] for i in np.argsort(-count)) for t in t if len(t.strip()) >= 3).strip()
    page.evaluate(f"(() => {{ const s = document.getElementById('search'); s.value = {json.dumps(token)};"
                  " s.dispatchEvent(new Event('input')); })()")
    found = page.evaluate(rows_js)
    want_ids = [i for i, t in enumerate(tops) if any(token.lower() in display_text(x).lower() for x in t or [])]
    assert found and all(any(token.lower() in c.lower() for c in chips) for _, _, chips in found)
    by_max = sorted(want_ids, key=lambda i: (-max_act[i], i))  # the sort chosen above still holds
    assert [r[0] for r in found] == by_max[:len(found)]
    assert page.evaluate("document.getElementById('shown').textContent").startswith(f"{len(want_ids):,} of")
    page.evaluate("(() => { const s = document.getElementById('search'); s.value = '#17';"
                  " s.dispatchEvent(new Event('input')); })()")
    assert 17 in [r[0] for r in page.evaluate(rows_js)]
    assert page.problems() == []


@pytest.mark.integration
def test_feature_pages_show_contexts_outputs_and_neighbours_in_chromium(built, chromium, tmp_path):
    adir, index, features, examples, tokenizer = built
    count = features.column("count").to_numpy()
    f = int(np.argmax(count))
    page, shot = open_clean(chromium, index.parent / "features" / f"{f}.html", tmp_path, f"feature-{f}")
    spread, coloured = non_blank(shot)
    assert spread > 0.05 and coloured > 1000, (spread, coloured)  # the orange shading and histogram

    mine = examples.filter(pa.compute.equal(examples.column("feature"), f))
    top = sorted((r for r in mine.to_pylist() if r["kind"] == "top"), key=lambda r: r["rank"])
    assert len(top) >= 20
    shown = page.evaluate("[...document.querySelectorAll('#top .ex')].map(e => [e.querySelector('.toks').textContent,"
                          " e.querySelector('.doc').textContent, e.querySelector('.toks b').textContent,"
                          " +e.dataset.row])")
    assert len(shown) == len(top) >= 20
    for (text, doc, hit, row), ex in zip(shown, top):
        assert row == ex["row"] and doc == ex["doc_id"]
        assert text == display_text(tokenizer.decode(ex["token_ids"]))
        assert hit == display_text(tokenizer.decode([ex["token_ids"][ex["pos"] - ex["window_start"]]]))
    intervals = page.evaluate("[...document.querySelectorAll('.interval')].map(e => [+e.dataset.interval,"
                              " e.querySelectorAll('.ex').length, e.querySelector('h3').textContent])")
    n_samples = {}
    for r in mine.to_pylist():
        if r["kind"] == "interval":
            n_samples[r["interval"]] = n_samples.get(r["interval"], 0) + 1
    interval_counts = features.column("interval_counts")[f].as_py()
    assert [i for i, _, _ in intervals] == list(range(len(interval_counts)))[::-1]
    for i, n, head in intervals:
        assert n == n_samples.get(i, 0)
        assert f"share {interval_counts[i] / count[f]:.2%}" in head
    assert page.evaluate("document.querySelectorAll('#histogram svg rect').length") > 0

    boosts = page.evaluate("[...document.querySelectorAll('#logits tr')].slice(1)"
                           ".map(r => r.querySelector('.chip').textContent)")
    logits = pq.read_table(adir / "logits.parquet")
    assert boosts == [display_text(t) for t in logits.column("boost_tokens")[f].as_py()]
    links = page.evaluate("[...document.querySelectorAll('#neighbors a')].map(a => a.href)")
    neighbours = pq.read_table(adir / "neighbors.parquet").column("neighbor_ids")[f].as_py()
    assert [int(Path(urllib.parse.urlparse(u).path).stem) for u in links] == neighbours
    assert all(Path(urllib.parse.unquote(urllib.parse.urlparse(u).path)).is_file() for u in links)

    dead = int(np.flatnonzero(count == 0)[0])
    dead_page, _ = open_clean(chromium, index.parent / "features" / f"{dead}.html", tmp_path, "dead")
    assert "is dead" in dead_page.evaluate("document.getElementById('dead').textContent")
    assert dead_page.evaluate("document.querySelectorAll('.ex').length") == 0


@pytest.mark.integration
def test_untrusted_tokens_are_escaped_in_chromium(built, chromium, tmp_path):
    """A document whose text is markup, and a top token that is markup, show as text and run nothing."""
    adir, _, features, examples, tokenizer = built
    copy = tmp_path / "analysis"
    shutil.copytree(adir, copy, ignore=shutil.ignore_patterns("browser"))
    f = int(np.argmax(features.column("count").to_numpy()))
    hostile_ids = tokenizer.encode(HOSTILE, add_special_tokens=False)
    rows = examples.to_pylist()
    first = next(i for i, r in enumerate(rows) if r["feature"] == f and r["kind"] == "top" and r["rank"] == 0)
    rows[first] = {**rows[first], "token_ids": hostile_ids, "acts": [1.0] * len(hostile_ids), "window_start":
                   rows[first]["pos"], "doc_id": '<b id="doc">x</b>'}
    pq.write_table(pa.Table.from_pylist(rows, schema=examples.schema), copy / "examples.parquet")
    table = pq.read_table(adir / "features.parquet")
    tops = table.column("top_tokens").to_pylist()
    tops[0] = [HOSTILE]
    table = table.set_column(table.schema.get_field_index("top_tokens"), "top_tokens",
                             pa.array(tops, table.schema.field("top_tokens").type))
    pq.write_table(table, copy / "features.parquet")
    index = build_browser(copy, show_progress=False)  # the extras are reused: same SAE, no model needed

    page, _ = open_clean(chromium, index.parent / "features" / f"{f}.html", tmp_path, "hostile-feature")
    assert page.evaluate("window.__pwned === undefined && document.querySelectorAll('.toks img, .toks script,"
                         " #doc').length === 0")
    assert page.evaluate("document.querySelector('#top .ex .toks').textContent") == display_text(HOSTILE)
    assert page.evaluate("document.querySelector('#top .ex .doc').textContent") == '<b id="doc">x</b>'
    page, _ = open_clean(chromium, index, tmp_path, "hostile-index")
    assert page.evaluate("window.__pwned === undefined && document.querySelectorAll('#rows img').length === 0")
    assert page.evaluate("document.querySelector('#rows .frow .chip').textContent") == HOSTILE
