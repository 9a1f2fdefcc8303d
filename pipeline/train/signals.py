"""Preemption signals. The handler only sets a flag: the trainer checkpoints at the next step boundary and exits with
EXIT_PREEMPTED, so a scheduler wrapper can tell "checkpointed, requeue me" apart from success (0) and failure.

Slurm sends SIGTERM on `scontrol requeue` / preemption and the `--signal` signal (submitit uses SIGUSR2) before the
time limit; SIGUSR1 is the other common choice. All three are handled the same way."""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Relaunch with --resume.
EXIT_PREEMPTED = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Tests only: "STEP" makes every rank send itself SIGTERM right after that step, "STEP@RANK" only that rank, so an
# interruption lands at a known step and still goes through the real handler.
SIGNAL_AT_STEP_ENV = "SAEPIPE_SIGNAL_AT_STEP"


class PreemptionFlag:
    """Installs the handlers on enter and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        # Nothing but a flag: the handler may run in the middle of an optimiser step.
        self.signum = signum

    def __enter__(self) -> "PreemptionFlag":
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_at_step_from_env() -> tuple[int, int | None] | None:
    """(step, rank or None for every rank) from SAEPIPE_SIGNAL_AT_STEP, or None when unset."""
    raw = os.environ.get(SIGNAL_AT_STEP_ENV)
    if not raw:
        return None
    step, _, rank = raw.partition("@")
    return int(step), (int(rank) if rank else None)


def send_test_signal(step: int, rank: int, target: tuple[int, int | None] | None) -> None:
    if target is not None and step == target[0] and target[1] in (None, rank):
        log.info("%s: rank %d sends itself SIGTERM after step %d", SIGNAL_AT_STEP_ENV, rank, step)
        os.kill(os.getpid(), signal.SIGTERM)
