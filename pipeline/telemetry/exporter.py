"""One job's Prometheus exporter: a prometheus-client HTTP server on the first free port of a range, its own
registry (the stage's metrics plus host, process and GPU collectors), and its discovery target, kept fresh by a
heartbeat thread that also sweeps other jobs' stale targets.

    exporter = Exporter(cfg.telemetry, labels, watch_path=run_dir).start()
    ...                                   # the stage's callbacks update exporter.registry's metrics
    exporter.close(grace=True)            # serve `grace_s` more, so the last scrapes land; then unannounce
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics, start_http_server

from pipeline.config.telemetry import TelemetryConfig

from .discovery import TargetFile, sweep_stale
from .labels import short_host
from .system import GPUCollector, HostCollector

log = logging.getLogger(__name__)

# `<counter>_created` series double what Prometheus stores and no dashboard or rule here reads them.
disable_created_metrics()


def serve_on_free_port(registry: CollectorRegistry, address: str, port_range: tuple[int, int]):
    """(server, thread, port) on the first port of the range that binds; a clear error when none does."""
    lo, hi = port_range
    last: OSError | None = None
    for port in range(lo, hi + 1):
        try:
            server, thread = start_http_server(port, addr=address, registry=registry)
            return server, thread, port
        except OSError as err:  # taken by another job on this node: try the next
            last = err
    raise OSError(f"telemetry: no free port in {lo}-{hi} on {address} ({last}); widen telemetry.port_range")


class Exporter:
    def __init__(self, cfg: TelemetryConfig, labels: dict[str, str], *, watch_path: str, extra_info: dict | None = None,
                 stop=None) -> None:
        self.cfg, self.labels = cfg, labels
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(HostCollector(watch_path))
        self.gpu = GPUCollector() if cfg.gpu else None
        if self.gpu is not None:
            self.registry.register(self.gpu)
        info = Gauge("saepipe_job_info", "Who this job is (always 1); its labels name the run, stage and task.",
                     [*labels, *(extra_info or {})], registry=self.registry)
        info.labels(**labels, **{k: str(v) for k, v in (extra_info or {}).items()}).set(1)
        Gauge("saepipe_job_start_time_seconds", "When this job's exporter started (unix time).",
              registry=self.registry).set(time.time())
        self._stop_condition = stop  # a stop request (SIGTERM...) ends the grace period early
        self._closed = threading.Event()
        self.server = self.thread = self.port = self.target = None
        self._heartbeat: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._advertised()}:{self.port}/metrics"

    def _advertised(self) -> str:
        if self.cfg.advertise_address:
            return self.cfg.advertise_address
        return short_host() if self.cfg.bind_address in ("0.0.0.0", "::") else self.cfg.bind_address

    def start(self) -> "Exporter":
        self.server, self.thread, self.port = serve_on_free_port(self.registry, self.cfg.bind_address, self.cfg.port_range)
        sweep_stale(self.cfg.targets, self.cfg.stale_after_s)
        self.target = TargetFile(self.cfg.targets, self._advertised(), self.port, self.labels)
        self.target.write()
        self._heartbeat = threading.Thread(target=self._beat, name="telemetry-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("telemetry: metrics on %s (target %s)", self.url, self.target.path)
        return self

    def _beat(self) -> None:
        while not self._closed.wait(self.cfg.heartbeat_s):
            try:
                self.target.refresh()
                sweep_stale(self.cfg.targets, self.cfg.stale_after_s)
            except OSError as err:  # a shared file system hiccup must not end the job
                log.warning("telemetry: heartbeat failed: %s", err)

    def close(self, grace: bool = True) -> None:
        """Serve `grace_s` more seconds (unless a stop was requested), then remove the target and stop serving."""
        if self.server is None or self._closed.is_set():
            return
        if grace and self.cfg.grace > 0:
            deadline = time.monotonic() + self.cfg.grace
            while time.monotonic() < deadline:
                if self._stop_condition is not None and self._stop_condition.should_stop():
                    break
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self._closed.set()
        self.target.remove()
        self.server.shutdown()
        self.server.server_close()
        log.info("telemetry: exporter on port %d closed", self.port)
