"""The command's long-run safety: `--checkpoint-every` / `--resume` after real SIGKILLs
and Ctrl-C, divergence (exit 3), strict JSON files, and one-line resume errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _cli import main_in_process
from _kill import count_rows, read_rows, run_with_kills, without

ARGS = ["--dataset", "synthetic", "--model", "mlp", "--examples", "12000", "--evals", "5",
        "--min-batch-size", "8", "--max-batch-size", "128", "--no-progress",
        "--checkpoint-every", "20"]  # fmt: skip
VARYING = ("wall_time_s", "resumed_step", "plots")


def command(out, resume=False):
    return [sys.executable, "-m", "adaptive_batch", "train", *ARGS, "--out", str(out),
            *(["--resume"] if resume else [])]  # fmt: skip


def strict(path):
    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def final_params(out):
    from adaptive_batch.training._checkpoint import Checkpoints

    checkpoints = Checkpoints(out / "checkpoints")
    step = checkpoints.latest_step()
    import orbax.checkpoint as ocp

    leaves = ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "state")
    checkpoints.close()
    return step, [np.asarray(x) for x in leaves]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def assert_same_run(out, reference):
    expected, got = read_rows(reference / "metrics.jsonl"), read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, len(expected) + 1))
    assert without(got) == without(expected)
    a, b = strict(reference / "summary.json"), strict(out / "summary.json")
    assert {k: v for k, v in a.items() if k not in VARYING} == {
        k: v for k, v in b.items() if k not in VARYING
    }
    (step_a, params_a), (step_b, params_b) = final_params(reference), final_params(out)
    assert step_a == step_b == len(expected)
    for x, y in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_train_killed_three_times_resumes_to_the_same_run(reference, tmp_path):
    out = tmp_path / "run"
    kills = run_with_kills(
        lambda resume: command(out, resume), out / "metrics.jsonl", kills=3, seed=7,
        rows_between=(30, 150),
    )  # fmt: skip
    assert len(kills) == 3
    assert_same_run(out, reference)
    assert strict(out / "summary.json")["resumed_step"] > 0


def signal_after(out, rows, sig):
    """Start the command, send ``sig`` once its metrics file has ``rows`` rows; return
    (exit code, stderr)."""
    process = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count_rows(out / "metrics.jsonl") < rows:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_ctrl_c_stops_writes_everything_and_resumes(reference, tmp_path):
    out = tmp_path / "run"
    code, err = signal_after(out, 60, signal.SIGINT)
    assert code == 130, err.decode()[-2000:]
    assert b"Segmentation fault" not in err and b"Traceback" not in err
    summary = strict(out / "summary.json")
    assert summary["interrupted"] is True and not summary["diverged"]
    rows = read_rows(out / "metrics.jsonl")
    assert summary["steps"] == len(rows) == final_params(out)[0]  # checkpoint at the stop
    assert (out / "overview.png").exists() and "test_accuracy" in rows[-1]
    resumed = subprocess.run(command(out, resume=True), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The evaluation made at the stop is not in the resumed run (a run never stopped
    # has none there), so everything equals the reference.
    assert_same_run(out, reference)


def test_sigterm_stops_like_ctrl_c_with_exit_143(tmp_path):
    """A scheduler's preemption: SIGTERM ends the run after the step with a checkpoint
    and the summary (``"stopped": "terminated"``), exit 128 + 15."""
    out = tmp_path / "run"
    code, err = signal_after(out, 30, signal.SIGTERM)
    assert code == 143, err.decode()[-2000:]
    summary = strict(out / "summary.json")
    assert summary["stopped"] == "terminated" and summary["interrupted"] is True
    assert summary["steps"] == len(read_rows(out / "metrics.jsonl")) == final_params(out)[0]


def _run(argv, capsys):
    code = main_in_process(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_resume_errors_are_one_line_and_exit_2(reference, tmp_path, capsys):
    code, _, err = _run(["train", *ARGS, "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "--resume needs --out with the directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["train", *ARGS, "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "holds no checkpoint to resume" in err and len(err.splitlines()) == 1
    code, _, err = _run(["train", *ARGS, "--lr", "0.1", "--out", str(reference), "--resume"],
                        capsys)  # fmt: skip
    assert code == 2 and "options differ" in err and "lr 0.3 -> 0.1" in err
    assert len(err.strip().splitlines()) == 1


def test_divergence_exits_3_with_strict_json(tmp_path):
    """The issue's case: every step's loss is finite (up to 1.6e28), the trained
    parameters' test loss is not: divergence all the same, and no NaN token on disk."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_batch", "train", "--dataset", "digits", "--model",
         "mlp", "--lr", "1e4", "--epochs", "2", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=180,
    )  # fmt: skip
    code, err = result.returncode, result.stderr
    assert code == 3, err
    assert "diverged: the loss of the trained parameters is not finite" in err
    summary = strict(out / "summary.json")
    assert summary["diverged"] is True and summary["test_loss"] is None
    strict(out / "config.json")
    rows = read_rows(out / "metrics.jsonl")
    assert rows[-1]["test_loss"] is None and "test_loss" in rows[-1]["non_finite"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_a_run_of_nonfinite_steps_is_divergence(tmp_path):
    """Training data that is all NaN: every step is skipped, the 10th in a row stops the
    run, and the summary says why (the command's path for NonFiniteError)."""
    import dataclasses

    from adaptive_batch.cli._methods import METHODS
    from adaptive_batch.cli._run import RunConfig, run
    from adaptive_batch.datasets import make_synthetic
    from adaptive_batch.models import functional, make_model

    ds = make_synthetic(num_train=256, num_test=64, dim=8, num_classes=3)
    ds = dataclasses.replace(ds, train={**ds.train, "x": np.full_like(ds.train["x"], np.nan)})
    fns = functional(make_model("logreg", ds.input_shape, ds.num_classes))
    config = RunConfig(METHODS["cabs"], 0.3, 8, 8, 8, 256, evals=1)
    with pytest.warns(RuntimeWarning, match="step 1 was non-finite"):
        summary, _, params = run(fns, ds, config, tmp_path, progress=False)
    assert summary["diverged"] is True and summary["skipped_steps"] == 10 == summary["steps"]
    assert "10 non-finite steps in a row" in summary["diverged_because"]
    assert [r["skipped_steps"] for r in read_rows(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(fns.params)]),
    )  # every step skipped: the initial parameters


def test_overwrite_drops_the_old_checkpoints_and_resume_keeps_checkpointing(tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    tiny = ["train", "--dataset", "synthetic", "--model", "logreg", "--examples", "1600",
            "--min-batch-size", "8", "--max-batch-size", "8", "--method", "sgd",
            "--batch-size", "8", "--evals", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert _run([*tiny, "--checkpoint-every", "50"], capsys)[0] == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [100, 150, 200]
    # A new run over it: its own checkpoints only (the old 200 would shadow them).
    assert _run([*tiny, "--overwrite", "--checkpoint-every", "40"], capsys)[0] == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [120, 160, 200]
    # As if it had died after step 120: --resume without --checkpoint-every goes on
    # checkpointing every 40 steps, as the run did.
    for step in ("160", "200"):
        shutil.rmtree(out / "checkpoints" / step)
    assert _run([*tiny, "--resume"], capsys)[0] == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [120, 160, 200]
    assert strict(out / "summary.json")["resumed_step"] == 120
    assert strict(out / "config.json")["checkpoint_every"] == 40
