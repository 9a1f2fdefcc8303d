"""The Grafana dashboards: the committed JSON is what monitoring/grafana/build_dashboards.py builds with the SDK, every
panel queries something, every query is PromQL that Prometheus parses and keeps to the selected runs."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO

GRAFANA = REPO / "monitoring" / "grafana"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bd = _load_builder()
BUILT = bd.build_all()


def test_committed_json_is_what_the_script_builds():
    committed = {p.name: json.loads(p.read_text()) for p in sorted(bd.OUT_DIR.glob("*.json"))}
    assert sorted(committed) == sorted(BUILT) == ["gpus.json", "hosts.json", "run-overview.json", "training.json"]
    for name, board in BUILT.items():
        assert committed[name] == board, (f"{name} is stale: rerun python monitoring/grafana/build_dashboards.py (with the "
                                        "grafana-foundation-sdk version pyproject.toml pins: others build other JSON)")
        assert (bd.OUT_DIR / name).read_text() == bd.render(board), f"{name}: not sorted keys/indent 2/newline"


def test_check_flags_the_file_that_differs(tmp_path, capsys):
    for name in BUILT:
        shutil.copy(bd.OUT_DIR / name, tmp_path / name)
    assert bd.main(["--check"], out_dir=tmp_path) == 0
    (tmp_path / "gpus.json").write_text("{}\n")
    assert bd.main(["--check"], out_dir=tmp_path) == 1
    err = capsys.readouterr().err
    assert "gpus.json" in err and "hosts.json" not in err
    assert (tmp_path / "gpus.json").read_text() == "{}\n"  # --check writes nothing


@pytest.mark.parametrize("name", sorted(BUILT))
def test_dashboard_structure(name):
    board = BUILT[name]
    assert board["uid"].startswith("saepipe-") and board["title"].startswith("saepipe / ")
    assert board["tags"] == ["saepipe"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["query"] == "label_values(saepipe_job_info, run)"
    assert run["includeAll"] and run["multi"] and run["allValue"] == ".*"

    panels = [p for p in board["panels"] if p["type"] != "row"]
    panels += [p for row in board["panels"] if row["type"] == "row" for p in row["panels"]]
    assert panels
    ids = [p["id"] for p in board["panels"]] + [p["id"] for row in board["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert any(t.get("expr", "").strip() for t in panel.get("targets", [])), f"{name}: {panel['title']} queries nothing"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), panel["title"]


def test_uids_are_unique():
    uids = [board["uid"] for board in BUILT.values()]
    assert len(uids) == len(set(uids))


def _all_queries():
    return [(name, title, expr) for name, board in BUILT.items() for title, expr in bd.panel_queries(board)]


def test_every_query_keeps_to_the_selected_runs_and_uses_the_rate_interval():
    queries = _all_queries()
    assert len(queries) > 40
    for name, title, expr in queries:
        where = f"{name} / {title}: {expr}"
        selectors = re.findall(r"\b((?:saepipe|node)_\w+)(\{[^}]*\})?", expr)
        assert selectors, where
        for metric, matchers in selectors:
            if metric.startswith("saepipe_"):
                assert 'job="saepipe"' in matchers and 'run=~"$run"' in matchers, where
            else:  # node-exporter: no run label
                assert 'job="node"' in matchers, where
        for window in re.findall(r"\b(?:rate|irate|increase)\([^()\[]*\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", where


def test_every_saepipe_metric_queried_is_in_the_catalogue():
    catalogue = set(re.findall(r"\bsaepipe_\w+", (REPO / "monitoring" / "METRICS.md").read_text()))
    used = {metric for _, _, expr in _all_queries() for metric in re.findall(r"\bsaepipe_\w+", expr)}
    assert used and not used - catalogue, f"not in monitoring/METRICS.md: {sorted(used - catalogue)}"


def test_panel_queries_reaches_into_collapsed_rows():
    hosts = BUILT["hosts.json"]
    rows = [p for p in hosts["panels"] if p["type"] == "row"]
    assert rows and rows[0]["collapsed"] and rows[0]["panels"]
    nested = {p["title"] for p in rows[0]["panels"]}
    queries = bd.panel_queries(hosts)
    assert nested <= {title for title, _ in queries}
    assert any("node_cpu_seconds_total" in expr for _, expr in queries)


def test_concrete_substitutes_grafana_variables():
    expr = 'rate(x{run=~"$run", host=~"$host"}[$__rate_interval]) / y{stage=~"${stage}"}[$__interval]'
    assert bd.concrete(expr) == 'rate(x{run=~".*", host=~".*"}[1m]) / y{stage=~".*"}[1m]'
    assert bd.concrete(expr, {"run": "r1"}, rate_interval="2m") == \
        'rate(x{run=~"r1", host=~".*"}[2m]) / y{stage=~".*"}[2m]'


@pytest.mark.integration
def test_every_query_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    # promtool has no "parse this query" command; a recording-rules file is checked expression by expression.
    queries = _all_queries()
    rules = [{"record": f"saepipe_dashboard:query_{i}", "expr": bd.concrete(expr)}
             for i, (_, _, expr) in enumerate(queries)]
    assert not any("$" in rule["expr"] for rule in rules)
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    which = "\n".join(f"query_{i}: {name} / {title}" for i, (name, title, _) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{which}"
    assert f"{len(rules)} rules found" in result.stdout


def test_grafana_provisioning():
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["name"] == "Prometheus" and source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090" and source["isDefault"] is True
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "saepipe.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["folder"] == "saepipe"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
