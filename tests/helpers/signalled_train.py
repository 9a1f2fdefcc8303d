"""`saepipe train` exactly as the CLI runs it, plus one SIGTERM that this process sends itself right after a given
step, so that an interruption lands at a known step and still goes through the CLI's real signal handling.

    python tests/helpers/signalled_train.py STEP[@RANK] CONFIG [key=value ...] [--resume]

With @RANK only that rank signals itself (under torchrun / accelerate launch); without it every rank does."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pipeline.train.trainer as trainer_module  # noqa: E402
from pipeline.cli.main import main  # noqa: E402


class SignalAfterStep:
    def __init__(self, step: int, rank: int | None) -> None:
        self.step, self.only_rank, self.rank = step, rank, None

    def on_setup(self, info: dict) -> None:
        self.rank = info["rank"]

    def on_step_end(self, step: int) -> None:
        if step == self.step and self.only_rank in (None, self.rank):
            os.kill(os.getpid(), signal.SIGTERM)


def install(spec: str) -> None:
    step, _, rank = spec.partition("@")
    callback = SignalAfterStep(int(step), int(rank) if rank else None)
    original = trainer_module.Trainer.__init__

    def with_signal(self, cfg, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), callback]
        original(self, cfg, **kwargs)

    trainer_module.Trainer.__init__ = with_signal


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(["train", *sys.argv[2:]]))
