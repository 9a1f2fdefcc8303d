"""The `telemetry:` section of extraction and training configs: the job's Prometheus exporter (pipeline.telemetry)
and where it announces itself for file-based discovery."""
from __future__ import annotations

import os

from pydantic import Field, model_validator

from .strict import Strict

DEFAULT_TARGETS_DIR = "~/.saepipe/prometheus-targets"


def default_targets_dir() -> str:
    return os.environ.get("SAEPIPE_TARGETS_DIR", DEFAULT_TARGETS_DIR)


def default_grace_s() -> float:
    return float(os.environ.get("SAEPIPE_TELEMETRY_GRACE_S", "20"))


class TelemetryConfig(Strict):
    enabled: bool = Field(default=True, description="run a Prometheus exporter in every job (every rank)")
    bind_address: str = Field(default="127.0.0.1", description=(
        "address the exporter listens on; loopback by default. On a cluster set the node's address (or 0.0.0.0) "
        "so that a Prometheus on another host can scrape it"))
    advertise_address: str | None = Field(default=None, description=(
        "address written into the discovery target; unset: bind_address, or the host's name when bind_address is "
        "0.0.0.0"))
    port_range: tuple[int, int] = Field(default=(9800, 9899), description=(
        "ports tried in order until one is free (8 jobs on one node get 8 ports)"))
    targets_dir: str | None = Field(default=None, description=(
        "directory of Prometheus file_sd targets, shared by the jobs and Prometheus (on a cluster: a shared file "
        "system); default $SAEPIPE_TARGETS_DIR or ~/.saepipe/prometheus-targets"))
    grace_s: float | None = Field(default=None, ge=0, description=(
        "seconds a finished job keeps serving before it removes its target, so that the last scrapes land (more "
        "than Prometheus's scrape interval); default $SAEPIPE_TELEMETRY_GRACE_S or 20"))
    stale_after_s: float = Field(default=300.0, gt=0, description=(
        "a target whose job stopped refreshing it this long ago (another host), or whose process is gone (this "
        "host), is removed by the next exporter or `saepipe monitor`"))
    heartbeat_s: float = Field(default=30.0, gt=0, description="how often a job refreshes its target file")
    gpu: bool = Field(default=True, description="GPU metrics through NVML where a GPU and its driver are present")
    run_name: str | None = Field(default=None, description=(
        "the `run` label; unset: the last component of store.root (extraction) or run_dir (training)"))

    @model_validator(mode="after")
    def _ports(self) -> "TelemetryConfig":
        lo, hi = self.port_range
        if not (0 < lo <= hi < 65536):
            raise ValueError(f"port_range {list(self.port_range)} must be two ports, low then high")
        return self

    @property
    def targets(self) -> str:
        """The targets directory, resolved: the setting, else $SAEPIPE_TARGETS_DIR, else ~/.saepipe/prometheus-targets."""
        return os.path.expanduser(self.targets_dir or default_targets_dir())

    @property
    def grace(self) -> float:
        return self.grace_s if self.grace_s is not None else default_grace_s()
