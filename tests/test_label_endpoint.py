"""`saepipe label` against a real `transformers serve` on loopback with the bundled SmolLM2-135M-Instruct: three
features labelled end to end and shown in the browser (Chromium), the one-line errors of a wrong URL or model, retries
through a fault-injecting proxy, and an endpoint killed mid-run whose rerun labels only the missing features.
Integration tests: without the serving extra or chromium they skip locally and fail under CI=true."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.analysis.labels.client import EndpointError
from pipeline.analysis.labels.local_server import serve
from pipeline.analysis.labels.run import run_labelling
from pipeline.config import validate
from pipeline.config.label import LabelRunConfig, LocalServerConfig

from conftest import running_under_ci
from helpers.chromium import Chromium, find_chromium
from helpers.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def analysed(smollm2_sae, smollm2, tmp_path_factory):
    from pipeline.analysis.analyze import run_analysis
    from pipeline.analysis.browser import build_browser

    adir = run_analysis(smollm2_sae.run_dir, out=tmp_path_factory.mktemp("label") / "analysis", show_progress=False)
    build_browser(adir, model=smollm2, show_progress=False)
    return adir


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("transformers' serving extra is not installed (pip install 'transformers[serving]')")
    with serve(LocalServerConfig()) as s:
        yield s


def config(smollm2_sae, adir: Path, base_url: str, model: str, **over) -> LabelRunConfig:
    endpoint = {"base_url": base_url, "model": model, "concurrency": 2, "explanation_tokens": 24, "max_retries": 2,
                "timeout_s": 60, **over.pop("endpoint", {})}
    data = {"run": str(smollm2_sae.run_dir), "analysis": str(adir), "n": 3, "min_count": 10, "explain_top": 6,
            "explain_intervals": 3, "score_examples": 4, "batch": 1, "context_tokens": 24, "negative_pool": 64,
            "endpoint": endpoint, **over}
    return validate(LabelRunConfig, data, "test")


def test_a_wrong_url_or_model_fails_in_one_line_before_any_work(smollm2_sae, analysed, server, tmp_path):
    from pipeline.analysis.labels.local_server import free_port

    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}/v1"
    cfg = config(smollm2_sae, analysed, dead, server.model, out=str(tmp_path / "a"), endpoint={"max_retries": 0})
    with pytest.raises(EndpointError, match="endpoint unreachable") as err:
        run_labelling(cfg, show_progress=False)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "a").rglob("0*.json"))  # nothing labelled, nothing cached
    cfg = config(smollm2_sae, analysed, server.base_url, "no-such-model", out=str(tmp_path / "b"))
    with pytest.raises(EndpointError, match="refused model 'no-such-model'"):
        run_labelling(cfg, show_progress=False)


def test_three_features_are_labelled_end_to_end_and_shown_in_the_browser(smollm2_sae, analysed, server, tmp_path):
    cfg = config(smollm2_sae, analysed, server.base_url, server.model)
    outcome = run_labelling(cfg, show_progress=False)
    assert outcome.status == "completed" and len(outcome.features) == 3 and outcome.labelled_now == 3
    table = pq.read_table(analysed / "labels.parquet").to_pylist()
    assert [r["feature"] for r in table] == outcome.features
    summary = json.loads((analysed / "labels.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((analysed / "labels-cache").glob("*/0*.json"))]
    assert len(records) == 3
    for row in table:
        assert row["explanation_raw"].strip() and row["status"] in ("ok", "polysemantic", "empty")
        assert row["model"] == server.model
        rec = next(r for r in records if r["feature"] == row["feature"])
        if row["status"] != "ok":
            continue
        # 4 held-out activating excerpts + 4 non-activating (detection), 2 right + 2 wrong (fuzzing), one per request
        assert rec["examples"]["detection"] == 8 and rec["examples"]["fuzzing"] == 4
        assert row["answers"] == 12 and len(rec["answers"]) == 12
        for scorer in ("detection", "fuzzing"):
            answered = [a for a in rec["answers"] if a["scorer"] == scorer and a["said"] is not None]
            right = sum(t == s for a in answered for t, s in zip(a["truth"], a["said"]))
            n = sum(len(a["truth"]) for a in answered)
            assert row[f"{scorer}_n"] == n
            assert row[f"{scorer}_accuracy"] == (pytest.approx(right / n) if n else None)
        assert row["malformed_answers"] == sum(a["said"] is None for a in rec["answers"])
    assert summary["overall"]["answers"] == sum(r["answers"] for r in table)
    assert summary["overall"]["detection"]["n"] > 0  # the small model does answer in the format, one excerpt at a time
    assert (analysed / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun asks the endpoint nothing: every feature is cached
    again = run_labelling(cfg, show_progress=False)
    assert again.labelled_now == 0 and again.from_cache == 3 and again.summary["requests"] == 0
    assert pq.read_table(analysed / "labels.parquet").to_pylist() == table

    if find_chromium() is None:
        if running_under_ci():
            pytest.fail("chromium is missing under CI")
        pytest.skip("no chromium (apt-get install chromium)")
    browser = analysed / "browser"
    first = table[0]
    with Chromium() as chrome:
        page = chrome.open((browser / "features" / f"{first['feature']}.html").as_uri())
        page.screenshot(tmp_path / "labelled-feature.png")
        assert page.problems() == []
        assert page.evaluate("document.getElementById('label').hidden") is False
        shown = page.evaluate("document.querySelector('#label .explanation').textContent")
        assert shown == (first["explanation"] if first["status"] == "ok" else first["status"].upper()
                         if first["status"] == "polysemantic" else "(no explanation)")
        assert "detection" in page.evaluate("document.getElementById('label').innerText")
        other = next(f for f in range(10_000) if f not in outcome.features)
        unlabelled = chrome.open((browser / "features" / f"{other}.html").as_uri())
        assert unlabelled.problems() == [] and unlabelled.evaluate("document.getElementById('label').hidden") is True
        index = chrome.open((browser / "index.html").as_uri())
        assert index.problems() == []
        labelled = [r for r in table if r["status"] == "ok" and r["explanation"]]
        if labelled:
            r = labelled[0]
            found = index.evaluate(
                "(() => { const s = document.getElementById('search'); s.value = " + json.dumps(r["explanation"])
                + "; s.dispatchEvent(new Event('input')); return [...document.querySelectorAll('#rows .frow')]"
                ".filter(e => e.style.display !== 'none').map(e => [+e.dataset.feature, "
                "e.children[9].textContent, e.children[6].textContent]); })()")
            assert [r["feature"], r["explanation"], f"{r['detection_accuracy']:.2f}" if r["detection_accuracy"]
                    is not None else "—"] in found


def test_429_and_5xx_answers_are_retried(smollm2_sae, analysed, server, tmp_path):
    with FlakyProxy(server.base_url.removesuffix("/v1"), fail_every=3, status=503) as proxy:
        cfg = config(smollm2_sae, analysed, proxy.url + "/v1", server.model, n=1, out=str(tmp_path / "flaky"),
                     endpoint={"concurrency": 1, "max_retries": 3})
        outcome = run_labelling(cfg, show_progress=False)
    assert proxy.failed >= 3 and outcome.status == "completed"
    assert outcome.summary["requests"] == proxy.requests - proxy.failed  # each request once, after its retries
    with FlakyProxy(server.base_url.removesuffix("/v1"), fail_every=2, status=429) as proxy:
        cfg = config(smollm2_sae, analysed, proxy.url + "/v1", server.model, n=1, out=str(tmp_path / "limited"),
                     endpoint={"concurrency": 1, "max_retries": 2})
        assert run_labelling(cfg, show_progress=False).status == "completed" and proxy.failed >= 3


def test_an_endpoint_killed_mid_run_fails_in_one_line_and_the_rerun_does_only_the_rest(smollm2_sae, analysed,
                                                                                        server, tmp_path):
    """Runs after every test that uses the module's server: it kills it."""
    out = tmp_path / "killed"
    cfg = config(smollm2_sae, analysed, server.base_url, server.model, n=4, out=str(out),
                 endpoint={"concurrency": 1, "max_retries": 1})

    def kill_after_first_feature():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(out.glob("labels-cache/*/0*.json")):
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_feature, daemon=True)
    killer.start()
    with pytest.raises(EndpointError, match="run again") as err:
        run_labelling(cfg, show_progress=False)
    killer.join()
    message = str(err.value)
    assert "\n" not in message and "unreachable" in message
    cached = len(list(out.glob("labels-cache/*/0*.json")))
    assert 1 <= cached < 4 and not (out / "labels.parquet").exists()
    with serve(LocalServerConfig()) as fresh:
        again = run_labelling(config(smollm2_sae, analysed, fresh.base_url, fresh.model, n=4, out=str(out),
                                     endpoint={"concurrency": 1}), show_progress=False)
    assert again.from_cache == cached and again.labelled_now == 4 - cached
    assert pq.read_table(out / "labels.parquet").num_rows == 4


def test_a_killed_labeller_takes_its_local_server_with_it(server):
    """SIGKILL gives the labeller no chance to stop the server it started; the server must not outlive it."""
    import subprocess
    import sys

    code = ("import time\nfrom pipeline.analysis.labels.local_server import serve\n"
            "from pipeline.config.label import LocalServerConfig\n"
            "with serve(LocalServerConfig()) as s:\n    print(s.pid, flush=True)\n    time.sleep(600)\n")
    labeller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(labeller.stdout.readline())
        os.kill(pid, 0)  # up and answering
    finally:
        labeller.kill()
        labeller.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
        pytest.fail(f"the server (pid {pid}) outlived the labeller that started it")
