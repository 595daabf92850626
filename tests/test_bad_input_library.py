"""Issue 28, library side: bad input and traps get a clear error or one warning.

Each test fails on the code before the fix: silent CABS under a monotone controller,
caps above 2**30, huge loader requests, caps above the data set, messages that named
the wrong function or the wrong cause, and a complete optimizer chained before another.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptive_batch as ab
from adaptive_batch.data import Loader, _loader

N = 256


def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def source(n=N):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}


def messages(caught, text):
    return [str(w.message) for w in caught if text in str(w.message)]


def run_cabs(controller, *, max_batch_size=64, n=N):
    tx = ab.cabs(0.05, min_batch_size=8, max_batch_size=max_batch_size, initial_batch_size=64)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ab.fit(step, (w, tx.init(w)), source(n), controller, steps=12, progress=False)
    return result, caught


# ------------------------------------------------------------- 1: monotone stops CABS


def test_monotone_controller_records_the_shrink_it_refused():
    ctrl = ab.BatchSizeController(16, 256)
    ctrl.next(100)  # -> 128
    assert ctrl.refused_shrink is None
    ctrl.next(20)
    assert ctrl.plan.batch_size == 128 and ctrl.refused_shrink == 20
    free = ab.BatchSizeController(16, 256, monotone=False)
    free.next(100)
    assert free.next(20).batch_size == 32 and free.refused_shrink is None


def test_fit_warns_once_when_a_monotone_controller_keeps_cabs_from_shrinking():
    # CABS starts at 64 and, this early, asks for less: the default controller refuses.
    result, caught = run_cabs(ab.BatchSizeController(8, 64, initial_batch_size=64))
    said = messages(caught, "did not shrink")
    assert len(said) == 1, [str(w.message) for w in caught]
    asked = result.controller.refused_shrink
    assert asked is not None and asked < 64
    assert "below the current batch of 64" in said[0]
    assert "BatchSizeController(..., monotone=False)" in said[0] and "CABS" in said[0]
    assert set(result.history.column("batch_size")) == {64}
    # The fix the warning names: the batch shrinks, no warning.
    free = ab.BatchSizeController(8, 64, initial_batch_size=64, monotone=False)
    result, caught = run_cabs(free)
    assert messages(caught, "did not shrink") == []
    assert min(result.history.column("batch_size")) < 64


# ------------------------------------------------------------- 2: caps above 2**30


@pytest.mark.parametrize(
    ("lo", "hi", "name", "allowed"),
    [
        (16, 2**40, "max_batch_size=1099511627776", "[16, 1073741824]"),
        (2**31, 2**32, "min_batch_size=2147483648", "[1, 1073741824]"),
    ],
)
def test_controller_refuses_bounds_the_rules_cannot_hold(lo, hi, name, allowed):
    with pytest.raises(ValueError, match="2\\*\\*30") as error:
        ab.BatchSizeController(lo, hi)
    assert name in str(error.value) and allowed in str(error.value)
    assert ab.BatchSizeController(16, 2**30).max_batch_size == 2**30  # the bound itself


# ------------------------------------------------------------- 3: huge loader requests


@pytest.mark.parametrize("how", ["next", "request"])
def test_loader_refuses_more_rows_than_any_rule_can_ask_for_at_once(how):
    with Loader(source(10)) as loader:
        with pytest.raises(ValueError, match="1099511627776 rows is above 1073741824"):
            getattr(loader, how)(2**40)
        assert loader.pending == 0 and loader.next(3).batch_size == 3  # still usable


def test_loader_refuses_a_batch_larger_than_host_memory(monkeypatch):
    monkeypatch.setattr(_loader, "_host_memory", lambda: 10**6)
    rows = {"x": np.zeros((10, 250), np.float32)}  # 1000 bytes a row
    with Loader(rows) as loader:
        with pytest.raises(ValueError, match="more than this host's 1,000,000") as error:
            loader.next(1000)  # 1000 rows of 1000 bytes, plus their indices
        assert "rows of 1000 bytes" in str(error.value)
        assert "max_batch_size" in str(error.value)
        assert loader.next(900).batch_size == 900  # 900,000 + 7,200 bytes fit


def test_a_request_above_the_source_repeats_examples():
    with Loader(source(5), seed=1) as loader:
        batch = loader.next(12)
    assert batch.batch_size == 12 and batch.mask.all()
    counts = np.unique(batch.data["x"][:, 0], return_counts=True)[1]
    assert len(counts) == 5 and counts.min() >= 2  # every example twice, some three times
    with Loader(source(5), span_epochs=False) as loader:
        assert loader.next(12).batch_size == 5  # evaluation: one epoch, then padding


# ------------------------------------------------------------- 4: cap above the data set


def test_fit_warns_once_when_the_cap_is_above_the_data():
    controller = ab.BatchSizeController(8, 64, monotone=False)
    _, caught = run_cabs(controller, n=40)
    said = messages(caught, "examples of the data")
    assert len(said) == 1
    assert "max_batch_size=64 is above the 40 examples" in said[0]
    assert "holds some examples twice" in said[0] and "Pass max_batch_size=40" in said[0]
    _, caught = run_cabs(ab.BatchSizeController(8, 64, monotone=False), n=64)
    assert messages(caught, "examples of the data") == []


# ------------------------------------------------------------- 5: misleading messages


@pytest.mark.parametrize(
    ("factory", "kwargs", "part"),
    [
        (ab.adadagrad, {"eta": 0}, "norm_test"),
        (ab.adadagrad, {"eta": 0, "test": "coordinate"}, "coordinate_norm_test"),
        (ab.adadagrad, {"every": 0}, "norm_test"),
        (ab.adadagrad, {"max_batch_size": 2**40}, "norm_test"),
        (ab.adadagrad, {"eps": -1.0}, "scale_by_adagrad_torch"),
        (ab.adadagrad_norm, {"eta": 0}, "norm_test"),
        (ab.adadagrad_norm, {"monotone": 1}, "norm_test"),
        (ab.adadagrad_norm, {"b0": 0.0}, "scale_by_adagrad_norm"),
        (ab.cabs, {"decay": 2.0}, "cabs_rule"),
        (ab.cabs, {"min_batch_size": 0}, "cabs_rule"),
        (ab.cabs, {"eps": -1.0}, "cabs_rule"),
    ],
)
def test_composite_optimizers_name_themselves_in_errors(factory, kwargs, part):
    with pytest.raises((TypeError, ValueError)) as error:
        factory(0.1, **kwargs)
    message = str(error.value)
    assert message.startswith(f"{factory.__name__}: "), message
    assert f"{part}:" not in message
    assert f"{next(iter(kwargs))}=" in message


def test_loader_state_with_a_fractional_index_is_called_a_bad_state():
    with Loader(source(10)) as loader:
        state = loader.state_dict()
        with pytest.raises(ValueError, match=r"state\['index'\]=2\.5") as error:
            loader.load_state_dict({**state, "index": 2.5})
    message = str(error.value)
    assert "Loader.state_dict()" in message and "rule" not in message


@pytest.mark.parametrize("flag", [True, np.bool_(False), jnp.asarray(True)])
def test_controller_refuses_a_boolean_suggestion(flag):
    with pytest.raises(TypeError, match="a boolean") as error:
        ab.BatchSizeController(16, 64).next(flag)
    assert "negative" not in str(error.value) and "int32" not in str(error.value)


# ------------------------------------------------------------- 6: complete optimizers


def batch():
    return {k: v[:16] for k, v in source().items()}


@pytest.mark.parametrize(
    ("tx", "optimizer", "rule"),
    [
        (optax.chain(ab.cabs(0.1), optax.adam(1e-2)), "cabs", "cabs_rule"),
        (
            optax.chain(optax.inject_hyperparams(ab.cabs)(learning_rate=0.1), optax.adam(1e-2)),
            "cabs",
            "cabs_rule",
        ),
        (optax.chain(ab.adadagrad(0.1), optax.clip(1.0)), "adadagrad", "norm_test"),
        (optax.chain(ab.adadagrad_norm(0.1), optax.sgd(0.1)), "adadagrad_norm", "norm_test"),
        (
            optax.chain(optax.clip(1.0), optax.chain(ab.cabs(0.1), optax.adam(1e-2))),
            "cabs",
            "cabs_rule",
        ),
    ],
)
def test_train_step_refuses_a_complete_optimizer_chained_before_another(tx, optimizer, rule):
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(3)
    with pytest.raises(TypeError, match=rf"adaptive_batch\.{optimizer} is a complete") as error:
        step(w, tx.init(w), batch())
    assert f"optax.chain(adaptive_batch.{rule}(" in str(error.value)


@pytest.mark.parametrize(
    "tx",
    [
        ab.cabs(0.1),
        optax.chain(optax.clip(1.0), ab.cabs(0.1)),  # last in the chain: fine
        optax.chain(ab.cabs_rule(0.1), optax.adam(1e-2)),  # the rule, as the error says
        optax.chain(ab.cabs_rule(0.1), optax.sgd(0.1), optax.clip(1.0)),  # cabs's parts
        optax.inject_hyperparams(ab.adadagrad)(learning_rate=0.1),
        optax.chain(ab.norm_test(0.1), optax.adam(1e-2)),
    ],
)
def test_train_step_accepts_complete_optimizers_last_and_rules_anywhere(tx):
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(3)
    w, _, metrics = step(w, tx.init(w), batch())
    assert int(metrics["count"]) == 16


def test_nnx_step_refuses_a_complete_optimizer_chained_before_another():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    tx = optax.chain(ab.cabs(0.1), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def nnx_loss(model, batch):
        return 0.5 * (model(batch["x"])[:, 0] - batch["y"]) ** 2

    step = ab.make_nnx_train_step(nnx_loss)
    with pytest.raises(TypeError, match=r"adaptive_batch\.cabs is a complete optimizer"):
        step(model, optimizer, batch())
