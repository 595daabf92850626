"""Parameters sharded over a mesh axis (FSDP / tensor parallel), the batch over another:
statistics equal to the unsharded ones, and train steps that keep every sharding and
compile once. A 2 x 4 mesh of the 8 simulated CPU devices, with JAX's automatic
sharding propagation (mesh axes of type Auto, JAX's default for `jax.sharding.Mesh`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaptive_batch as ab

pytestmark = pytest.mark.devices(8)


def loss_fn(params, batch):
    """A two-layer MLP: w1 column-parallel (its output units over ``model``), w2 with
    its input units over ``model`` (the layout of tensor parallelism)."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return 0.5 * jnp.sum((h @ params["w2"] - batch["y"]) ** 2, axis=-1)


def problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(8, 16)).astype(np.float32) / 3,
        "b1": rng.normal(size=16).astype(np.float32) / 10,
        "w2": rng.normal(size=(16, 4)).astype(np.float32) / 4,
    }
    batch = {
        "x": rng.normal(size=(32, 8)).astype(np.float32),
        "y": rng.normal(size=(32, 4)).astype(np.float32),
    }
    return params, batch


def mesh_and_specs():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
    return mesh, specs


def shard(mesh, params, specs, batch):
    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    return placed, jax.device_put(batch, NamedSharding(mesh, P("data")))


@pytest.mark.parametrize("backend", ["vmap", "fast", "auto"])
def test_statistics_of_sharded_parameters_equal_the_unsharded_ones(backend, recwarn):
    params, batch = problem()
    mesh, specs = mesh_and_specs()
    stats_fn = ab.per_example_stats(loss_fn, backend=backend, coordinates=True, inner=True)
    expected = stats_fn(params, batch)
    sharded = stats_fn(*shard(mesh, params, specs, batch))
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
    # No fallback, no "please report": the fast backend runs its own rules here.
    assert not [w for w in recwarn if "fall" in str(w.message).lower()]


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(ab.norm_test(0.5, min_batch_size=8), optax.adam(1e-2)),
        lambda: ab.adadagrad(0.1, eta=0.5, min_batch_size=8),
        lambda: ab.cabs(0.1, min_batch_size=8),
    ],
    ids=["norm_test+adam", "adadagrad", "cabs"],
)
def test_train_step_keeps_the_shardings_and_compiles_once(make_tx):
    params, batch = problem()
    mesh, specs = mesh_and_specs()
    tx = make_tx()
    step = ab.make_train_step(loss_fn, tx)
    unsharded = (params, tx.init(params))
    sharded_params, sharded_batch = shard(mesh, params, specs, batch)
    state = (sharded_params, tx.init(sharded_params))
    with ab.training.CompileCounter() as compiles:
        for _ in range(3):
            state = step(*state, sharded_batch)[:2]
            unsharded = step(*unsharded, batch)[:2]
    assert compiles.count(step.name) == 2  # once sharded, once not: no recompile
    for name, leaf in state[0].items():
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, specs[name]), leaf.ndim)
        np.testing.assert_allclose(leaf, unsharded[0][name], rtol=1e-5, atol=1e-6)
    # Optimizer states shaped like a parameter keep its sharding (Adam's moments,
    # AdaGrad's sums).
    shaped = {np.shape(v): specs[k] for k, v in params.items()}
    for leaf in jax.tree.leaves(state[1]):
        spec = shaped.get(np.shape(leaf))
        if spec is not None and np.ndim(leaf) > 0:
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
    assert int(ab.suggested_batch_size(state[1])) == int(ab.suggested_batch_size(unsharded[1]))
