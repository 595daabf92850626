"""Equinox models: the "fast" statistics against the exact vmap backend, and training
with `make_train_step`.

Equinox modules work on one example and are mapped over the batch with ``jax.vmap``
inside the loss; parameters are the inexact arrays of the module (``eqx.partition``).
Equinox is a test dependency (``pip install -e ".[test]"``), so these tests run in CI.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from test_stats_fast import (
    assert_layer_matches_vmap_without_fallback,
    assert_stats_close,
    both_backends,
    keys,
)

import adaptive_batch as ab
from adaptive_batch.stats import fast_stats_report, per_example_stats


class ConvNet(eqx.Module):
    """Strided, padded 1-D convolution, LayerNorm and an MLP, on (channels, length)."""

    conv: eqx.nn.Conv1d
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=1, key=k1)
        self.norm = eqx.nn.LayerNorm(4 * 6)
        self.mlp = eqx.nn.MLP(4 * 6, 3, width_size=16, depth=2, key=k2)

    def __call__(self, x):
        return self.mlp(self.norm(jax.nn.relu(self.conv(x)).reshape(-1)))


class AttentionNet(eqx.Module):
    """Token embedding, multi-head self-attention, LayerNorm, mean-pooled classifier."""

    embed: eqx.nn.Embedding
    attention: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab, width, key):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, width, key=k[0])
        self.attention = eqx.nn.MultiheadAttention(2, width, key=k[1])
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, 3, key=k[2])

    def __call__(self, ids):
        h = jax.vmap(self.embed)(ids)
        h = h + self.attention(h, h, h)
        return self.head(jnp.mean(jax.vmap(self.norm)(h), 0))


class ScannedMLP(eqx.Module):
    """Linear layers made by ``eqx.filter_vmap`` (stacked leaves), run by ``lax.scan``."""

    layers: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, width, depth, key):
        k1, k2 = jax.random.split(key)
        self.layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(width, width, key=k))(
            jax.random.split(k1, depth)
        )
        self.head = eqx.nn.Linear(width, 3, key=k2)

    def __call__(self, x):
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def step(h, layer_params):
            return jax.nn.gelu(eqx.combine(layer_params, static)(h)), None

        h, _ = jax.lax.scan(step, x, dynamic)
        return self.head(h)


def equinox_loss(model):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        logits = jax.vmap(eqx.combine(params, static))(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


def conv_batch(n):
    ks = keys(2)
    return {"x": jax.random.normal(ks[0], (n, 3, 11)), "y": jax.random.randint(ks[1], (n,), 0, 3)}


def test_equinox_conv_layernorm_mlp_with_coordinates_and_mask():
    loss_fn, params = equinox_loss(ConvNet(jax.random.key(0)))
    batch = conv_batch(10)
    mask = jnp.ones(10).at[3].set(0)
    vmap, fast = both_backends(loss_fn, params, batch, mask, coordinates=True)
    assert_stats_close(vmap, fast)
    report = fast_stats_report(loss_fn, params, batch, coordinates=True)
    assert report[".conv.weight"] == "conv"
    assert report[".norm.weight"] == "elementwise"
    assert report[".mlp.layers[1].weight"] == "dense"
    assert not [path for path, rule in report.items() if rule.startswith("fallback")]


def test_equinox_layers_stacked_by_filter_vmap_and_scanned():
    loss_fn, params = equinox_loss(ScannedMLP(5, 3, jax.random.key(0)))
    ks = keys(2)
    batch = {"x": jax.random.normal(ks[0], (8, 5)), "y": jax.random.randint(ks[1], (8,), 0, 3)}
    vmap, fast = both_backends(loss_fn, params, batch, jnp.ones(8).at[6].set(0), coordinates=True)
    assert_stats_close(vmap, fast)
    report = fast_stats_report(loss_fn, params, batch, coordinates=True)
    assert report[".layers.weight"] == "dense" and report[".layers.bias"] == "elementwise"
    assert not [path for path, rule in report.items() if rule.startswith("fallback")]


def test_equinox_embedding_uses_the_embedding_rule():
    """eqx.nn.Embedding indexes one token at a time under vmap: a batched dynamic slice
    with (row, 0) indices, clamped. Repeated ids within an example and an id out of
    range (clamped to the last row, as the lookup itself does) are included."""
    vocab = 7
    loss_fn, params = equinox_loss(AttentionNet(vocab, 8, jax.random.key(1)))
    ks = keys(2)
    ids = jax.random.randint(ks[0], (9, 6), 0, vocab)
    ids = ids.at[0].set(jnp.array([2, 5, 2, 2, 5, 1])).at[1, 3].set(vocab + 3)
    batch = {"x": ids, "y": jax.random.randint(ks[1], (9,), 0, 3)}
    mask = jnp.ones(9).at[8].set(0)
    for coordinates in (False, True):
        vmap, fast = both_backends(loss_fn, params, batch, mask, coordinates=coordinates)
        assert_stats_close(vmap, fast)
    report = fast_stats_report(loss_fn, params, batch, coordinates=True)
    assert report[".embed.weight"] == "embedding"
    assert report[".attention.query_proj.weight"] == "dense-products"
    assert not [path for path, rule in report.items() if rule.startswith("fallback")]


def test_equinox_step_under_jit_with_auto_backend():
    loss_fn, params = equinox_loss(ConvNet(jax.random.key(2)))
    batch = conv_batch(8)
    auto = jax.jit(per_example_stats(loss_fn, coordinates=True))(params, batch, None)
    vmap = per_example_stats(loss_fn, backend="vmap", coordinates=True)(params, batch)
    assert_stats_close(vmap, auto)


LAYERS = {  # name: (module from a key, shape of one example)
    "Conv2d, groups": (lambda k: eqx.nn.Conv2d(4, 6, 3, 2, 1, groups=2, key=k), (4, 9, 9)),
    "ConvTranspose2d": (lambda k: eqx.nn.ConvTranspose2d(3, 4, 3, 2, key=k), (3, 5, 5)),
    "GroupNorm": (lambda k: eqx.nn.GroupNorm(2, 4), (4, 5)),
    "RMSNorm": (lambda k: eqx.nn.RMSNorm(5), (5,)),
    "PReLU": (lambda k: eqx.nn.PReLU(), (5,)),
    "Linear to a scalar": (lambda k: eqx.nn.Linear(5, "scalar", key=k), (5,)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYERS))
def test_equinox_layers_have_rules_and_match_vmap(name):
    make, shape = LAYERS[name]
    params, static = eqx.partition(make(jax.random.key(3)), eqx.is_inexact_array)

    def loss_fn(params, batch):
        out = jax.vmap(eqx.combine(params, static))(batch)
        return jnp.sum(out.reshape(out.shape[0], -1) ** 2, -1)

    assert_layer_matches_vmap_without_fallback(loss_fn, params, shape)


def test_equinox_model_trains_with_make_train_step():
    """The partitioned parameters go through the plain-JAX train step and an adaptive
    transform: the loss falls and the suggested batch size is within the bounds."""
    loss_fn, params = equinox_loss(ConvNet(jax.random.key(4)))
    tx = ab.adadagrad(0.05, min_batch_size=4, max_batch_size=64)
    step = ab.make_train_step(loss_fn, tx)
    opt_state = tx.init(params)
    batch = conv_batch(16)
    mask = jnp.ones(16, bool)
    losses = []
    for _ in range(5):
        params, opt_state, metrics = step(params, opt_state, batch, mask)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert 4 <= int(ab.suggested_batch_size(opt_state)) <= 64
