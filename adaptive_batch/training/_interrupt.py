"""Ctrl-C and SIGTERM for `fit`: the first signal asks the loop to stop after the
current step (with a checkpoint), so a run interrupted by hand or preempted by a
scheduler can resume."""

from __future__ import annotations

import signal
import threading

#: The signals `fit` handles, and the ``FitResult.stopped`` each gives.
STOPPED_BY = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class InterruptFlag:
    """While entered (in the main thread): the first SIGINT or SIGTERM sets the flag;
    a second one raises ``KeyboardInterrupt`` (SIGINT) or ``SystemExit`` (SIGTERM) at
    once, as without the flag."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self.signal: int | None = None  # the first signal received

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def stopped(self) -> str:
        """``FitResult.stopped`` for the signal received."""
        return STOPPED_BY[self.signal]

    def _handle(self, signum, frame):
        if self._event.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signal = signum
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOPPED_BY:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
