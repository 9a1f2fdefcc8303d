"""The analysis stage as one unit, as `saepipe submit pipeline` and `saepipe demo` run it after training: the feature
statistics pass, the spliced CE/KL evaluation and the browser, each skipped when its output is already there (a
requeued job redoes only the parts it had not finished; each part writes its output atomically at its end)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.analysis import AnalysisRunConfig
from pipeline.hooks import NeverStop, StopCondition

log = logging.getLogger(__name__)


@dataclass
class AnalysisOutcome:
    status: str                 # "completed" | "stopped"
    analysis_dir: Path
    spliced: dict | None        # the spliced evaluation's figures, when run
    browser: Path | None        # index.html, when built
    done_before: list[str]      # the parts found finished on disk


def analysis_dir(cfg: AnalysisRunConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.run) / "analysis"


def spliced_path(cfg: AnalysisRunConfig) -> Path:
    return analysis_dir(cfg) / "spliced.json"


def browser_index(cfg: AnalysisRunConfig) -> Path:
    return analysis_dir(cfg) / "browser" / "index.html"


def analysis_complete(cfg: AnalysisRunConfig) -> bool:
    return ((analysis_dir(cfg) / "analysis.json").is_file()
            and (not cfg.spliced_eval or spliced_path(cfg).is_file())
            and (not cfg.browser or browser_index(cfg).is_file()))


def run_analysis_stage(cfg: AnalysisRunConfig, *, stop: StopCondition | None = None, model=None,
                       show_progress: bool = True) -> AnalysisOutcome:
    """Each part is minutes at most, so a stop is honoured between parts, not inside one."""
    from .analyze import run_analysis

    stop = stop or NeverStop()
    out = analysis_dir(cfg)
    done_before, spliced, index = [], None, None
    if (out / "analysis.json").is_file():
        done_before.append("analyze")
    else:
        run_analysis(cfg.run, store=cfg.store, out=out, tokens=cfg.tokens, top_k=cfg.top_k,
                     n_intervals=cfg.n_intervals, samples_per_interval=cfg.samples_per_interval,
                     hist_bins=cfg.hist_bins, window=cfg.window, batch_size=cfg.batch_size, device=cfg.device,
                     show_progress=show_progress)
    if cfg.spliced_eval:
        if stop.should_stop():
            return AnalysisOutcome("stopped", out, None, None, done_before)
        if spliced_path(cfg).is_file():
            done_before.append("spliced_eval")
            spliced = json.loads(spliced_path(cfg).read_text())
        else:
            from .spliced_eval import run_spliced_eval

            spliced = run_spliced_eval(cfg.run, store=cfg.store, contexts=cfg.eval_contexts, device=cfg.device,
                                       model=model, out=spliced_path(cfg), show_progress=show_progress)
    if cfg.browser:
        if stop.should_stop():
            return AnalysisOutcome("stopped", out, spliced, None, done_before)
        if browser_index(cfg).is_file():
            done_before.append("browser")
            index = browser_index(cfg)
        else:
            from .browser import build_browser

            index = build_browser(out, model=model, show_progress=show_progress)
    return AnalysisOutcome("completed", out, spliced, index, done_before)
