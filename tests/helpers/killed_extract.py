"""`saepipe extract` exactly as the CLI runs it, SIGKILLed by itself at one step of one shard's write.

    python tests/helpers/killed_extract.py PHASE:SHARD CONFIG [key=value ...]

PHASE is one of pipeline.store.WRITE_PHASES; SIGKILL runs no handler and flushes nothing, like a node that dies."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pipeline.extract.runner as runner_module  # noqa: E402
from pipeline.cli.main import main  # noqa: E402


class KillAt:
    def __init__(self, spec: str) -> None:
        self.spec = spec

    def on_write_phase(self, phase: str, index: int) -> None:
        if f"{phase}:{index}" == self.spec:
            os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    original = runner_module.ExtractionRunner.__init__

    def with_kill(self, cfg, loaded=None, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), KillAt(spec)]
        original(self, cfg, loaded, **kwargs)

    runner_module.ExtractionRunner.__init__ = with_kill


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(["extract", *sys.argv[2:]]))
