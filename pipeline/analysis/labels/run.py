"""`saepipe label`: explain features with an LLM and score the explanations by detection and fuzzing.

Order of work: everything that can be wrong (the analysis dir, the feature ids, the endpoint URL, key and model) is
checked first; then the examples of the features still missing from the cache are read and the non-activating pool
is encoded once; then the features go to a pool of `endpoint.concurrency` workers, each feature's requests in turn,
and each finished feature is cached at once. An endpoint that stops answering ends the run with one line; what was
cached stays, and the rerun does the rest. The results (labels.parquet, labels.json, labels.png, the browser's label
data) are written from the cache at the end, atomically."""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config.label import LabelRunConfig
from pipeline.errors import ConfigError
from pipeline.hooks import NeverStop, StopCondition

from . import prompts
from .cache import LabelCache, cache_key
from .client import Endpoint, EndpointError, EndpointSpec, resolve_endpoint
from .examples import Excerpt, NegativePool, load_examples, marked_text
from .scoring import Tally, batches, detection_items, fuzzing_items

log = logging.getLogger(__name__)


@dataclass
class LabelOutcome:
    status: str               # "completed" | "stopped"
    out_dir: Path
    features: list[int]
    labelled_now: int
    from_cache: int
    summary: dict | None      # labels.json, when completed


def analysis_dir_of(cfg: LabelRunConfig) -> Path:
    if cfg.analysis:
        return Path(cfg.analysis)
    run = Path(cfg.run)
    return run if (run / "analysis.json").is_file() else run / "analysis"


def labels_dir_of(cfg: LabelRunConfig) -> Path:
    """Where labels.parquet, labels.json and the cache go: `out`, else the analysis directory."""
    return Path(cfg.out) if cfg.out else analysis_dir_of(cfg)


def select_features(features_table, cfg: LabelRunConfig) -> tuple[list[int], list[int]]:
    """(features to label, ids skipped for firing on fewer than min_count tokens) in the order they are labelled."""
    count = features_table.column("count").to_numpy()
    d_sae = len(count)
    if cfg.select == "ids":
        bad = [i for i in cfg.ids if i >= d_sae]
        if bad:
            raise ConfigError(f"ids: {bad} out of range; the SAE has features 0..{d_sae - 1}")
        ids = list(dict.fromkeys(cfg.ids))
        rare = [i for i in ids if count[i] < cfg.min_count]
        return [i for i in ids if count[i] >= cfg.min_count], rare
    live = np.flatnonzero(count >= cfg.min_count)
    if cfg.select == "all":
        return live.tolist(), []
    selectivity = features_table.column("selectivity").to_numpy()
    order = live[np.lexsort((live, -selectivity[live]))]
    return order[: cfg.n].tolist(), []


def run_labelling(cfg: LabelRunConfig, *, stop: StopCondition | None = None, show_progress: bool = True,
                  endpoint: EndpointSpec | None = None) -> LabelOutcome:
    """Label the selected features; `endpoint` overrides the config's (a server started by the caller)."""
    from pipeline.analysis.browser import read_analysis_json, read_features

    from .output import write_outputs

    started = time.perf_counter()
    stop = stop or NeverStop()
    adir = analysis_dir_of(cfg)
    meta = read_analysis_json(adir)
    features_table = read_features(adir / "features.parquet")
    chosen, rare = select_features(features_table, cfg)
    if rare:
        log.warning("skipping %d feature(s) that fired on fewer than min_count=%d tokens: %s", len(rare),
                    cfg.min_count, rare[:20])
    if not chosen:
        raise ConfigError(f"{adir}: no feature among those selected ({cfg.select}) fired on min_count="
                          f"{cfg.min_count} tokens or more; nothing to label")
    out_dir = labels_dir_of(cfg)

    model = _model_name(cfg, endpoint)
    cache = LabelCache(out_dir, cache_key((adir / "analysis.json").read_bytes(), model, cfg, prompts.PROMPT_VERSION))
    missing = [f for f in chosen if cache.get(f) is None]
    log.info("labelling %d feature(s) with %s: %d cached, %d to do", len(chosen), model, len(chosen) - len(missing),
             len(missing))
    status, wall, busy, requests, spec = "completed", 0.0, 0.0, 0, None
    if missing:  # a local server is started only when there is something to ask it
        with _endpoint(cfg, endpoint, out_dir) as spec:
            client = Endpoint(spec)
            work_started = time.perf_counter()
            client.check()
            plans = _plans(cfg, adir, meta, missing)
            status = _label_all(client, plans, cfg, cache, stop, show_progress)
            wall = time.perf_counter() - work_started
            busy, requests = client.busy_seconds(since=work_started), client.requests
    else:
        spec = endpoint or (EndpointSpec("(local server not started: every feature was cached)", model, None,
                                         cfg.endpoint.timeout_s, cfg.endpoint.max_retries, cfg.endpoint.temperature)
                            if cfg.endpoint.serve else resolve_endpoint(cfg.endpoint))
    if status != "completed":
        return LabelOutcome(status, out_dir, chosen, 0, len(chosen) - len(missing), None)
    records = [cache.get(f) for f in chosen]
    timing = {"seconds": round(time.perf_counter() - started, 3), "work_seconds": round(wall, 3),
              "endpoint_busy_seconds": round(busy, 3), "requests": requests,
              "outside_endpoint_fraction": round(1 - busy / wall, 4) if missing and wall > 0 else None}
    summary = write_outputs(out_dir, adir, records, d_sae=features_table.num_rows, spec=spec, cfg=cfg, timing=timing,
                            labelled_now=len(missing), skipped_rare=rare)
    return LabelOutcome("completed", out_dir, chosen, len(missing), len(chosen) - len(missing), summary)


