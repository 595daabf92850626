"""End to end on scikit-learn's 8×8 digits (offline): softmax regression trained with
real per-example statistics and the batch size each method asks for.

Batches are sampled with NumPy at the suggested size and padded with masked rows to a
power of two, so a run compiles a handful of step functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets

import adaptive_batch as ab


@pytest.fixture(scope="module")
def digits():
    data = datasets.load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    return {"train": (x[:1400], y[:1400]), "test": (x[1400:], y[1400:])}


def loss_fn(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, batch["y"][:, None], axis=1)[:, 0]


def accuracy(params, data):
    x, y = data["test"]
    logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    return float(np.mean(np.argmax(logits, axis=1) == y))


def train(tx, data, steps, *, coordinates=False, seed=0):
    """A minimal training loop; returns params and per-step records."""
    stats_fn = ab.per_example_stats(loss_fn, coordinates=coordinates)
    x_train, y_train = data["train"]
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch, mask):
        stats = stats_fn(params, batch, mask)
        updates, state = tx.update(stats.mean_grad, state, params, grad_stats=stats)
        return optax.apply_updates(params, updates), state, stats.mean_loss

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(steps):
        b = int(ab.suggested_batch_size(state))
        bucket = 1 << (b - 1).bit_length()
        idx = rng.choice(len(x_train), size=b, replace=False)
        pad = bucket - b
        batch = {"x": np.pad(x_train[idx], ((0, pad), (0, 0))), "y": np.pad(y_train[idx], (0, pad))}
        params, state, loss = step(params, state, batch, np.arange(bucket) < b)
        records.append({"used": b, "next": int(ab.suggested_batch_size(state)),
                        "loss": float(loss), "state": state})  # fmt: skip
    return params, records


def test_cabs_batch_grows_as_the_loss_falls(digits):
    # Official CABS semantics (c = 1, decay 0.95); α = 2 suits this small problem.
    tx = ab.cabs(2.0, min_batch_size=4, max_batch_size=1024)
    params, records = train(tx, digits, steps=200)
    sizes = np.array([r["next"] for r in records])
    loss_avg = np.array([float(r["state"][0].loss_avg) for r in records])
    peak = int(np.argmax(loss_avg))
    after = slice(peak, None)
    # Once the running loss turns down, the batch size rises as it falls.
    assert sizes[-1] >= 3 * sizes[peak], (sizes[peak], sizes[-1])
    assert np.corrcoef(sizes[after], loss_avg[after])[0, 1] < -0.8
    assert loss_avg[-1] < 0.25 * loss_avg[peak]
    # The coupling itself: m = round(α ξ̄ / F̄) whenever it is inside the bounds.
    last = records[-1]["state"][0]
    expected = np.round(2.0 * float(last.xi_avg) / (float(last.loss_avg) + 1e-8))
    assert sizes[-1] == int(np.clip(expected, 4, 1024))
    assert accuracy(params, digits) >= 0.9


def test_norm_test_raises_the_batch_when_it_fails(digits):
    tx = optax.chain(ab.norm_test(0.5, min_batch_size=8, max_batch_size=512), optax.sgd(0.5))
    _, records = train(tx, digits, steps=40)
    failures = [r for r in records if not bool(r["state"][0].passed)]
    assert len(failures) >= 5
    for r in failures:
        assert r["next"] > r["used"] or r["next"] == 512, r
    for r in records:
        if bool(r["state"][0].passed):  # a passing test keeps the batch it was given
            assert r["next"] == r["used"], r
    sizes = [r["next"] for r in records]
    assert sizes == sorted(sizes) and sizes[-1] > 10 * sizes[0]


def test_adadagrad_reaches_90_percent(digits):
    # test="norm" (the default) runs on the plain statistics: no coordinates=True.
    tx = ab.adadagrad(0.1, eta=0.5, min_batch_size=8, max_batch_size=512)
    params, records = train(tx, digits, steps=100)
    sizes = [r["next"] for r in records]
    assert sizes[0] < 128 and sizes[-1] > 4 * sizes[0], sizes
    assert accuracy(params, digits) >= 0.9


def test_adadagrad_coordinate_test_asks_for_the_cap_at_once(digits):
    # The worst coordinate decides: the per-coordinate test wants the cap from its
    # first test, where the norm test on the same problem starts small and grows.
    bounds = {"min_batch_size": 8, "max_batch_size": 512}
    coordinate = ab.adadagrad(0.1, eta=0.5, test="coordinate", **bounds)
    _, records = train(coordinate, digits, steps=3, coordinates=True)
    assert [r["next"] for r in records] == [512] * 3
    _, records = train(ab.adadagrad(0.1, eta=0.5, **bounds), digits, steps=3)
    assert all(r["next"] < 128 for r in records), records


def test_adadagrad_norm_reaches_90_percent(digits):
    tx = ab.adadagrad_norm(0.5, eta=0.5, min_batch_size=8, max_batch_size=512)
    params, records = train(tx, digits, steps=100)
    assert records[-1]["next"] > 8
    assert accuracy(params, digits) >= 0.9
