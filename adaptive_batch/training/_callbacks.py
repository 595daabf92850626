"""Callbacks of `fit`: what happens around the steps (progress bar, metrics file, ...).

A callback is any object with some of the methods of `Callback`; `fit` calls them on
process 0 only (under ``jax.distributed`` the other processes train and write nothing).
Each step's record reaches ``on_step`` complete (loss and the other device values
read), in order, at most ``log_every`` steps after the step ran.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from adaptive_batch.training._checkpoint import strict_json


@dataclasses.dataclass(frozen=True)
class FitStart:
    """What ``on_start`` is told.

    Attributes:
      resumed_step: the step of the checkpoint the run continues from (0: a new run).
        Records of later steps that an earlier, interrupted run already reported are
        reported again.
      max_steps, max_examples: the budget (``math.inf`` where not given).
      history: the records so far (those of the checkpoint when resuming).
    """

    resumed_step: int
    max_steps: float
    max_examples: float
    history: Any


class Callback:
    """Base class of `fit`'s callbacks; every method is optional and does nothing here.

    Example:
      >>> class PrintLoss(Callback):
      ...     def on_step(self, record):
      ...         if record["step"] % 100 == 0:
      ...             print(record["step"], record["loss"])
    """

    def on_start(self, start: FitStart) -> None:
        """Before the first step (after restoring a checkpoint when resuming)."""

    def on_step(self, record: dict[str, Any]) -> None:
        """One step's record (``step``, ``examples``, ``batch_size``, ``padded_size``,
        ``suggested_batch_size``, ``learning_rate``, ``loss``, ``wall_time``,
        ``skipped_steps``, ...; evaluation results on an evaluation step)."""

    def on_eval(self, record: dict[str, Any]) -> None:
        """After an evaluation: ``step``, ``examples``, ``wall_time`` and its results."""

    def on_end(self, result: Any) -> None:
        """After the last step (also when stopped by Ctrl-C or non-finite steps): the
        `FitResult`."""


class ProgressBar(Callback):
    """A tqdm bar advanced by examples (or steps when the budget is in steps), with the
    batch size and loss; evaluations are printed above it.

    The rate and the time left count from the first step reported on: that step
    includes compiling, from which tqdm would foresee hours (the time left shows "?"
    until the next). The last batch of an examples budget is what was left of the
    budget; when it is smaller than the step before, it is marked "(last: rest of
    budget)", as the method did not choose it.
    """

    def __init__(self, description: str | None = None, file: Any = None):
        self.description, self.file = description, file
        self._bar = None

    def on_start(self, start: FitStart) -> None:
        by_examples = start.max_examples < math.inf
        total = start.max_examples if by_examples else start.max_steps
        done = start.history.steps[-1] if start.history.steps else {}
        self._by_examples, self._max_examples = by_examples, start.max_examples
        self._last_batch = done.get("batch_size")
        self._bar = _tqdm_from_second_step()(
            total=int(total), initial=int(done.get("examples" if by_examples else "step", 0)),
            unit="ex" if by_examples else "step", unit_scale=by_examples, dynamic_ncols=True,
            desc=self.description, file=self.file, mininterval=0.5,
        )  # fmt: skip

    def on_step(self, record: dict[str, Any]) -> None:
        bar = self._bar
        bar.update(record["examples" if self._by_examples else "step"] - bar.n)
        if bar.clock is None:
            bar.clock = (bar.n, bar._time())
        batch_size = record["batch_size"]
        batch = f"{batch_size}/{record['padded_size']}"
        last = self._by_examples and record["examples"] >= self._max_examples
        if last and self._last_batch is not None and batch_size < self._last_batch:
            batch += " (last: rest of budget)"
        self._last_batch = batch_size
        postfix = {"batch": batch}
        if "loss" in record:
            postfix["loss"] = _fmt(record["loss"])
        if record.get("wall_time"):  # tqdm's own rate would count evaluation pauses
            postfix["ex/s"] = f"{record['examples'] / record['wall_time']:.0f}"
        bar.set_postfix(postfix, refresh=False)

    def on_eval(self, record: dict[str, Any]) -> None:
        results = {k: v for k, v in record.items() if k not in ("step", "examples", "wall_time")}
        self._bar.write(f"step {record['step']}: " + ", ".join(
            f"{k}={_fmt(v)}" for k, v in results.items()))  # fmt: skip

    def on_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()


@functools.cache
def _tqdm_from_second_step():
    """tqdm (console or notebook) whose rate, and so its time left, counts from
    ``clock`` = (count, time) on; "?" before."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        clock: tuple[float, float] | None = None

        @property
        def format_dict(self):
            values = super().format_dict
            rate = 0.0  # tqdm shows "?" for a zero rate
            if self.clock is not None:
                done, elapsed = self.n - self.clock[0], self._time() - self.clock[1]
                if done > 0 and elapsed > 0:
                    rate = done / elapsed
            values["rate"] = rate
            return values

    return Bar


class MetricsWriter(Callback):
    """Writes each step's record to a JSON Lines file, one strict-JSON object per line.

    Non-finite numbers become ``null`` (JSON has no NaN), with the names of those
    fields in ``"non_finite"``. Each line goes to the file whole, unbuffered, so a crash
    leaves whole lines; a failed write (a full disk) is cut back to the last whole line
    before the error goes on. When `fit` resumes from step s, the file is written anew
    from the checkpoint's history (steps 1 to s), so it holds each step exactly once, as
    a run never stopped would have written it.

    Args:
      path: the ``.jsonl`` file (created, or continued when resuming).
      extra: fields added to every line where the record lacks them (e.g. the
        configured ``learning_rate`` of an optimizer that does not expose one).
    """

    def __init__(self, path: str | Path, extra: dict[str, Any] | None = None):
        self.path = Path(path)
        self.extra = dict(extra or {})
        self._file = None
        self._size = 0  # bytes of whole lines in the file

    def on_start(self, start: FitStart) -> None:
        records = start.history.steps if start.resumed_step else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(to_json_line({**self.extra, **r}) + "\n" for r in records))
        except OSError as error:  # a full disk: leave no half-written .tmp behind
            tmp.unlink(missing_ok=True)
            error.filename = error.filename or str(tmp)
            raise
        os.replace(tmp, self.path)
        # Unbuffered: no Python buffer that would write a cut line again at close.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in on_end)
        self._size = self._file.tell()

    def on_step(self, record: dict[str, Any]) -> None:
        line = memoryview((to_json_line({**self.extra, **record}) + "\n").encode())
        try:
            while line:  # a raw write may take part of the bytes (a disk filling up)
                line = line[self._file.write(line) :]
        except OSError as error:
            # A cut last line would break whoever reads the file next (and --resume).
            self._file.truncate(self._size)
            self.on_end(None)
            error.filename = error.filename or str(self.path)  # a failed write names none
            raise
        self._size = self._file.tell()

    def on_end(self, result: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def to_json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line; the names of fields that were non-finite in ``"non_finite"``."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    row = strict_json(record)
    if bad:
        row["non_finite"] = bad
    return json.dumps(row, allow_nan=False)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