def _model_name(cfg: LabelRunConfig, given: EndpointSpec | None) -> str:
    """The model name requests carry, known before any server starts: it keys the cache."""
    if given is not None:
        return given.model
    if cfg.endpoint.serve is not None:
        from .local_server import model_dir

        return str(model_dir(cfg.endpoint.serve.model))
    return resolve_endpoint(cfg.endpoint).model


@contextlib.contextmanager
def _endpoint(cfg: LabelRunConfig, given: EndpointSpec | None, out_dir: Path):
    if given is not None:
        yield given
        return
    if cfg.endpoint.serve is None:
        yield resolve_endpoint(cfg.endpoint)
        return
    from .local_server import serve

    with serve(cfg.endpoint.serve, log_dir=out_dir / "labels-cache") as server:
        yield resolve_endpoint(cfg.endpoint, base_url=server.base_url, model=server.model)


# ---- what each feature is shown -------------------------------------------------------------------------------

@dataclass
class FeaturePlan:
    feature: int
    explain: list[str]                  # marked excerpts for the explainer
    detection: list                     # scoring.Item lists
    fuzzing: list
    tokenizer: object


def _plans(cfg: LabelRunConfig, adir: Path, meta: dict, features: list[int]) -> list[FeaturePlan]:
    from pipeline.analysis.analyze import _device
    from pipeline.analysis.source import open_sae_source

    length = min(cfg.context_tokens, 2 * int(meta["window"]) + 1)  # negatives as long as the stored windows allow
    examples = load_examples(adir, features, length)
    src = open_sae_source(meta.get("run_dir") or meta["sae_dir"], meta["store_root"], shards=meta["shards"])
    dataset = src.dataset
    tokenizer = dataset.tokenizer
    device = _device(cfg.device)
    pool = NegativePool.build(src.sae.to(device).eval(), dataset, meta, n_windows=cfg.negative_pool,
                              context_tokens=length, seed=cfg.seed, device=device)
    log.info("non-activating pool: %d windows of up to %d tokens", len(pool), length)
    plans = []
    for f in features:
        rng = np.random.default_rng([cfg.seed, f])
        shown, held = _split_examples(examples[f], cfg, rng)
        negatives = pool.draw(f, len(held), rng)
        if len(negatives) < len(held):
            log.warning("feature %d fires in all but %d of the %d pool windows: detection shows %d pairs", f,
                        len(negatives), len(pool), len(negatives))
        plans.append(FeaturePlan(
            feature=f,
            explain=[marked_text(tokenizer, e.token_ids, e.active) for e in shown],
            detection=detection_items(held, negatives, rng),
            fuzzing=fuzzing_items(held, rng),
            tokenizer=tokenizer))
    return plans


