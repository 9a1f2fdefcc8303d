"""The browser's plots: the index's log10 density histogram as a matplotlib PNG (one figure), and each feature's
activation histogram as inline SVG written from a template (one matplotlib figure per feature would cost about
50 ms each, nearly an hour at 65,536 features)."""
from __future__ import annotations

import io
import math

import numpy as np

DENSE_THRESHOLD = 0.1  # a feature firing on more than 10% of tokens counts as dense


def density_histogram_png(log10_density: np.ndarray, *, dead: int, total: int, bins: int = 60) -> bytes:
    """PNG of the log10 firing-density histogram of the live features, dead and dense counts in the title."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    values = np.asarray(log10_density, np.float64)
    values = values[np.isfinite(values)]
    fig = Figure(figsize=(7.5, 2.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if values.size:
        ax.hist(values, bins=bins, color="#3b6fb6")
    else:
        ax.text(0.5, 0.5, "no live features", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(math.log10(DENSE_THRESHOLD), color="#c0392b", linestyle="--", linewidth=1)
    dense = int((values > math.log10(DENSE_THRESHOLD)).sum())
    ax.set_title(f"{total:,} features: {dead:,} dead, {dense:,} dense (> {DENSE_THRESHOLD:g})", fontsize=10)
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("features")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def activation_histogram_svg(edges: np.ndarray, counts: np.ndarray, *, interval_edges: np.ndarray | None = None,
                             width: int = 520, height: int = 150) -> str:
    """An inline SVG bar chart of firing tokens per activation bin (`edges` has len(counts) + 1 entries), with the
    interval boundaries as ticks underneath when given."""
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    left, right, top, bottom = 44, 8, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = counts.max() if counts.size else 0.0
    span = float(edges[-1] - edges[0]) if edges.size > 1 else 0.0
    parts = [f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram">']
    if peak > 0 and span > 0:
        x = (left + (edges - edges[0]) / span * plot_w).tolist()
        h = (counts / peak * plot_h).tolist()
        e, c = edges.tolist(), counts.tolist()  # Python floats: formatting numpy scalars is several times slower
        bars = [f'<rect x="{x[i]:.1f}" y="{top + plot_h - h[i]:.1f}" width="{max(x[i + 1] - x[i] - 0.5, 0.5):.1f}" '
                f'height="{h[i]:.1f}"><title>[{e[i]:.3g}, {e[i + 1]:.3g}): {int(c[i])}</title></rect>'
                for i in range(len(c)) if c[i] > 0]
        parts.append('<g fill="#e8743b">' + "".join(bars) + "</g>")
        if interval_edges is not None:
            xs = left + (np.asarray(interval_edges, np.float64) - edges[0]) / span * plot_w
            ticks = "".join(f'<line x1="{v:.1f}" x2="{v:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}"/>' for v in xs)
            parts.append(f'<g stroke="#555">{ticks}</g>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#333"/>')
    text = 'font-size="10" fill="#333" font-family="sans-serif"'
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" {text}>{int(peak)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" {text}>0</text>')
    if edges.size > 1:
        parts.append(f'<text x="{left}" y="{height - 6}" {text}>{edges[0]:.3g}</text>')
        parts.append(f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end" {text}>{edges[-1]:.3g}</text>')
        parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" {text}>activation</text>')
    parts.append("</svg>")
    return "".join(parts)
