"""A real Prometheus + Alertmanager + node-exporter for the tests, started with `saepipe monitor up` on free
loopback ports, scraping every second, with a webhook receiver the test runs. Skips (a failure under CI) where
the Debian binaries are missing and cannot be installed."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, running_under_ci


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webhook:
    """Alertmanager's webhook receiver: records every POSTed payload."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        received = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class Stack:
    def __init__(self, root: Path, extra_rules: list[Path]) -> None:
        self.root = root
        self.targets = root / "targets"
        self.webhook = Webhook()
        self.prom_port, self.am_port, self.node_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.prom_port}"
        self.args = ["--state-dir", str(root / "state"), "--targets-dir", str(self.targets),
                     "--prometheus-port", str(self.prom_port), "--alertmanager-port", str(self.am_port),
                     "--node-exporter-port", str(self.node_port), "--scrape-interval", "1s",
                     "--evaluation-interval", "1s", "--webhook", self.webhook.url, "--group-wait", "1s",
                     *[a for r in extra_rules for a in ("--rules", str(r))]]

    def monitor(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli.main", "monitor", action, *self.args],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode()[:500]}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout: float, what: str) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({expr})")


def start_stack(root: Path, extra_rules: list[Path]) -> Stack:
    needed = ["prometheus", "prometheus-alertmanager", "prometheus-node-exporter"]
    if not all(shutil.which(b) for b in needed) and not (running_under_ci() or os.geteuid() == 0):
        pytest.skip(f"no local Prometheus stack: install {' '.join(needed)} (saepipe monitor up does, as root)")
    stack = Stack(root, extra_rules)
    up = stack.monitor("up")
    if up.returncode != 0:
        raise RuntimeError(f"saepipe monitor up failed:\n{up.stdout}\n{up.stderr[-3000:]}")
    return stack
