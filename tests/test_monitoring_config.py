"""The monitoring stack's configuration, checked with the tools that load it: promtool (Prometheus config, alert
rules and their unit tests), amtool (Alertmanager config) and docker-compose (the compose file), and by reading the
YAML for what those tools do not check (the structure `saepipe monitor up` rewrites, loopback-only listening, a
firing and a quiet unit test for every alert). A test that needs a tool skips, with the reason, when the tool is
missing; under CI=true such a skip is a failure (tests/conftest.py)."""

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "monitoring" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "saepipe.rules.yml"
RULES_TEST = PROM_DIR / "rules" / "saepipe.rules.test.yml"
AM_CONFIG = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"
COMPOSE = REPO / "docker-compose.monitoring.yml"

EXPECTED_ALERTS = {
    "SaepipeTargetDown", "SaepipeNoProgress", "SaepipeGPUIdle", "SaepipeLossNotFinite", "SaepipeHostMemoryHigh",
    "SaepipeDiskFull", "SaepipeCheckpointStale", "SaepipeRequeuedOften",
}

# The Debian package of each tool.
PACKAGE = {"promtool": "prometheus", "amtool": "prometheus-alertmanager", "docker-compose": "docker-compose"}


def tool(name: str) -> str:
    """The tool's path; the test skips (an integration test: a failure under CI=true) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {PACKAGE[name]})")
    return path


def run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """The tool's result, run from the repository root; its output is in the assertion message when it fails."""
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def rules() -> list[dict]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


