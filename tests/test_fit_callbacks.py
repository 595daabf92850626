"""`EvalSchedule`, `MetricsWriter` (strict JSON, resume truncation, a cut last line, a
full disk), `ProgressBar` (time left, the budget's last batch) and the callback order of
`fit`."""

from __future__ import annotations

import errno
import io
import itertools
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_batch as ab
from adaptive_batch.training import (
    Callback,
    EvalSchedule,
    FitStart,
    History,
    MetricsWriter,
    ProgressBar,
)


def test_schedule_by_steps_examples_and_powers_of_two():
    by_examples = EvalSchedule(examples=100)
    seen = [0, 30, 99, 100, 150, 250, 260, 401]
    pairs = enumerate(itertools.pairwise(seen), 1)
    due = [s for s, (a, b) in pairs if by_examples.due(s, a, b)]
    assert due == [3, 5, 7]  # crossing 100; 200 (150 -> 250); 300 and 400 in one step
    assert [s for s in range(1, 20) if EvalSchedule(steps=6).due(s, 0, 0)] == [6, 12, 18]
    powers = EvalSchedule(powers_of_two=True)
    assert [s for s in range(1, 40) if powers.due(s, 0, 0)] == [1, 2, 4, 8, 16, 32]
    assert not EvalSchedule().due(1, 0, 10**6)
    with pytest.raises(ValueError, match="examples must be an integer >= 1, got 0"):
        EvalSchedule(examples=0)


def test_metrics_writer_is_strict_and_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, extra={"learning_rate": 0.1})
    writer.on_start(FitStart(0, math.inf, 100, History()))
    for step in range(1, 6):
        writer.on_step({"step": step, "loss": math.nan if step == 3 else 0.5, "x": np.float32(2)})
    writer.on_end(None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] is None and rows[2]["non_finite"] == ["loss"]
    assert rows[0]["learning_rate"] == 0.1 and rows[0]["x"] == 2.0
    assert "NaN" not in path.read_text()
    # A crash cut the last line in half; the run resumes from the checkpoint of step 3,
    # whose history holds steps 1 to 3.
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')
    writer = MetricsWriter(path)
    history = History(steps=[{"step": s, "loss": 0.5} for s in (1, 2, 3)])
    writer.on_start(FitStart(3, math.inf, 100, history))
    writer.on_step({"step": 4, "loss": 0.25})
    writer.on_end(None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_start(self, start):
        self.calls.append(("start", start.resumed_step))

    def on_step(self, record):
        self.calls.append(("step", record["step"], "loss" in record, "w0" in record))

    def on_eval(self, record):
        self.calls.append(("eval", record["step"]))

    def on_end(self, result):
        self.calls.append(("end", result.steps))


def test_callbacks_see_complete_records_in_order():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    data = {"x": x, "y": x[:, 0]}
    tx = ab.cabs(0.05, min_batch_size=4, max_batch_size=16)
    step = ab.make_train_step(lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2, tx)
    w = jnp.zeros(3)
    recorder = Recorder()
    ab.fit(step, (w, tx.init(w)), data, ab.BatchSizeController(4, 16), steps=7,
           eval_fn=lambda s: {"w0": s[0][0]}, eval_every=3, log_every=4,
           callbacks=[recorder], progress=False)  # fmt: skip
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, 8)) and all(c[2] for c in steps)
    assert [c[1] for c in steps if c[3]] == [3, 6, 7]  # eval results in those records
    assert recorder.calls[0] == ("start", 0) and recorder.calls[-1] == ("end", 7)
    assert [c[1] for c in recorder.calls if c[0] == "eval"] == [3, 6, 7]
    # Each evaluation comes right after its step's record.
    for i, call in enumerate(recorder.calls):
        if call[0] == "eval":
            assert recorder.calls[i - 1][:2] == ("step", call[1])


def test_metrics_writer_cuts_a_failed_write_back_to_whole_lines(tmp_path):
    """Injected: a full disk writes part of a line, then raises OSError(ENOSPC)."""

    class DiskFull:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:9])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.on_start(FitStart(0, math.inf, 100, History()))
    writer.on_step({"step": 1, "loss": 0.5})
    writer._file = DiskFull(writer._file)
    with pytest.raises(OSError, match="No space left") as failed:
        writer.on_step({"step": 2, "loss": 0.25})
    writer.on_end(None)  # closing the file (at exit at the latest) writes no more of it
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    assert failed.value.filename == str(path)  # the command's one line names the file


def _bar(monkeypatch, clock, max_examples=1000, history=None):
    """A ProgressBar into a string, on the fake ``clock`` (a one-element list)."""
    import tqdm.std

    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    bar = ProgressBar("t", file=io.StringIO())
    bar.on_start(FitStart(0, math.inf, max_examples, history or History()))
    return bar


def _record(step, examples, batch_size, padded_size=None):
    return {"step": step, "examples": examples, "batch_size": batch_size,
            "padded_size": padded_size or batch_size, "loss": 1.0}  # fmt: skip


def test_progress_bar_time_left_counts_from_the_second_step(monkeypatch):
    clock = [0.0]
    bar = _bar(monkeypatch, clock)
    clock[0] = 100.0  # the first step compiles: tqdm foresaw 1:42:30 from it
    bar.on_step(_record(1, 16, 16))
    assert "<?," in str(bar._bar)
    clock[0] = 101.0  # 16 examples a second from here: 968 left take a minute
    bar.on_step(_record(2, 32, 16))
    assert "<01:00," in str(bar._bar)
    bar.on_end(None)


def test_progress_bar_marks_the_budgets_last_batch(monkeypatch):
    clock = [0.0]
    bar = _bar(monkeypatch, clock, max_examples=100)
    for step, (examples, size) in enumerate([(32, 32), (64, 32), (96, 32)], 1):
        bar.on_step(_record(step, examples, size, 64))
        assert bar._bar.postfix.startswith(f"batch={size}/64,")
    bar.on_step(_record(4, 100, 4, 64))  # what was left of the budget, below the minimum
    assert bar._bar.postfix.startswith("batch=4/64 (last: rest of budget),")
    bar.on_end(None)
