"""HTML of the feature browser: the index page and its data file, and one page per feature.

Everything that comes from the data (tokens, document ids, subsets) is escaped here, once per token id or per
string: tokens are untrusted text. Pages are assembled from pieces with str.join, and the per-token work is numpy
fancy indexing into a table of escaped token texts, so that 65,536 pages of ~70 contexts each take minutes, not
hours."""
from __future__ import annotations

import base64
import functools
import html
import json
import math
from dataclasses import dataclass

import numpy as np

from .figures import DENSE_THRESHOLD, activation_histogram_svg
from .labels.browser_data import LABEL_BLOCK

SHADES = 10  # activation shading levels: CSS classes a1..a10
# Control characters are drawn as their Unicode "control picture" (U+2400 block); a newline as ↵, as SAEDashboard
# does, so that a context stays on one line.
_VISIBLE = {0x0A: "↵", 0x0D: "", 0x09: "\t"}
_VISIBLE.update({c: chr(0x2400 + c) for c in range(0x20) if c not in _VISIBLE})
_VISIBLE[0x7F] = "␡"
_VISIBLE_TABLE = str.maketrans(_VISIBLE)


def display_text(text: str) -> str:
    """What a token's text looks like on a page (before HTML escaping)."""
    return text.translate(_VISIBLE_TABLE)


def esc(text) -> str:
    return html.escape(display_text(str(text)), quote=True)


class TokenText:
    """Display text of token ids, decoded through the store's tokenizer once per id and kept escaped for HTML.

    A byte-level BPE token can hold part of a multi-byte UTF-8 character; decoded alone it shows U+FFFD. Such ids are
    flagged `partial`, and a window decodes each run of them jointly (see `window_pieces`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self._known = np.zeros(self.size, bool)
        self.partial = np.zeros(self.size, bool)
        self.raw = np.empty(self.size, object)
        self.html = np.empty(self.size, object)

    def ensure(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = int(ids[(ids < 0) | (ids >= self.size)][0])
            raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary of {self.size}")
        missing = np.unique(ids[~self._known[ids]]) if ids.size else ids
        if not missing.size:
            return
        texts = self.tokenizer.batch_decode([[int(i)] for i in missing], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        self.raw[missing] = texts
        self.html[missing] = [esc(t) for t in texts]
        self.partial[missing] = ["\ufffd" in t for t in texts]
        self._known[missing] = True

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def strings(self, ids: np.ndarray) -> list[str]:
        self.ensure(ids)
        return self.raw[np.asarray(ids)].tolist()


# ---- feature pages --------------------------------------------------------------------------------------------

@dataclass
class ExampleBlock:
    """Examples of a range of features, sorted by (feature, top before interval, interval, rank), as flat arrays:
    example e's window is ids[offsets[e]:offsets[e+1]] with activations acts[...]."""
    feature: np.ndarray      # int32 [E]
    is_top: np.ndarray       # bool [E]
    interval: np.ndarray     # int16 [E]
    rank: np.ndarray         # int16 [E]
    row: np.ndarray          # int64 [E]
    activation: np.ndarray   # float32 [E]
    doc_id: list
    subset: list
    context_id: np.ndarray   # int64 [E]
    pos: np.ndarray          # int32 [E]
    window_start: np.ndarray  # int32 [E]
    offsets: np.ndarray      # int64 [E + 1]
    ids: np.ndarray          # int32 [T]
    acts: np.ndarray         # float32 [T]