def _split_examples(ex: dict[str, list[Excerpt]], cfg: LabelRunConfig, rng: np.random.Generator):
    """(shown to the explainer, held out for scoring): the top `explain_top` and `explain_intervals` interval samples
    one per interval from the strongest down; scoring draws from the rest, interval samples first (they span the
    activation range, as delphi's quantile examples do), never an excerpt the explainer saw."""
    top, interval = ex["top"], ex["interval"]
    shown = list(top[: cfg.explain_top])
    groups = _interval_groups(interval)
    picked: list[Excerpt] = []
    while len(picked) < cfg.explain_intervals and any(groups):
        for g in groups:
            if g and len(picked) < cfg.explain_intervals:
                picked.append(g.pop(0))
    shown += picked
    seen = {e.row for e in shown}
    rest_interval = [e for g in groups for e in g if e.row not in seen]
    rest_top = [e for e in top[cfg.explain_top:] if e.row not in seen]
    pool = [rest_interval[i] for i in rng.permutation(len(rest_interval))]
    pool += [rest_top[i] for i in rng.permutation(len(rest_top))]
    held, rows = [], set()
    for e in pool:
        if e.row not in rows and len(held) < cfg.score_examples:
            held.append(e)
            rows.add(e.row)
    return shown, held


def _interval_groups(interval: list[Excerpt]) -> list[list[Excerpt]]:
    groups: dict[int, list[Excerpt]] = {}
    for e in interval:
        groups.setdefault(e.interval, []).append(e)
    return [groups[k] for k in sorted(groups, reverse=True)]


# ---- asking ---------------------------------------------------------------------------------------------------

def _label_all(client: Endpoint, plans: list[FeaturePlan], cfg: LabelRunConfig, cache: LabelCache,
               stop: StopCondition, show_progress: bool) -> str:
    from tqdm import tqdm

    abort = threading.Event()

    def one(plan: FeaturePlan) -> None:
        if abort.is_set() or stop.should_stop():
            return
        record = label_feature(client, plan, cfg, abort)
        if record is not None:
            cache.put(record)

    with ThreadPoolExecutor(cfg.endpoint.concurrency, thread_name_prefix="label") as pool, \
            tqdm(total=len(plans), desc="label", unit="feature", disable=not show_progress) as bar:
        futures = {pool.submit(one, p): p.feature for p in plans}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            for fut in finished:
                err = fut.exception()
                if err is not None:
                    abort.set()
                    for other in pending:
                        other.cancel()
                    wait(pending)
                    cached = sum(1 for p in plans if cache.has(p.feature))
                    if isinstance(err, EndpointError):
                        raise EndpointError(f"{err}; {cached} of {len(plans)} feature(s) labelled and cached in "
                                            f"{cache.dir}: run again to label the rest") from None
                    raise err
                bar.update(1)
            if stop.should_stop() and pending:
                abort.set()
                wait(pending)
                return "stopped"
    return "completed"


def label_feature(client: Endpoint, plan: FeaturePlan, cfg: LabelRunConfig,
                  abort: threading.Event | None = None) -> dict | None:
    """One feature's explanation and both scores, as its cache record (every raw answer kept); None when `abort` is
    set midway (another feature's request failed for good: asking on would only wait out more retries)."""
    raw = client.chat(prompts.explanation_messages(plan.explain), max_tokens=cfg.endpoint.explanation_tokens)
    explanation, status = prompts.parse_explanation(raw)
    record = {"feature": plan.feature, "explanation": explanation, "status": status, "explanation_raw": raw,
              "examples": {"explain": len(plan.explain), "detection": len(plan.detection),
                           "fuzzing": len(plan.fuzzing)},
              "detection": None, "fuzzing": None, "answers": []}
    if status != "ok":  # nothing to score against: recorded as such (seed 002's POLYSEMANTIC)
        return record
    for scorer, items, build in (("detection", plan.detection, prompts.detection_messages),
                                 ("fuzzing", plan.fuzzing, prompts.fuzzing_messages)):
        tally = Tally()
        for batch in batches(items, cfg.batch):
            if abort is not None and abort.is_set():
                return None
            texts = [marked_text(plan.tokenizer, it.excerpt.token_ids,
                                 None if it.marks is None else np.asarray(it.marks)) for it in batch]
            answer = client.chat(build(explanation, texts), max_tokens=4 * len(batch) + 8)
            said = prompts.parse_answers(answer, len(batch))
            truth = [it.truth for it in batch]
            tally.add(truth, said)
            record["answers"].append({"scorer": scorer, "truth": truth, "said": said, "raw": answer})
        record[scorer] = tally.metrics() | {"tp": tally.tp, "fp": tally.fp, "tn": tally.tn, "fn": tally.fn}
    return record


def read_labels_json(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / "labels.json").read_text())
    except (OSError, ValueError):
        return None
