"""The seams through which orchestration and telemetry wrap a stage without reaching into it: a stop condition the
stage polls at safe points, and callbacks it fires with its metrics and events.

A stage takes `stop: StopCondition` and `callbacks: Sequence[object]`; each callback implements whichever of the
stage's event methods it cares about (see pipeline.train.callbacks and pipeline.extract.callbacks for the names).
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol, Sequence, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class StopCondition(Protocol):
    def should_stop(self) -> bool:
        """True once the stage should commit what it has and return (preemption, time limit, a user's request)."""


class NeverStop:
    def should_stop(self) -> bool:
        return False


class StopFlag:
    """A stop condition that something else sets: a signal handler, another thread, a test."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signum: int | None = None  # the signal that set it, if one did

    def set(self, reason: str = "stop requested", signum: int | None = None) -> None:
        # Nothing but a flag and a string: this may run inside a signal handler, mid-step.
        if self.reason is None:
            self.reason, self.signum = reason, signum
        self._event.set()

    def should_stop(self) -> bool:
        return self._event.is_set()


class Callbacks:
    """Fan-out of one event to every callback that implements it. A callback that raises is logged (its traceback
    once, then one line per failure) and the stage goes on: a broken exporter must not kill a multi-day run."""

    def __init__(self, callbacks: Sequence[object] = ()) -> None:
        self.callbacks = list(callbacks)
        self._failed: set[tuple[int, str]] = set()

    def append(self, callback: object) -> None:
        self.callbacks.append(callback)

    def fire(self, event: str, *args, **kwargs) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is None:
                continue
            try:
                method(*args, **kwargs)
            except Exception as err:
                key = (id(cb), event)
                if key in self._failed:
                    log.warning("callback %r.%s failed again: %r", cb, event, err)
                else:
                    self._failed.add(key)
                    log.exception("callback %r.%s failed", cb, event)