def render_examples(block: ExampleBlock, text: TokenText, max_act: np.ndarray) -> list[str]:
    """One HTML string per example: its source line and its window, each firing token shaded by its activation
    relative to the feature's max (`max_act`, indexed by feature id) with the value on hover, the activating token
    in <b> (outlined), the other firing tokens in <i>."""
    n = len(block.feature)
    if n == 0:
        return []
    text.ensure(block.ids)
    pieces = text.html[block.ids]  # object array of escaped token texts
    lengths = np.diff(block.offsets)
    scale = np.repeat(np.maximum(max_act[block.feature].astype(np.float64), 1e-30), lengths)
    acts = block.acts.astype(np.float64)
    level = np.clip(np.ceil(acts / scale * SHADES), 0, SHADES).astype(np.int64)
    hit_in_window = (block.pos - block.window_start).astype(np.int64)
    hit = np.zeros(len(block.ids), bool)
    inside = (hit_in_window >= 0) & (hit_in_window < lengths)
    hit[(block.offsets[:-1] + hit_in_window)[inside]] = True

    partial = text.partial[block.ids]
    if partial.any():
        for e in np.unique(np.searchsorted(block.offsets, np.flatnonzero(partial), side="right") - 1):
            _join_partial_runs(pieces, block.ids, partial, int(block.offsets[e]), int(block.offsets[e + 1]), text)

    # Python lists, not numpy scalars, in the loops: element access on an array costs ~10x more
    marked = np.flatnonzero((level > 0) | hit)
    pieces[marked] = [f"<b class=a{lv} title={a:.3g}>{p}</b>" if h else f"<i class=a{lv} title={a:.3g}>{p}</i>"
                      for lv, h, a, p in zip(level[marked].tolist(), hit[marked].tolist(), acts[marked].tolist(),
                                             pieces[marked].tolist())]
    offsets, plist = block.offsets.tolist(), pieces.tolist()
    out = []
    for e, (row, act, doc, subset, ctx, pos) in enumerate(zip(
            block.row.tolist(), block.activation.tolist(), block.doc_id, block.subset, block.context_id.tolist(),
            block.pos.tolist())):
        out.append(f'<div class=ex data-row={row}><p class=m><b>{act:.4g}</b> · doc <span class=doc>{esc_cached(doc)}'
                   f'</span> · {esc_cached(subset)} · row {row} · context {ctx} pos {pos}</p><p class=toks>'
                   + "".join(plist[offsets[e]:offsets[e + 1]]) + "</p></div>")
    return out


@functools.lru_cache(maxsize=1 << 16)
def esc_cached(text) -> str:
    """esc() of strings that repeat across examples (document ids, subsets)."""
    return esc(text)


def _join_partial_runs(pieces: np.ndarray, ids: np.ndarray, partial: np.ndarray, start: int, stop: int,
                       text: TokenText) -> None:
    """Decode each run of partial-character tokens in ids[start:stop] together; the run's text goes on its last
    token (the one that completes the character), the others show nothing."""
    i = start
    while i < stop:
        if not partial[i]:
            i += 1
            continue
        j = i
        while j + 1 < stop and partial[j + 1]:
            j += 1
        if j > i:
            joined = esc(text.decode(ids[i:j + 1]))
            pieces[i:j] = ""
            pieces[j] = joined
        i = j + 1


@dataclass
class FeatureInfo:
    """One feature's row of features.parquet, plus the browser extras."""
    feature: int
    count: int
    density: float
    log10_density: float | None
    mean_act: float
    max_act: float
    selectivity: float
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    interval_edges: np.ndarray
    interval_counts: np.ndarray
    top_tokens: list
    boosts: list          # [(token, value)]
    suppresses: list      # [(token, value)]
    neighbors: list       # [(feature id, cosine, its top tokens html)]


def chips(tokens) -> str:
    return "".join(f'<span class="chip">{esc(t)}</span>' for t in tokens)


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