@pytest.mark.integration
def test_promtool_check_config():
    result = run([tool("promtool"), "check", "config", str(PROM_CONFIG.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks the rule files its rule_files globs match: exactly the one rules file
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout, result.stdout


@pytest.mark.integration
def test_promtool_check_rules():
    result = run([tool("promtool"), "check", "rules", str(RULES.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout, result.stdout


@pytest.mark.integration
def test_promtool_rule_unit_tests():
    result = run([tool("promtool"), "test", "rules", str(RULES_TEST.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.integration
def test_amtool_check_config():
    result = run([tool("amtool"), "check-config", str(AM_CONFIG.relative_to(REPO))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_prometheus_config_structure():
    """The shape `saepipe monitor up` rewrites: one file_sd entry in job saepipe, one static Alertmanager target, the
    rule glob matching the rules file (not its unit tests), and every scrape job on 127.0.0.1."""
    config = load(PROM_CONFIG)
    assert config["global"]["scrape_interval"] == "15s" and config["global"]["evaluation_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"saepipe", "node", "dcgm", "prometheus"}

    (file_sd,) = jobs["saepipe"]["file_sd_configs"]
    assert file_sd == {"files": ["targets/*.json"], "refresh_interval": "5s"}
    assert "static_configs" not in jobs["saepipe"]
    assert jobs["node"]["static_configs"] == [{"targets": ["127.0.0.1:9100"]}]
    assert jobs["dcgm"]["static_configs"] == [{"targets": ["127.0.0.1:9400"]}]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9090"]}]
    # DCGM's Hostname becomes the join key host
    assert any(r.get("source_labels") == ["Hostname"] and r.get("target_label") == "host"
               for r in jobs["dcgm"]["metric_relabel_configs"])

    (alertmanager,) = config["alerting"]["alertmanagers"]
    assert alertmanager["static_configs"] == [{"targets": ["127.0.0.1:9093"]}]

    assert config["rule_files"] == ["rules/*.rules.yml"]
    rule_dir = [p.relative_to(PROM_DIR).as_posix() for p in (PROM_DIR / "rules").iterdir()]
    assert [p for p in rule_dir if fnmatch.fnmatch(p, config["rule_files"][0])] == ["rules/saepipe.rules.yml"]


def test_node_relabelling_sets_host_from_names_only():
    """The node job's host relabelling, applied as Prometheus does (anchored regexes, source labels joined by ';',
    an empty result removes the label): a name gives its first component, an IP address or localhost none, and a
    host label the target already has is kept."""
    (node,) = [job for job in load(PROM_CONFIG)["scrape_configs"] if job["job_name"] == "node"]

    def host(address: str, preset: str = "") -> str | None:
        labels = {"__address__": address, "host": preset}
        for rule in node["relabel_configs"]:
            value = ";".join(labels.get(name, "") for name in rule["source_labels"])
            m = re.fullmatch(rule["regex"], value)
            if m:
                labels[rule["target_label"]] = m.expand(re.sub(r"\$(\d)", r"\\\1", rule["replacement"]))
        return labels["host"] or None

    assert host("gpu01:9100") == "gpu01"
    assert host("gpu01.cluster.example.org:9100") == "gpu01"
    assert host("127.0.0.1:9100") is None
    assert host("10.1.2.3:9100") is None
    assert host("[::1]:9100") is None
    assert host("localhost:9100") is None
    assert host("127.0.0.1:9100", preset="login1") == "login1"
    assert host("gpu01:9100", preset="gpu07") == "gpu07"


def test_every_alert_has_a_firing_and_a_quiet_case():
    assert [group["name"] for group in load(RULES)["groups"]] == ["saepipe"]
    alert_rules = rules()
    names = [rule["alert"] for rule in alert_rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS)

    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description"):
            text = rule["annotations"][key]
            for label in ("run", "stage", "task"):
                assert "{{ $labels.%s }}" % label in text, (rule["alert"], key, label)

    firing, quiet = set(), set()
    for case in load(RULES_TEST)["tests"]:
        for check in case["alert_rule_test"]:
            expected = check.get("exp_alerts") or []
            if not expected:
                quiet.add(check["alertname"])
            for alert in expected:
                # a firing case names the exact labels and annotations
                assert {"severity", "run", "stage", "task", "instance"} <= set(alert["exp_labels"]), check
                assert set(alert["exp_annotations"]) == {"summary", "description"}, check
                firing.add(check["alertname"])
    assert firing == EXPECTED_ALERTS, EXPECTED_ALERTS - firing
    assert quiet == EXPECTED_ALERTS, EXPECTED_ALERTS - quiet


def test_alertmanager_route():
    config = load(AM_CONFIG)
    route = config["route"]
    assert route["receiver"] == "saepipe-webhook"
    assert route["group_by"] == ["alertname", "run", "stage", "task"]
    assert route["group_wait"] == "10s"
    (receiver,) = [r for r in config["receivers"] if r["name"] == "saepipe-webhook"]
    assert receiver["webhook_configs"] == [{"url": "http://127.0.0.1:9095/alerts", "send_resolved": True}]


# Where each host-networked service of the compose file takes its listen address.
LISTEN = {
    "prometheus": ("command", "--web.listen-address="),
    "alertmanager": ("command", "--web.listen-address="),
    "node-exporter": ("command", "--web.listen-address="),
    "dcgm-exporter": ("environment", "DCGM_EXPORTER_LISTEN"),
    "grafana": ("environment", "GF_SERVER_HTTP_ADDR"),
}


def compose_config(**env: str) -> dict:
    """`docker-compose config` of the monitoring compose file, with the SAEPIPE_* variables of this environment
    replaced by `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAEPIPE_")}
    result = run([tool("docker-compose"), "-f", str(COMPOSE), "config"], env={**clean, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def listen_address(name: str, service: dict) -> str:
    where, key = LISTEN[name]
    if where == "command":
        (arg,) = [a for a in service["command"] if a.startswith(key)]
        return arg[len(key):]
    return service["environment"][key]


def published_host_ips(service: dict) -> list[str]:
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip", ""))
        else:
            parts = str(port).split(":")
            ips.append(parts[0] if len(parts) == 3 else "")
    return ips


@pytest.mark.integration
def test_compose_file_parses_and_binds_to_loopback():
    services = compose_config()["services"]
    assert set(services) == set(LISTEN)
    for name, service in services.items():
        # every published port bound to 127.0.0.1 ...
        assert all(ip == "127.0.0.1" for ip in published_host_ips(service)), (name, service.get("ports"))
        # ... and a host-networked service (which publishes nothing) listens on 127.0.0.1 only
        if service.get("network_mode") == "host":
            assert "ports" not in service, name
            assert listen_address(name, service).startswith("127.0.0.1"), (name, listen_address(name, service))
    # prometheus.yml addresses alertmanager, node-exporter and dcgm-exporter at 127.0.0.1: they share its network
    for name in ("prometheus", "alertmanager", "node-exporter", "dcgm-exporter", "grafana"):
        assert services[name]["network_mode"] == "host", name

    opened = compose_config(SAEPIPE_BIND="0.0.0.0")["services"]
    for name, service in opened.items():
        assert listen_address(name, service).startswith("0.0.0.0"), name


@pytest.mark.integration
def test_compose_services():
    services = compose_config()["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert {"--config.file=/etc/prometheus/prometheus.yml", "--web.enable-lifecycle"} <= set(prometheus["command"])
    assert any(a.startswith("--storage.tsdb.path=") for a in prometheus["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus"] == str(PROM_DIR)
    assert mounts["/etc/prometheus/targets"] == str(REPO / "runs" / "prometheus-targets")
    elsewhere = compose_config(SAEPIPE_TARGETS_DIR="/scratch/saepipe/targets")["services"]["prometheus"]
    assert "/scratch/saepipe/targets:/etc/prometheus/targets:ro" in elsewhere["volumes"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    secret = compose_config(SAEPIPE_GRAFANA_ADMIN_PASSWORD="s3cret")["services"]["grafana"]
    assert secret["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    volumes = set(grafana["volumes"])
    assert f"{REPO}/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert f"{REPO}/monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes

    assert services["alertmanager"]["image"].startswith("prom/alertmanager")
    assert f"{REPO}/monitoring/alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"]
    assert services["node-exporter"]["image"].startswith("prom/node-exporter")
    assert services["node-exporter"]["pid"] == "host"
    assert services["dcgm-exporter"]["image"].startswith("nvcr.io/nvidia/k8s/dcgm-exporter")
    # only dcgm-exporter is behind a profile, so that it starts on GPU hosts only (--profile gpu)
    assert {name: s.get("profiles") for name, s in services.items() if s.get("profiles")} == {"dcgm-exporter": ["gpu"]}
