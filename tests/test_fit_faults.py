"""Non-finite steps in `fit`: real NaN and inf examples are skipped (nothing changes),
counted, warned about once with the examples named; a run of them stops the loop;
padding rows never matter; the raw behaviour on request."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab
from adaptive_batch.data import Loader
from adaptive_batch.training import NonFiniteError
from adaptive_batch.training._checkpoint import Checkpoints

N, BAD = 256, 77


def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def source(bad_value=np.nan, bad=BAD):
    x = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
    data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
    if bad is not None:
        data["x"][bad, 1] = bad_value
    return data


def fit(data, *, skip=True, lr=0.05, seed=3, **kwargs):
    tx = ab.cabs(lr, min_batch_size=8, max_batch_size=32)
    step = ab.make_train_step(loss_fn, tx, skip_nonfinite=skip)
    w = jnp.zeros(3)
    controller = ab.BatchSizeController(8, 32, monotone=False, fill_buckets=False)
    return ab.fit(step, (w, tx.init(w)), data, controller, seed=seed, progress=False,
                  **kwargs)  # fmt: skip


def steps_holding(example, result, seed=3):
    """Steps whose batch held ``example``, from the loader's order (independent of fit)."""
    loader = Loader(source(), seed=seed)
    steps, before = [], 0
    for record in result.history.steps:
        epoch, index = divmod(before, N)
        if example in loader.example_indices(epoch, index, record["batch_size"]):
            steps.append(record["step"])
        before = record["examples"]
    return steps


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_bad_example_is_skipped_counted_and_named_once(bad_value):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(source(bad_value), epochs=4)
    bad_steps = steps_holding(BAD, result)
    assert len(bad_steps) == 4  # once per epoch
    assert result.skipped_steps == 4 and result.stopped == "budget"
    assert [r["skipped_steps"] for r in result.history.steps if r["step"] in bad_steps] == [
        1, 2, 3, 4
    ]  # fmt: skip
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)
            and "non-finite" in str(w.message)]  # fmt: skip
    assert len(ours) == 1
    message = str(ours[0].message)
    assert f"step {bad_steps[0]} was non-finite" in message and "example_indices(" in message
    # The indices the warning names hold the bad example.
    call = message.split("loader.example_indices(")[1].split(")")[0]
    epoch, index, count = (int(v) for v in call.split(","))
    assert BAD in Loader(source(), seed=3).example_indices(epoch, index, count)
    w = result.state[0]
    assert np.all(np.isfinite(w))
    assert math.isfinite(result.history.steps[-1]["loss"]) or result.history.steps[-1][
        "step"
    ] in bad_steps  # fmt: skip
    # The skipped steps changed nothing: the suggested batch size carried over.
    for step in bad_steps:
        record = result.history.steps[step - 1]
        assert not math.isfinite(record["loss"])
        if step > 1:
            previous = result.history.steps[step - 2]
            assert record["suggested_batch_size"] == previous["suggested_batch_size"]


def test_skipped_step_keeps_parameters_and_state_bitwise():
    tx = ab.cabs(0.05, min_batch_size=4)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.arange(3.0)
    state = tx.init(w)
    data = source()
    batch = {k: v[BAD - 2 : BAD + 2] for k, v in data.items()}  # holds the NaN row
    w2, state2, metrics = step(w, state, batch)
    assert int(metrics["skipped"]) == 1 and not bool(metrics["finite"])
    np.testing.assert_array_equal(w2, w)
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_in_a_padding_row_changes_nothing():
    tx = ab.cabs(0.05, min_batch_size=4)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.arange(3.0)
    data = source()
    batch = {k: v[BAD - 3 : BAD + 1] for k, v in data.items()}  # the NaN row is last
    mask = np.array([True, True, True, False])
    clean = {k: v.copy() for k, v in batch.items()}
    clean["x"][-1] = 0.0
    w_nan, _, metrics = step(w, tx.init(w), batch, mask)
    w_clean, _, _ = step(w, tx.init(w), clean, mask)
    assert int(metrics["skipped"]) == 0 and bool(metrics["finite"])
    np.testing.assert_array_equal(w_nan, w_clean)


