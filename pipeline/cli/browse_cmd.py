"""`saepipe browse ANALYSIS_DIR|RUN [--out DIR] [--open-path]`: (re)build the static feature browser of an analysis
directory (`saepipe analyze` writes one; a training run dir RUN means RUN/analysis).

The browser is plain files: DIR/browser/index.html (every feature in a sortable, filterable table, the log10 density
histogram, dead and dense counts) and DIR/browser/features/<id>.html (top activations, interval samples, the
activation histogram, output tokens, nearest features by decoder cosine). Open index.html from disk: no server needed.
The first build also writes DIR/logits.parquet and DIR/neighbors.parquet (from the SAE and the model); later builds
reuse them while the SAE's files are unchanged."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("browse", parents=[common], help="build the static HTML feature browser of an analysis",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("analysis", metavar="ANALYSIS_DIR|RUN", help="analysis directory, or a training run dir (RUN/analysis)")
    p.add_argument("--out", help="where to write the browser (default ANALYSIS_DIR/browser)")
    p.add_argument("--open-path", action="store_true",
                   help="print only the file:// URL of index.html (for `chromium $(saepipe browse DIR --open-path)`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... for the neighbour search and the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def analysis_dir(path: str) -> Path:
    """The analysis directory a user means: the path itself, or RUN/analysis for a run that has one."""
    given = Path(path)
    if not (given / "analysis.json").is_file() and (given / "analysis" / "analysis.json").is_file():
        return given / "analysis"
    return given


def run(args: argparse.Namespace) -> int:
    import time

    from pipeline.analysis.browser import build_browser

    started = time.perf_counter()
    index = build_browser(analysis_dir(args.analysis), out=args.out, device=args.device,
                          show_progress=not args.no_progress and not args.open_path)
    if args.open_path:
        print(index.resolve().as_uri())
        return 0
    root = index.parent
    pages = sum(1 for _ in (root / "features").glob("*.html"))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"browser: {index} ({pages:,} feature pages, {size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
    print(f"open: {index.resolve().as_uri()}")
    return 0
