"""`fit` checkpoints and resume: a run killed with SIGKILL at random steps and resumed
takes the same steps as one never stopped (records and parameters bitwise), for plain,
Flax NNX and Flax Linen steps; and the checkpoint's own checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _kill import read_rows, run_with_kills, without

import adaptive_batch as ab
from adaptive_batch.training._checkpoint import Checkpoints

WORKER = Path(__file__).with_name("_fit_resume_worker.py")


def worker(style, out, resume=False):
    return [sys.executable, str(WORKER), style, str(out), *(["--resume"] if resume else [])]


@pytest.mark.parametrize("style", ["plain", "nnx", "linen"])
def test_fit_killed_twice_resumes_to_the_same_run(style, tmp_path):
    reference = subprocess.Popen(worker(style, tmp_path / "reference"), stderr=subprocess.PIPE)
    killed = tmp_path / "killed"
    kills = run_with_kills(
        lambda resume: worker(style, killed, resume), killed / "metrics.jsonl",
        kills=2, seed=hash(style) % 1000, rows_between=(10, 120),
    )  # fmt: skip
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err.decode()[-2000:]
    expected = read_rows(tmp_path / "reference" / "metrics.jsonl")
    got = read_rows(killed / "metrics.jsonl")
    assert len(kills) == 2 and kills[-1] < len(expected)
    assert [r["step"] for r in got] == list(range(1, len(expected) + 1))  # each step once
    assert without(got) == without(expected)  # batch sizes, losses, ... bitwise
    assert len({r["batch_size"] for r in expected}) > 3  # CABS moved the batch size
    with np.load(tmp_path / "reference" / "params.npz") as a, np.load(killed / "params.npz") as b:
        assert len(a.files) == len(b.files) > 0
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def source(n=200):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    noise = np.random.default_rng(1).normal(size=n).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32) + noise}


def run_fit(checkpoint_dir, *, steps, resume=False, eval_every=None, lag=0):
    # The norm test grows the batch as the gradient shrinks against the noise.
    tx = optax.chain(ab.norm_test(0.5, min_batch_size=4, max_batch_size=64), optax.sgd(0.05))
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(3)
    controller = ab.BatchSizeController(4, 64, fill_buckets=False, lag=lag)
    return ab.fit(
        step, (w, tx.init(w)), source(), controller, steps=steps, progress=False,
        checkpoint_dir=checkpoint_dir, checkpoint_every=7, resume=resume,
        eval_fn=lambda state: {"w0": state[0][0]}, eval_every=eval_every,
    )  # fmt: skip


@pytest.mark.parametrize("lag", [0, 1])
def test_a_longer_budget_continues_from_the_checkpoint(tmp_path, lag):
    """In one process: 27 steps, then resume=True with steps=50 equals 50 steps at once
    (controller with and without lag, evaluations on either side of the checkpoint;
    the first part ends on an evaluation step, as its last step is always evaluated)."""
    whole = run_fit(tmp_path / "whole", steps=50, eval_every=9, lag=lag)
    first = run_fit(tmp_path / "parts", steps=27, eval_every=9, lag=lag)
    assert first.steps == 27 and Checkpoints(tmp_path / "parts").latest_step() == 27
    rest = run_fit(tmp_path / "parts", steps=50, resume=True, eval_every=9, lag=lag)
    assert rest.resumed_step == 27 and rest.steps == 50
    sizes = whole.history.column("batch_size")
    # The batch size moves on both sides of the checkpoint, far from where it started.
    assert len(set(sizes[:27])) > 2 and len(set(sizes[27:])) > 1 and sizes[27] > 4
    assert without(rest.history.steps) == without(whole.history.steps)
    assert without(rest.history.evals) == without(whole.history.evals)
    np.testing.assert_array_equal(rest.state[0], whole.state[0])
    assert rest.examples == whole.examples


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path):
    result = run_fit(tmp_path / "new", steps=5, resume=True)
    assert result.resumed_step == 0 and result.steps == 5


def test_resume_with_another_model_is_refused(tmp_path):
    run_fit(tmp_path / "ckpt", steps=7)
    tx = optax.chain(ab.cabs_rule(0.1), optax.adam(1e-3))  # another optimizer state
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(3)
    with pytest.raises(ValueError, match="holds 5 arrays, this model and optimizer have 8"):
        ab.fit(step, (w, tx.init(w)), source(), ab.BatchSizeController(4, 64), steps=9,
               progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)  # fmt: skip


def test_checkpoint_arguments_are_checked(tmp_path):
    tx = ab.cabs(0.05, min_batch_size=4)
    step = ab.make_train_step(loss_fn, tx)
    state = (jnp.zeros(3), tx.init(jnp.zeros(3)))
    controller = ab.BatchSizeController(4, 64)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        ab.fit(step, state, source(), controller, steps=3, checkpoint_every=2)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        ab.fit(step, state, source(), controller, steps=3, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every=0 must be a positive int"):
        ab.fit(step, state, source(), controller, steps=3, checkpoint_dir=tmp_path,
               checkpoint_every=0)  # fmt: skip


def test_a_new_run_into_a_directory_with_checkpoints_is_refused(tmp_path):
    run_fit(tmp_path / "ckpt", steps=7)
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        run_fit(tmp_path / "ckpt", steps=7)


def test_resume_with_other_shapes_is_refused_with_a_message(tmp_path):
    run_fit(tmp_path / "ckpt", steps=7)
    tx = optax.chain(ab.norm_test(0.5, min_batch_size=4, max_batch_size=64), optax.sgd(0.05))
    step = ab.make_train_step(lambda w, b: (b["x"] @ w[:3] - b["y"]) ** 2, tx)
    w = jnp.zeros(4)  # one more parameter than the checkpoint's
    with pytest.raises(ValueError, match="do not fit this model and optimizer"):
        ab.fit(step, (w, tx.init(w)), source(), ab.BatchSizeController(4, 64), steps=9,
               progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)  # fmt: skip


def test_fit_arguments_get_one_line_errors(tmp_path):
    tx = optax.sgd(0.1)
    step = ab.make_train_step(loss_fn, tx)
    state = (jnp.zeros(3), tx.init(jnp.zeros(3)))
    controller = ab.BatchSizeController(4, 4)
    cases = [
        ({"resume": "yes", "checkpoint_dir": tmp_path}, TypeError, "resume must be True or False"),
        ({"eval_every": 5}, ValueError, "eval_every needs eval_fn"),
        ({"callbacks": ab.training.ProgressBar()}, TypeError, "callbacks must be a list"),
        ({"eval_fn": lambda s: 0.5}, TypeError, "eval_fn must return a dict"),
        ({"log_every": 0}, ValueError, "log_every=0 must be a positive int"),
        ({"checkpoint_dir": __file__}, ValueError, "is a file; pass a directory"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ab.fit(step, state, source(), controller, steps=2, progress=False, **kwargs)
