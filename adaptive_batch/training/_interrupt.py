"""Ctrl-C for `fit`: the first SIGINT asks the loop to stop after the current step."""

from __future__ import annotations

import signal
import threading


class InterruptFlag:
    """While entered (in the main thread): the first SIGINT sets the flag, a second one
    raises KeyboardInterrupt as usual."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame):
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
