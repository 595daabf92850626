"""Built-in models: the published MNIST-1D designs, per-example losses, a training check."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab
from adaptive_batch.datasets import make_synthetic
from adaptive_batch.models import MODELS, functional, make_model


def _leaves(params):
    return {"/".join(map(str, path)): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}  # fmt: skip


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _batch(n=6, length=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, length)).astype(np.float32),
            "y": rng.integers(10, size=n).astype(np.int32)}  # fmt: skip


def _np_cross_entropy(logits, y):
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(y)), y]


@pytest.mark.parametrize(
    ("name", "expected"),
    # The PyTorch models of the MNIST-1D paper on length-40 input, counted by hand:
    # logreg 40·10+10; MLPBase 40·100+100 + 100·100+100 + 100·10+10;
    # ConvBase 1·25·5+25 + 2·(25·25·3+25) + 125·10+10.
    [("logreg", 410), ("mlp", 15210), ("cnn", 5210)],
)
def test_parameter_counts_match_published_models(name, expected):
    assert _count(functional(make_model(name, (40,), 10)).params) == expected


@pytest.mark.parametrize(
    ("name", "input_shape"), [("logreg", (8, 8)), ("mlp", (40,)), ("cnn", (40,))]
)
def test_per_example_loss_shape_and_independence(name, input_shape):
    fns = functional(make_model(name, input_shape, 10, seed=1))
    batch = _batch(5, math.prod(input_shape))
    batch["x"] = batch["x"].reshape((5, *input_shape))
    losses = fns.loss_fn(fns.params, batch)
    assert losses.shape == (5,)
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)
    # Each example's loss depends on that example alone (the per_example_stats contract).
    changed = dict(batch, x=batch["x"].copy())
    changed["x"][1:] += 3.0
    np.testing.assert_allclose(fns.loss_fn(fns.params, changed)[0], losses[0], rtol=1e-6)
    assert fns.correct_fn(fns.params, batch).shape == (5,)


def test_logreg_loss_against_numpy_float64():
    fns = functional(make_model("logreg", (40,), 10, seed=3))
    leaves = _leaves(fns.params)
    w = next(v for k, v in leaves.items() if "kernel" in k)
    b = next(v for k, v in leaves.items() if "bias" in k)
    batch = _batch(7)
    expected = _np_cross_entropy(batch["x"].astype(np.float64) @ w + b, batch["y"])
    np.testing.assert_allclose(fns.loss_fn(fns.params, batch), expected, rtol=1e-5)
    correct = (batch["x"] @ w + b).argmax(-1) == batch["y"]
    np.testing.assert_array_equal(fns.correct_fn(fns.params, batch), correct)


def _np_conv(h, kernel, bias, stride=2, pad=1):
    """1-D convolution, channels last, float64: out[t] = Σ_j,c hpad[s·t + j, c] K[j, c, :]."""
    _, length, _ = h.shape
    k = kernel.shape[0]
    hp = np.pad(h, ((0, 0), (pad, pad), (0, 0)))
    out_len = (length + 2 * pad - k) // stride + 1
    out = np.stack([np.einsum("njc,jco->no", hp[:, stride * t : stride * t + k], kernel)
                    for t in range(out_len)], axis=1)  # fmt: skip
    return out + bias


def test_cnn_forward_against_numpy_float64():
    """The ConvBase design: kernels 5, 3, 3, stride 2, padding 1, 25 channels, ReLU, linear."""
    fns = functional(make_model("cnn", (40,), 10, seed=4))
    leaves = _leaves(fns.params)
    convs = sorted(k for k in leaves if "convs" in k and "kernel" in k)
    assert [leaves[k].shape for k in convs] == [(5, 1, 25), (3, 25, 25), (3, 25, 25)]
    batch = _batch(4)
    h = batch["x"].astype(np.float64)[..., None]
    lengths = []
    for kernel_key in convs:
        bias = leaves[kernel_key.replace("kernel", "bias")]
        h = np.maximum(_np_conv(h, leaves[kernel_key], bias), 0)
        lengths.append(h.shape[1])
    assert lengths == [19, 10, 5]  # 25·5 = 125 features into the head, as published
    w = next(v for k, v in leaves.items() if "linear" in k and "kernel" in k)
    b = next(v for k, v in leaves.items() if "linear" in k and "bias" in k)
    logits = h.reshape(len(h), -1) @ w + b
    np.testing.assert_allclose(fns.logits_fn(fns.params, batch["x"]), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_is_pytorch_default_uniform(name):
    """Weights and biases in ±1/√fan_in (PyTorch's default), spread over the interval."""
    fns = functional(make_model(name, (40,), 10))
    for key, value in _leaves(fns.params).items():
        if "kernel" not in key:
            continue
        fan_in = math.prod(value.shape[:-1])
        bound = 1 / math.sqrt(fan_in)
        bias = _leaves(fns.params)[key.replace("kernel", "bias")]
        assert np.abs(value).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(value).max() > 0.8 * bound  # uniform, not a narrow normal


def test_bad_names_and_short_input():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet'.*logreg, mlp, cnn"):
        make_model("resnet", (40,), 10)
    with pytest.raises(ValueError, match="too short"):
        make_model("cnn", (2,), 10)


def test_cabs_trains_the_mlp_on_synthetic_data():
    """A short CABS run through per_example_stats: loss falls, accuracy beats chance."""
    ds = make_synthetic(num_train=512, num_test=256, dim=16, num_classes=4, seed=0)
    fns = functional(make_model("mlp", (16,), 4, seed=0))
    stats_fn = ab.per_example_stats(fns.loss_fn)
    tx = ab.cabs(0.1, min_batch_size=16, max_batch_size=512)

    @jax.jit
    def step(params, state, batch):
        stats = stats_fn(params, batch)
        updates, state = tx.update(stats.mean_grad, state, params, grad_stats=stats)
        return optax.apply_updates(params, updates), state, stats.mean_loss

    params, state = fns.params, tx.init(fns.params)
    test = jax.tree.map(jnp.asarray, ds.test)
    initial = float(jnp.mean(fns.loss_fn(params, test)))
    for i in range(150):
        rows = np.arange(i * 64, (i + 1) * 64) % 512
        params, state, _ = step(params, state, {k: v[rows] for k, v in ds.train.items()})
    final = float(jnp.mean(fns.loss_fn(params, test)))
    accuracy = float(jnp.mean(fns.correct_fn(params, test)))
    assert final < 0.7 * initial
    assert accuracy > 0.6  # chance is 0.25
    assert 16 <= int(ab.suggested_batch_size(state)) <= 512