def feature_page(info: FeatureInfo, *, d_sae: int, tokens: int, top_html: list[str],
                 interval_html: dict[int, list[str]], page_title: str) -> str:
    f = info.feature
    nav = ['<a href="../index.html">&larr; all features</a>']
    if f > 0:
        nav.append(f'<a href="{f - 1}.html">&lsaquo; {f - 1}</a>')
    if f + 1 < d_sae:
        nav.append(f'<a href="{f + 1}.html">{f + 1} &rsaquo;</a>')
    parts = [f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Feature {f} · {esc(page_title)}'
             '</title><link rel="stylesheet" href="../style.css"></head>'
             f'<body data-page="feature" data-feature="{f}"><nav>{" · ".join(nav)}</nav><h1>Feature {f}</h1>']
    dead = info.count == 0
    if dead:
        parts.append(f'<p class="dead-note" id="dead">Feature {f} is <b>dead</b>: it did not fire on any of the '
                     f'{tokens:,} analysed tokens, so it has no examples and no activation histogram. Its decoder '
                     'direction still has the output effects and neighbours below.</p>')
    log10 = "—" if info.log10_density is None else f"{info.log10_density:.3f}"
    # filled by label.js from ../labels/<block>.js when `saepipe label` has explained this feature
    parts.append('<section id="label" class="label" hidden></section>')
    parts.append('<dl class="stats">'
                 f'<dt>density</dt><dd>{_fmt(info.density)} ({info.count:,} of {tokens:,} tokens)</dd>'
                 f'<dt>log10 density</dt><dd>{log10}</dd>'
                 f'<dt>max activation</dt><dd>{_fmt(info.max_act)}</dd>'
                 f'<dt>mean activation</dt><dd>{_fmt(info.mean_act)}</dd>'
                 f'<dt>selectivity</dt><dd>{_fmt(info.selectivity)} <span class="meta-line">mean_act / ln(count + 1)</span></dd>'
                 f'<dt>top tokens</dt><dd>{chips(info.top_tokens) or "—"}</dd></dl>')
    parts.append('<div class="panels">')
    if not dead:
        parts.append('<div id="histogram"><h2>Activation histogram</h2>'
                     + activation_histogram_svg(info.hist_edges, info.hist_counts, interval_edges=info.interval_edges)
                     + f'<div class="meta-line">fires on {info.count:,} tokens, density {_fmt(info.density)}'
                     f'{"" if info.log10_density is None else f" (log10 {info.log10_density:.2f})"}; ticks: interval '
                     'edges</div></div>')
    parts.append('<div id="logits"><h2>Output tokens</h2><table class="logits"><tr><th>boosts</th><th></th>'
                 '<th>suppresses</th><th></th></tr>')
    for r in range(max(len(info.boosts), len(info.suppresses))):
        cells = []
        for side in (info.boosts, info.suppresses):
            if r < len(side):
                tok, val = side[r]
                cells.append(f'<td><span class="chip">{esc(tok)}</span></td><td class="v">{val:+.3f}</td>')
            else:
                cells.append("<td></td><td></td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append('</table></div><div id="neighbors"><h2>Nearest features (decoder cosine)</h2><ol class="neighbors">')
    for j, cos, tops in info.neighbors:
        parts.append(f'<li><a href="{j}.html">#{j}</a> <span class="cos">{cos:.3f}</span> {tops}</li>')
    parts.append("</ol></div></div>")
    if not dead:
        parts.append(f'<section id="top"><h2>Top activations ({len(top_html)})</h2>')
        parts.extend(top_html or ['<p class="empty">no examples stored</p>'])
        parts.append('</section><section id="intervals"><h2>Interval samples</h2>'
                     '<div class="meta-line">random tokens from equal-width activation intervals over [0, max]; '
                     'share: the interval\'s part of all firing tokens</div>')
        edges, counts = info.interval_edges, info.interval_counts
        for i in range(len(counts) - 1, -1, -1):
            share = counts[i] / info.count if info.count else 0.0
            samples = interval_html.get(i, [])
            parts.append(f'<div class="interval" data-interval="{i}"><h3>Interval {i}: [{edges[i]:.3g}, '
                         f'{edges[i + 1]:.3g}] · share {share:.2%} ({int(counts[i]):,} tokens)</h3>')
            parts.extend(samples or ['<p class="empty">no samples</p>'])
            parts.append("</div>")
        parts.append("</section>")
    parts.append(f'<script src="../labels/{f // LABEL_BLOCK}.js"></script><script src="../label.js"></script>'
                 "</body></html>\n")
    return "".join(parts)


# ---- index ----------------------------------------------------------------------------------------------------

def _b64(array: np.ndarray, dtype: str) -> dict:
    np_type = {"f64": "<f8", "f32": "<f4", "i32": "<i4"}[dtype]
    return {"dtype": dtype, "b64": base64.b64encode(np.ascontiguousarray(array, np_type).tobytes()).decode()}


def index_data_js(*, count: np.ndarray, density: np.ndarray, max_act: np.ndarray, mean_act: np.ndarray,
                  selectivity: np.ndarray, top_tokens: list[list[str]]) -> str:
    """The index's data as a script that sets window.SAEPIPE_INDEX (loaded by <script src>: no fetch() on file://).
    Numeric columns are base64 typed arrays: compact, and decoded straight into what the table sorts."""
    payload = {
        "n": int(len(count)),
        "dense_threshold": DENSE_THRESHOLD,
        "cols": {"count": _b64(count, "f64"), "density": _b64(density, "f64"), "max_act": _b64(max_act, "f32"),
                 "mean_act": _b64(mean_act, "f32"), "selectivity": _b64(selectivity, "f32")},
        "top": [[display_text(t) for t in tops] for tops in top_tokens],
    }
    # ensure_ascii also escapes U+2028/2029, which would end a JavaScript string literal in older engines
    return "window.SAEPIPE_INDEX = " + json.dumps(payload, ensure_ascii=True, separators=(",", ":")) + ";\n"


_COLUMNS = [("feature", "feature"), ("density", "density"), ("count", "count"), ("max_act", "max act"),
            ("mean_act", "mean act"), ("selectivity", "selectivity"), ("detection_accuracy", "detection"),
            ("fuzzing_accuracy", "fuzzing"), ("top", "top tokens"), ("label", "label")]


def index_page(*, meta: dict, d_sae: int, dead: int, dense: int, title: str) -> str:
    alive = d_sae - dead
    cards = [(f"{d_sae:,}", "features"), (f"{alive:,}", "alive"), (f"{dead:,}", "dead (never fired)"),
             (f"{dense:,}", f"dense (density > {DENSE_THRESHOLD:g})"), (f"{int(meta.get('tokens', 0)):,}", "tokens analysed")]
    details = " · ".join(esc(f"{k}: {meta[k]}") for k in ("sae_dir", "store_root", "layer", "hook", "top_k")
                         if meta.get(k) is not None)
    head = "".join(f'<div data-key="{key}"{" class=num" if key not in ("feature", "top", "label") else ""}>{label}</div>'
                   for key, label in _COLUMNS)
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{esc(title)}</title><link rel="stylesheet" href="style.css"></head>'
            f'<body data-page="index"><h1>{esc(title)}</h1><div class="meta-line">{details}</div>'
            '<div class="cards">'
            + "".join(f'<div class="card" id="card-{i}"><b>{v}</b><span>{esc(k)}</span></div>'
                      for i, (v, k) in enumerate(cards))
            + '</div><img class="density" src="density.png" alt="log10 density histogram of the live features">'
            '<div class="controls"><input type="search" id="search" placeholder="feature id, token or label" '
            'aria-label="search by feature id, token or label"><select id="filter" aria-label="filter">'
            '<option value="all">all features</option><option value="alive">alive</option>'
            '<option value="dead">dead</option><option value="dense">dense</option></select>'
            '<span id="shown"></span></div>'
            f'<div id="table"><div class="thead grid">{head}</div>'
            '<div id="viewport"><div id="spacer"><div id="rows"></div></div></div></div>'
            '<script src="index-data.js"></script><script src="labels-data.js"></script><script src="index.js"></script>'
            '</body></html>\n')
