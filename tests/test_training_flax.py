"""Flax NNX and Flax Linen loops train on scikit-learn digits with CABS and AdAdaGrad.

Each run goes through `fit` (controller → loader → step) and must reach >= 90% test
accuracy; the NNX optimizer and the Linen TrainState must come back trained and their
step counters must agree with the loop's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState
from sklearn.datasets import load_digits

import adaptive_batch as ab

HIDDEN = 32

# Method, optimizer, controller settings, epochs. CABS may shrink the batch
# (monotone=False); AdAdaGrad's norm test only grows it.
METHODS = {
    "cabs": (lambda: ab.cabs(0.5, min_batch_size=16, max_batch_size=256), False, 8),
    "adadagrad": (lambda: ab.adadagrad(0.1, min_batch_size=16, max_batch_size=256), True, 5),
}


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    train = {"x": x[:1400], "y": y[:1400]}
    test = (x[1400:], y[1400:])
    return train, test


def run(step, state, train, method, eval_fn=None):
    _, monotone, epochs = METHODS[method]
    controller = ab.BatchSizeController(16, 256, monotone=monotone, lag=1)
    return ab.fit(
        step, state, train, controller, epochs=epochs, progress=False, seed=1, eval_fn=eval_fn
    )


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(nn.Dense(HIDDEN)(x)))


def accuracy(logits, labels):
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nnx_loop_trains_digits(digits, method):
    train, (x_test, y_test) = digits
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, METHODS[method][0](), wrt=nnx.Param)
    before = accuracy(model(x_test), y_test)

    def loss_fn(model, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])

    def eval_fn(state):  # gets the model with the trained parameters written back
        model, _ = state
        return {"accuracy": accuracy(model(x_test), y_test)}

    step = ab.make_nnx_train_step(loss_fn)
    result = run(step, (model, optimizer), train, method, eval_fn)

    assert result.state[0] is model and result.state[1] is optimizer  # updated in place
    assert int(optimizer.step[...]) == result.steps
    after = accuracy(model(x_test), y_test)
    assert result.history.evals[-1]["accuracy"] == after
    assert before < 0.3 and after >= 0.9, (before, after)
    assert result.compiles <= len(result.controller.buckets)
    assert max(result.history.column("batch_size")) > 16  # the method grew the batch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_linen_loop_trains_digits(digits, method):
    train, (x_test, y_test) = digits
    module = LinenMLP()
    params = module.init(jax.random.key(0), x_test[:1])["params"]
    state = TrainState.create(apply_fn=module.apply, params=params, tx=METHODS[method][0]())
    before = accuracy(module.apply({"params": params}, x_test), y_test)

    def loss_fn(params, batch):
        logits = module.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    result = run(ab.make_linen_train_step(loss_fn), state, train, method)

    trained = result.state
    assert int(trained.step) == result.steps
    after = accuracy(module.apply({"params": trained.params}, x_test), y_test)
    assert before < 0.3 and after >= 0.9, (before, after)
    assert result.compiles <= len(result.controller.buckets)
    assert max(result.history.column("batch_size")) > 16
    suggested = result.history.steps[-1]["suggested_batch_size"]
    assert int(ab.suggested_batch_size(trained.opt_state)) == suggested


def test_nnx_step_with_plain_optax_equals_nnx_grad_update(digits):
    """A plain Optax transform (no grad_stats) through the NNX step: same parameters as
    ``nnx.grad`` of the mean loss and ``optimizer.update`` written by hand."""
    train, _ = digits
    batch = {"x": train["x"][:64], "y": train["y"][:64]}

    def loss_fn(model, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])

    models = [NnxMLP(nnx.Rngs(3)) for _ in range(2)]
    optimizers = [nnx.Optimizer(m, optax.adam(0.01), wrt=nnx.Param) for m in models]
    step = ab.make_nnx_train_step(loss_fn)

    @nnx.jit
    def reference_step(model, optimizer, batch):
        grads = nnx.grad(lambda m: jnp.mean(loss_fn(m, batch)))(model)
        optimizer.update(model, grads)

    for _ in range(2):
        step(models[0], optimizers[0], batch)
        reference_step(models[1], optimizers[1], batch)
    for a, b in zip(
        jax.tree.leaves(nnx.state(models[0], nnx.Param)),
        jax.tree.leaves(nnx.state(models[1], nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_nnx_update_norm_is_the_step_taken():
    """NNX applies the update in place: the norm is taken against the parameters
    before the step (it once read them after, and was always 0)."""
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    step = ab.make_nnx_train_step(
        lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b["x"]), b["y"])
    )
    data = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.int32)}
    metrics = step(model, optimizer, data)
    after = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before, strict=True)))
    assert moved > 0
    np.testing.assert_allclose(float(metrics["update_norm"]), moved, rtol=1e-5)