def test_a_run_of_nonfinite_steps_stops_with_the_last_good_state(tmp_path):
    """A learning rate that blows up: after 10 non-finite steps in a row fit raises;
    the state it reports and the last checkpoint are finite."""
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(NonFiniteError) as info:
        fit(source(bad=None), lr=1e4, steps=500, checkpoint_dir=tmp_path,
            checkpoint_every=2)  # fmt: skip
    result = info.value.result
    assert "10 non-finite steps in a row" in str(info.value)
    assert result.stopped == "nonfinite" and result.skipped_steps >= 10
    records = result.history.steps
    nonfinite = [r["step"] for r in records if not math.isfinite(r["loss"])]
    assert nonfinite[-10:] == list(range(nonfinite[-1] - 9, nonfinite[-1] + 1))
    assert result.steps == nonfinite[-1]  # stopped at the 10th, not later
    assert np.all(np.isfinite(result.state[0]))
    checkpoints = Checkpoints(tmp_path)
    like = result.state
    restored, meta = checkpoints.restore(like)
    checkpoints.close()
    assert np.all(np.isfinite(restored[0]))
    assert meta["counters"]["steps"] <= result.steps


def test_raw_behaviour_applies_nan_updates():
    with pytest.warns(RuntimeWarning, match="its update was applied"):
        result = fit(source(), skip=False, epochs=1, max_nonfinite_steps=None)
    assert result.skipped_steps == 0
    assert np.all(np.isnan(result.state[0]))  # NaN spread, as asked


def test_max_nonfinite_steps_is_checked():
    with pytest.raises(ValueError, match="max_nonfinite_steps=0 must be a positive int"):
        fit(source(), steps=3, max_nonfinite_steps=0)


def test_bounds_stated_twice_and_different_are_reported():
    """The rule (the norm test's default bounds 16..2048) and the controller (8..32)
    disagree: fit warns once, naming both fixes; with the same bounds it says nothing."""
    x = np.random.default_rng(0).normal(size=(512, 3)).astype(np.float32)
    noise = np.random.default_rng(1).normal(size=512).astype(np.float32)
    data = {"x": x, "y": 3 * x[:, 0] + noise}

    def run(rule_bounds):
        tx = optax.chain(ab.norm_test(0.1, **rule_bounds), optax.sgd(0.01))
        step = ab.make_train_step(loss_fn, tx)
        w = jnp.zeros(3)
        controller = ab.BatchSizeController(8, 32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ab.fit(step, (w, tx.init(w)), data, controller, epochs=2, progress=False)
        said = [str(w.message) for w in caught if "different bounds" in str(w.message)]
        return said, max(result.history.column("suggested_batch_size"))

    said, largest = run({})
    assert largest > 32  # the rule asked for more than the controller allows
    assert len(said) == 1 and "[8, 32]" in said[0] and "max_batch_size=32" in said[0]
    said, largest = run({"min_batch_size": 8, "max_batch_size": 32})
    assert said == [] and largest == 32


def test_flax_steps_skip_a_nan_batch_and_keep_their_state():
    """NNX updates its Variables in place inside the step: the skip must still return
    the state it was given (it once returned the updated one); Linen likewise."""
    import flax.linen as nn
    from flax import nnx
    from flax.training.train_state import TrainState

    x = np.ones((8, 3), np.float32)
    x[2, 0] = np.nan
    batch = {"x": x, "y": np.zeros(8, np.int32)}

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ab.cabs(0.1, min_batch_size=4), wrt=nnx.Param)
    kernel = np.array(model.kernel[...])
    metrics = ab.make_nnx_train_step(lambda m, b: xent(m(b["x"]), b["y"]))(model, optimizer, batch)
    assert int(metrics["skipped"]) == 1
    np.testing.assert_array_equal(model.kernel[...], kernel)
    assert int(optimizer.step[...]) == 0

    dense = nn.Dense(2)
    params = dense.init(jax.random.key(0), x[:1])["params"]
    state = TrainState.create(
        apply_fn=dense.apply, params=params, tx=ab.cabs(0.1, min_batch_size=4)
    )
    step = ab.make_linen_train_step(lambda p, b: xent(dense.apply({"params": p}, b["x"]), b["y"]))
    new_state, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 1 and int(new_state.step) == 0
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_wrong_state_for_the_step_and_a_tiny_epoch_budget_say_what_to_do():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    step = ab.make_train_step(loss_fn, optax.sgd(0.1))
    with pytest.raises(TypeError, match="needs make_nnx_train_step"):
        ab.fit(step, (model, optimizer), source(bad=None), ab.BatchSizeController(8, 8), steps=1)
    with pytest.raises(TypeError, match="needs make_nnx_train_step"):
        step(model, optimizer, source(bad=None))
    with pytest.raises(TypeError, match="make_linen_train_step"):
        ab.fit(step, {"w": jnp.zeros(3)}, source(bad=None), ab.BatchSizeController(8, 8), steps=1)
    w = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"epochs=1e-06 of 256 examples is less than one"):
        ab.fit(step, (w, optax.sgd(0.1).init(w)), source(bad=None), ab.BatchSizeController(8, 8),
               epochs=1e-6)  # fmt: skip
