"""`Prefetcher`: builds requested batches in order on a background thread.

Jobs go in an unbounded queue (a job is a few ints); finished batches come out of a
queue bounded to ``depth``, so at most ``depth`` batches wait in memory and the thread
blocks when the consumer falls behind. The thread holds no reference to the loader,
so a forgotten loader is still garbage-collected, and its finalizer stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.05  # how often a blocked thread checks whether it was told to stop


class _Failure:
    """An exception raised while building a batch, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def _work(build: Callable[..., Any], jobs: queue.Queue, results: queue.Queue, stop) -> None:
    while not stop.is_set():
        job = jobs.get()
        if job is None:
            return
        try:
            result = build(*job)
        except BaseException as error:  # handed to the consumer, re-raised there
            result = _Failure(error)
        while not stop.is_set():
            try:
                results.put(result, timeout=_POLL_S)
                break
            except queue.Full:
                pass


class Prefetcher:
    """Runs ``build(*job)`` for each submitted job on one thread; results in order."""

    def __init__(self, build: Callable[..., Any], depth: int):
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_work,
            args=(build, self._jobs, self._results, self._stop),
            name="adaptive_batch-prefetch",
            daemon=True,  # never keeps the interpreter alive; close() is the clean stop
        )
        self._thread.start()

    def submit(self, *job: Any) -> None:
        self._jobs.put(job)

    def result(self) -> Any:
        """The next result in submission order; re-raises the job's exception."""
        while True:
            try:
                result = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        "the prefetch thread stopped; the loader was closed."
                    ) from None
        if isinstance(result, _Failure):
            raise result.error
        return result

    def close(self) -> None:
        """Stop the thread and drop unfinished work; waits for the current job to end."""
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()
