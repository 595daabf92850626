"""The command's traps (issue 28): options it would ignore or fail on with a traceback,
an --out it cannot write, a disk that fills up during the run, and plots that misread
the last batch or leave an axis unreadable."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _cli import main_in_process

from adaptive_batch.cli import _plots
from adaptive_batch.training import MetricsWriter

TINY = ["--dataset", "synthetic", "--model", "logreg", "--examples", "200", "--evals", "2",
        "--min-batch-size", "8", "--max-batch-size", "64", "--no-progress"]  # fmt: skip


def _run(argv, capsys):
    try:
        code = main_in_process(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("method", ["cabs", "norm-test"])
def test_batch_size_of_an_adaptive_method_is_refused(method, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(["train", *TINY, "--method", method, "--batch-size", "32",
                         "--out", str(out)], capsys)  # fmt: skip
    assert code == 2
    line = _one_line(err)
    assert "--batch-size sets the constant batch of the baselines (sgd, adagrad, " in line
    assert f"{method} chooses its own, starting at --min-batch-size" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--max-batch-size", "2147483648"], "--max-batch-size 2147483648 is above"),
        (["--method", "sgd", "--batch-size", "1099511627776"], "--batch-size 1099511627776"),
        (["--min-batch-size", str(2**30 + 1), "--max-batch-size", str(2**31)],
         f"--min-batch-size {2**30 + 1} is above"),
    ],
)  # fmt: skip
def test_batch_sizes_above_2_to_30_are_refused_with_the_range(argv, says, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(["train", *argv, "--out", str(out)], capsys)
    assert code == 2
    line = _one_line(err)
    assert says in line and "[1, 1073741824] (2**30)" in line
    assert not out.exists()


# --------------------------------------------------------------------------- --out


@contextlib.contextmanager
def _read_only_dir(path: Path):
    """An empty directory nobody can write to: mode 0o500, or for root (whom modes do
    not stop) the immutable attribute."""
    path.mkdir()
    path.chmod(0o500)
    immutable = False
    try:
        if os.access(path, os.W_OK):
            path.chmod(0o700)
            chattr = shutil.which("chattr")
            immutable = chattr is not None and subprocess.run(
                [chattr, "+i", str(path)], capture_output=True
            ).returncode == 0  # fmt: skip
            if not immutable:
                pytest.skip("running as root, where chmod does not stop writes, and "
                            "chattr +i is not available here")  # fmt: skip
        yield path
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(path)], check=True)
        path.chmod(0o700)


def test_out_that_is_not_writable_is_one_line(tmp_path, capsys):
    with _read_only_dir(tmp_path / "locked") as out:
        code, _, err = _run(["train", *TINY, "--out", str(out)], capsys)
        assert list(out.iterdir()) == []
    assert code == 2
    line = _one_line(err)
    assert f"--out {out} is not writable (" in line and "pass a directory you can write" in line


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = _run(["train", *TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2
    assert "cannot be created (Not a directory)" in _one_line(err)


# --------------------------------------------------------------------------- a full disk


class _DiskFull:
    """A file on a disk that fills up after ``room`` writes: the next one writes a few
    bytes and then fails, as a real write does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        if self.room == 0:
            self.file.write(data[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= 1
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_disk_full_during_metrics_is_one_line_and_whole_lines(tmp_path, capsys, monkeypatch):
    """Injected: the OSError(ENOSPC) a write on a full disk raises (no small file
    system can be mounted in the tests)."""
    start = MetricsWriter.on_start

    def on_start(self, fit_start):
        start(self, fit_start)
        self._file = _DiskFull(self._file, room=3)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(MetricsWriter, "on_start", on_start)
        code, _, err = _run(["train", *TINY, "--out", str(out)], capsys)
    assert code == 74
    line = _one_line(err)
    assert f"No space left on device: {out / 'metrics.jsonl'}" in line
    assert "Free some space, then run again with --overwrite." in line
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in lines] == [1, 2, 3]  # no cut fourth line
    # The next run into the same --out: told to pass --overwrite, and then it works.
    code, _, err = _run(["train", *TINY, "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in _one_line(err)
    code, _, err = _run(["train", *TINY, "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["examples"] == 200


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_at_summary_is_one_line(tmp_path, capsys):
    """A real ENOSPC: summary.json's temporary file is a link to /dev/full."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json.tmp").symlink_to("/dev/full")
    code, _, err = _run(["train", *TINY, "--out", str(out), "--overwrite"], capsys)
    assert code == 74
    assert f"No space left on device: {out / 'summary.json.tmp'}" in _one_line(err)
    assert not (out / "summary.json.tmp").exists() and not (out / "summary.json").exists()
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["examples"] == 200


# --------------------------------------------------------------------------- plots


def _rows(sizes):
    rows, examples = [], 0
    for step, size in enumerate(sizes, 1):
        examples += size
        rows.append({"step": step, "batch_size": size, "padded_size": size,
                     "examples": examples, "wall_time": 0.1 * step, "loss": 1.0 / step,
                     "learning_rate": 0.3, "test_accuracy": 0.5, "test_loss": 1.0})  # fmt: skip
    return rows


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, by file name (still inspectable when closed)."""
    saved = {}
    save = _plots._save

    def keep(fig, path, plt):
        saved[path.name] = fig
        return save(fig, path, plt)

    monkeypatch.setattr(_plots, "_save", keep)
    return saved


def _visible_ticks(ax):
    lo, hi = ax.get_ylim()
    return [t for t in ax.get_yticks() if lo <= t <= hi]


def test_batch_plot_sets_the_budgets_last_batch_apart(tmp_path, figures):
    rows = _rows([16, 32, 64, 64, 5])  # the budget of 181 examples leaves 5 for the last
    _plots.run_plots(rows, tmp_path, "t", budget=rows[-1]["examples"])
    ax = figures["batch_size.png"].axes[0]
    curve, last = ax.lines
    assert list(curve.get_ydata()) == [16, 32, 64, 64]
    assert list(last.get_ydata()) == [5] and last.get_marker() == "o"
    assert last.get_label() == "last batch: rest of budget"
    # Without the budget (e.g. an interrupted run) the curve is the whole record.
    _plots.run_plots(rows, tmp_path, "t")
    assert [list(line.get_ydata()) for line in figures["batch_size.png"].axes[0].lines] == [
        [16, 32, 64, 64, 5]
    ]


def test_compare_overview_has_five_panels_and_readable_batch_ticks(tmp_path, figures):
    runs = {"cabs": _rows([16, 18, 22, 26, 30]), "sgd": _rows([16] * 7)}
    _plots.compare_plots(runs, tmp_path, "t", 0.9)
    overview = figures["compare_overview.png"]
    assert len(overview.axes) == 5 and all(ax.axison for ax in overview.axes)  # none empty
    for fig in (figures["compare_batch_size.png"], overview):
        ax = next(a for a in fig.axes if a.get_ylabel() == "batch size")
        ticks = _visible_ticks(ax)
        assert ticks == [8, 16, 32, 64]  # a power below and above the sizes drawn
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_position()[1] in ticks]
        assert labels == ["8", "16", "32", "64"]
    # Sizes over many powers of two: at most about 8 labels, the ends still covered.
    _plots.compare_plots({"cabs": _rows([1, 2**20])}, tmp_path, "t", 0.9)
    ax = figures["compare_batch_size.png"].axes[0]
    ticks = _visible_ticks(ax)
    assert 3 <= len(ticks) <= 8 and ticks[0] <= 1 and ticks[-1] >= 2**20


def test_a_cap_above_the_training_set_is_lowered_to_it_with_a_note(tmp_path, capsys):
    """Digits has 1,438 training examples: the default cap of 2,048 would repeat
    examples within a batch (fit's warning); the command uses the full batch instead."""
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", "--dataset", "digits", "--model", "logreg", "--examples", "400",
         "--evals", "1", "--no-progress", "--out", str(out)], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (
        "note: --max-batch-size 2048 is above the 1438 training examples of digits; "
        "using 1438 (full batch)."
    ) in err
    assert "Warning" not in err  # fit had nothing to warn about
    assert json.loads((out / "config.json").read_text())["max_batch_size"] == 1438


def test_warnings_during_a_run_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    from adaptive_batch.cli import _train

    def warn_and_finish(args):
        warnings.warn("the rule asked for 8 examples, below the current batch", stacklevel=1)
        return 0

    monkeypatch.setattr(_train, "train_command", warn_and_finish)
    code, _, err = _run(["train", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert code == 0
    assert err == (
        "adaptive-batch train: warning: the rule asked for 8 examples, below the current batch\n"
    )
