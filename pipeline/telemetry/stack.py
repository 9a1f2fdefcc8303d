"""`saepipe monitor up|down|status`: a local Prometheus, Alertmanager and node-exporter (Debian's binaries) on
loopback with the project's configs (monitoring/), for users without Docker, and for the tests.

`up` installs the Debian packages that are missing (as root; otherwise it says which to install), writes the
configs into a state directory (the committed monitoring/prometheus/prometheus.yml with this machine's targets
directory, rule files, ports and intervals filled in; monitoring/alertmanager/alertmanager.yml with the webhook),
starts the three daemons with pid files and waits until each answers. It is idempotent: daemons already running are
reloaded with the new configs. `down` stops what `up` started, by pid file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import SaepipeError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.io.service import wait_answering

from .discovery import list_targets, sweep_stale
from .labels import short_host

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
RULES_DIR = MONITORING / "prometheus" / "rules"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
BINARIES = {"prometheus": "prometheus", "alertmanager": "prometheus-alertmanager",
            "node-exporter": "prometheus-node-exporter"}
PACKAGES = ["prometheus", "prometheus-alertmanager", "prometheus-node-exporter"]


class MonitorError(SaepipeError):
    pass


@dataclass
class StackSettings:
    state_dir: str
    targets_dir: str
    bind: str = "127.0.0.1"
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    node_exporter_port: int = 9100
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    extra_rules: list[str] = field(default_factory=list)
    webhook: str | None = None  # replaces the receiver's URL
    group_wait: str | None = None  # replaces the route's group_wait (tests: 1s)

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.bind}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.bind}:{self.alertmanager_port}"


def ensure_binaries() -> dict[str, str]:
    found = {name: shutil.which(binary) for name, binary in BINARIES.items()}
    missing = [BINARIES[n] for n, path in found.items() if path is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise MonitorError(f"missing {', '.join(missing)}: install them (`sudo apt-get install {' '.join(PACKAGES)}`)"
                               " or run `saepipe monitor up` as root")
        log.info("installing %s", " ".join(PACKAGES))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # policy-rc.d: the packages' scripts must not start their own daemons; this command starts its own
        policy = Path("/usr/sbin/policy-rc.d")
        had_policy = policy.exists()
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as err:
            raise MonitorError(f"apt-get failed ({err}); install {' '.join(PACKAGES)} by hand") from None
        finally:
            if not had_policy:
                policy.unlink(missing_ok=True)
        found = {name: shutil.which(binary) for name, binary in BINARIES.items()}
    return found  # type: ignore[return-value]


def render_prometheus_config(s: StackSettings) -> dict:
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg.setdefault("global", {}).update(scrape_interval=s.scrape_interval, evaluation_interval=s.evaluation_interval)
    targets = str(Path(s.targets_dir).expanduser().absolute() / "*.json")
    own = {"node": f"{s.bind}:{s.node_exporter_port}", "prometheus": f"{s.bind}:{s.prometheus_port}"}
    for job in cfg.get("scrape_configs", []):
        name = job.get("job_name")
        if name == "saepipe":
            for sd in job.get("file_sd_configs", []):
                sd["files"] = [targets]
        elif name in own:
            static = {**(job.get("static_configs") or [{}])[0], "targets": [own[name]]}
            if name == "node":  # a loopback address names no host: say which, so node series join on `host`
                static["labels"] = {**static.get("labels", {}), "host": short_host()}
            job["static_configs"] = [static]
    cfg["rule_files"] = [str(p) for p in sorted(RULES_DIR.glob("*.rules.yml"))] + [str(Path(r).absolute()) for r in s.extra_rules]
    cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [f"{s.bind}:{s.alertmanager_port}"]}]}]}
    return cfg


def render_alertmanager_config(s: StackSettings) -> dict:
    cfg = yaml.safe_load(ALERTMANAGER_YML.read_text())
    if s.group_wait:
        cfg.setdefault("route", {})["group_wait"] = s.group_wait
        cfg["route"]["group_interval"] = s.group_wait
    if s.webhook:
        for receiver in cfg.get("receivers", []):
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = s.webhook
    return cfg


def _pid_file(s: StackSettings, name: str) -> Path:
    return Path(s.state_dir) / "run" / f"{name}.pid"


def _running(s: StackSettings, name: str) -> int | None:
    try:
        pid = int(_pid_file(s, name).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _commands(s: StackSettings, binaries: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    state = Path(s.state_dir)
    return {
        "prometheus": ([binaries["prometheus"], f"--config.file={state / 'prometheus.yml'}",
                        f"--storage.tsdb.path={state / 'data' / 'prometheus'}",
                        f"--web.listen-address={s.bind}:{s.prometheus_port}", "--web.enable-lifecycle"],
                       f"{s.prometheus_url}/-/ready"),
        # --cluster.listen-address= turns off the HA gossip port, which would listen on every interface
        "alertmanager": ([binaries["alertmanager"], f"--config.file={state / 'alertmanager.yml'}",
                          f"--storage.path={state / 'data' / 'alertmanager'}",
                          f"--web.listen-address={s.bind}:{s.alertmanager_port}", "--cluster.listen-address="],
                         f"{s.alertmanager_url}/-/ready"),
        "node-exporter": ([binaries["node-exporter"], f"--web.listen-address={s.bind}:{s.node_exporter_port}"],
                          f"http://{s.bind}:{s.node_exporter_port}/metrics"),
    }


def up(s: StackSettings, timeout_s: float = 30.0) -> dict:
    binaries = ensure_binaries()
    state = Path(s.state_dir)
    for sub in ("run", "log", "data/prometheus", "data/alertmanager"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    Path(s.targets_dir).expanduser().mkdir(parents=True, exist_ok=True)
    atomic_write_text(state / "prometheus.yml", yaml.safe_dump(render_prometheus_config(s), sort_keys=False))
    atomic_write_text(state / "alertmanager.yml", yaml.safe_dump(render_alertmanager_config(s), sort_keys=False))
    sweep_stale(s.targets_dir, 300.0)
    for name, (argv, ready) in _commands(s, binaries).items():
        pid = _running(s, name)
        if pid is not None:
            if name in ("prometheus", "alertmanager"):  # pick up the configs just written
                urllib.request.urlopen(urllib.request.Request(ready.replace("/-/ready", "/-/reload"), method="POST"),
                                       timeout=5).close()
            continue
        with open(state / "log" / f"{name}.log", "ab") as logfile:
            proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        atomic_write_text(_pid_file(s, name), str(proc.pid))
        why = wait_answering(proc, ready, timeout_s, state / "log" / f"{name}.log")
        if why is not None:
            raise MonitorError(f"{name} did not come up ({why}); log: {state / 'log' / f'{name}.log'}")
    atomic_write_json(state / "stack.json", asdict(s))
    return status(s)


def down(s: StackSettings, timeout_s: float = 10.0) -> list[str]:
    stopped = []
    for name in BINARIES:
        pid = _running(s, name)
        if pid is None:
            _pid_file(s, name).unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        _pid_file(s, name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def status(s: StackSettings) -> dict:
    out = {"state_dir": s.state_dir, "targets_dir": s.targets_dir, "prometheus": s.prometheus_url,
           "alertmanager": s.alertmanager_url, "daemons": {}, "targets": list_targets(s.targets_dir)}
    for name in BINARIES:
        out["daemons"][name] = {"pid": _running(s, name)}
    if _running(s, "prometheus"):
        try:
            with urllib.request.urlopen(f"{s.prometheus_url}/api/v1/alerts", timeout=2) as r:
                alerts = json.load(r)["data"]["alerts"]
            out["alerts"] = [{"name": a["labels"].get("alertname"), "state": a["state"],
                              "labels": {k: v for k, v in a["labels"].items() if k != "alertname"}} for a in alerts]
        except (OSError, ValueError, KeyError):
            out["alerts"] = None
    return out


def load_settings(state_dir: str) -> StackSettings | None:
    path = Path(state_dir) / "stack.json"
    try:
        return StackSettings(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
