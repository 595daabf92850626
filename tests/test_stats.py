"""Per-example statistics (`per_example_stats`) against brute force: the exact backend,
``backend="vmap"``, and the default, ``"auto"`` (the fast backend where it applies; see
also tests/test_stats_fast.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptive_batch as ab

# --------------------------------------------------------------------------- models
# Three small models with different ways for parameters to meet the data: dense
# layers, a 1-D convolution (weights shared over positions) and an embedding lookup.


def mlp_init(key, sizes=(6, 16, 8, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "b": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (n,)),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_loss(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def mlp_batch(key, n, features=6, classes=3):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (n, features)),
        "y": jax.random.randint(ky, (n,), 0, classes),
    }


def cnn_init(key, channels=2, filters=4, width=3, length=10, classes=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": jax.random.normal(k1, (filters, channels, width)) / np.sqrt(channels * width),
        "conv_b": 0.1 * jax.random.normal(k2, (filters,)),
        "out": jax.random.normal(k3, (filters * (length - width + 1), classes)) / 6.0,
    }


def cnn_loss(params, batch):
    h = jax.lax.conv_general_dilated(batch["x"], params["conv"], (1,), "VALID")
    h = jax.nn.relu(h + params["conv_b"][:, None])
    logits = h.reshape(h.shape[0], -1) @ params["out"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def cnn_batch(key, n, channels=2, length=10, classes=3):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (n, channels, length)),
        "y": jax.random.randint(ky, (n,), 0, classes),
    }


def embedding_init(key, vocab=11, dim=5):
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (vocab, dim)), "head": jax.random.normal(k2, (dim,))}


def embedding_loss(params, batch):
    pooled = params["embed"][batch["tokens"]].mean(axis=1)
    return 0.5 * (pooled @ params["head"] - batch["target"]) ** 2


def embedding_batch(key, n, vocab=11, length=4):
    kt, ky = jax.random.split(key)
    return {
        "tokens": jax.random.randint(kt, (n, length), 0, vocab),
        "target": jax.random.normal(ky, (n,)),
    }


MODELS = {
    "mlp": (mlp_init, mlp_loss, mlp_batch),
    "cnn": (cnn_init, cnn_loss, cnn_batch),
    "embedding": (embedding_init, embedding_loss, embedding_batch),
}


def make_problem(name, n, seed=0):
    init, loss_fn, make_batch = MODELS[name]
    key = jax.random.key(seed)
    return loss_fn, init(key), make_batch(jax.random.fold_in(key, 7), n)


# --------------------------------------------------------------------------- reference


def brute_force_stats(loss_fn, params, batch, mask=None, direction=None):
    """Float64 sums from per-example gradients computed one example at a time."""
    n = jax.tree.leaves(batch)[0].shape[0]
    mask = np.ones(n, bool) if mask is None else np.asarray(mask) != 0
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), params)
        batch64 = jax.tree.map(
            lambda x: jnp.asarray(np.asarray(x, np.float64) if x.dtype.kind == "f" else x), batch
        )
        losses, grads = [], []
        for i in range(n):
            if not mask[i]:
                continue
            example = jax.tree.map(lambda x, i=i: x[i : i + 1], batch64)
            loss, grad = jax.value_and_grad(lambda p, ex=example: loss_fn(p, ex)[0])(params64)
            losses.append(float(loss))
            grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)]))
    grads = np.stack(grads) if grads else np.zeros((0, _num_params(params)))
    grad_sum = grads.sum(0)
    d = grad_sum / max(len(grads), 1) if direction is None else _flat(direction)
    inner = grads @ d
    return {
        "count": float(len(grads)),
        "loss_sum": float(np.sum(losses)),
        "grad_sum": grad_sum,
        "sq_norm_sum": float(np.sum(grads**2)),
        "sq_sum": np.sum(grads**2, axis=0),
        "inner_sum": float(np.sum(inner)),
        "inner_sq_sum": float(np.sum(inner**2)),
    }


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _num_params(tree):
    return sum(np.size(x) for x in jax.tree.leaves(tree))


def as_flat_dict(stats: ab.GradStats):
    out = {
        "count": float(stats.count),
        "loss_sum": float(stats.loss_sum),
        "grad_sum": _flat(stats.grad_sum),
        "sq_norm_sum": float(stats.sq_norm_sum),
    }
    if stats.sq_sum is not None:
        out["sq_sum"] = _flat(stats.sq_sum)
    if stats.inner_sum is not None:
        out["inner_sum"] = float(stats.inner_sum)
        out["inner_sq_sum"] = float(stats.inner_sq_sum)
    return out


def assert_fields_close(actual: dict, expected: dict, rtol=1e-5):
    """Every field within rtol, relative to the field's norm (vectors) or value."""
    for name, value in actual.items():
        ref = np.asarray(expected[name], np.float64)
        err = np.linalg.norm(np.asarray(value, np.float64) - ref)
        scale = max(np.linalg.norm(ref), 1e-12)
        assert err <= rtol * scale, f"{name}: relative error {err / scale:.2e} > {rtol}"


# --------------------------------------------------------------------------- exactness

BACKENDS = ["vmap", "auto"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("microbatch_size", [None, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_field_matches_brute_force(name, microbatch_size, backend):
    loss_fn, params, batch = make_problem(name, n=13)
    stats_fn = ab.per_example_stats(
        loss_fn, coordinates=True, inner=True, microbatch_size=microbatch_size, backend=backend
    )
    assert_fields_close(
        as_flat_dict(stats_fn(params, batch)), brute_force_stats(loss_fn, params, batch)
    )


@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_given_direction_matches_brute_force(name):
    loss_fn, params, batch = make_problem(name, n=9)
    direction = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape) + 1.0), params)
    stats = ab.per_example_stats(loss_fn, inner=True)(params, batch, direction=direction)
    expected = brute_force_stats(loss_fn, params, batch, direction=direction)
    assert_fields_close(as_flat_dict(stats), expected)


def test_optional_fields_are_none_unless_asked_for():
    loss_fn, params, batch = make_problem("mlp", n=4)
    stats = ab.per_example_stats(loss_fn)(params, batch)
    assert stats.sq_sum is None and stats.inner_sum is None and stats.inner_sq_sum is None
    chex_tree_shapes_equal(stats.grad_sum, params)


def chex_tree_shapes_equal(a, b):
    import chex

    chex.assert_trees_all_equal_shapes(a, b)


def test_flax_nnx_model_through_split_and_merge():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1))
    )
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["x"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]

    batch = mlp_batch(jax.random.key(3), 7)
    stats = ab.per_example_stats(loss_fn, coordinates=True, inner=True)(params, batch)
    assert_fields_close(as_flat_dict(stats), brute_force_stats(loss_fn, params, batch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_params_accumulate_in_float32(backend):
    loss_fn, params, batch = make_problem("mlp", n=8)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    stats_fn = ab.per_example_stats(loss_fn, coordinates=True, inner=True, backend=backend)
    stats = stats_fn(params16, batch)
    assert stats.sq_norm_sum.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(stats.grad_sum))
    expected = brute_force_stats(loss_fn, params16, batch)
    # bfloat16 forward and backward passes: a few parts in a hundred.
    assert_fields_close(as_flat_dict(stats), expected, rtol=5e-2)


# --------------------------------------------------------------------------- masks, aggregation

N_ROWS, N_REAL = 10, 6


@functools.cache
def cached_stats_fn(name, **kwargs):
    """One jit-compiled stats function per configuration, shared by hypothesis examples."""
    return ab.per_example_stats(MODELS[name][1], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(N_ROWS)))
def test_padding_rows_change_nothing(backend, order):
    """Padding rows (mask 0) anywhere in the batch, even full of NaN, change no number."""
    _, params, batch = make_problem("mlp", n=N_ROWS)
    real_rows = np.sort(np.array(order[:N_REAL]))
    real = np.isin(np.arange(N_ROWS), real_rows)
    poisoned = {"x": jnp.where(real[:, None], batch["x"], jnp.nan), "y": batch["y"]}
    unpadded = jax.tree.map(lambda x: x[real_rows], batch)
    stats_fn = cached_stats_fn(
        "mlp", coordinates=True, inner=True, microbatch_size=4, backend=backend
    )
    padded = as_flat_dict(stats_fn(params, poisoned, mask=real))
    assert all(np.all(np.isfinite(v)) for v in padded.values())
    assert_fields_close(padded, as_flat_dict(stats_fn(params, unpadded)), rtol=2e-6)


@settings(max_examples=25, deadline=None)
@given(part=st.lists(st.integers(0, 2), min_size=N_ROWS, max_size=N_ROWS))
def test_stats_of_a_batch_are_the_sum_over_any_split(part):
    """Statistics over a split into three parts add up to the whole (common direction d)."""
    _, params, batch = make_problem("cnn", n=N_ROWS)
    direction = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    stats_fn = cached_stats_fn("cnn", coordinates=True, inner=True)
    part = np.array(part)
    pieces = [stats_fn(params, batch, mask=part == k, direction=direction) for k in range(3)]
    whole = stats_fn(params, batch, direction=direction)
    assert_fields_close(as_flat_dict(sum(pieces)), as_flat_dict(whole), rtol=2e-6)


@pytest.mark.devices(8)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_sliced_parts_equals_whole_and_psum_over_devices(backend):
    loss_fn, params, batch = make_problem("mlp", n=16)
    stats_fn = ab.per_example_stats(loss_fn, coordinates=True, backend=backend)
    whole = as_flat_dict(stats_fn(params, batch))
    parts = [
        jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 3), slice(3, 11), slice(11, 16))
    ]
    assert_fields_close(as_flat_dict(sum(stats_fn(params, p) for p in parts)), whole, rtol=2e-6)

    devices = jax.devices()[:8]
    assert len(devices) == 8, "tests/conftest.py asks for 8 simulated CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    spec = jax.sharding.PartitionSpec

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(spec(), spec("data")), out_specs=spec())
    def data_parallel(params, batch):
        return jax.lax.psum(stats_fn(params, batch), "data")

    assert_fields_close(as_flat_dict(data_parallel(params, batch)), whole, rtol=2e-6)


def test_adding_mismatched_stats_is_an_error():
    loss_fn, params, batch = make_problem("mlp", n=4)
    plain = ab.per_example_stats(loss_fn)(params, batch)
    with_coords = ab.per_example_stats(loss_fn, coordinates=True)(params, batch)
    with pytest.raises(ValueError, match="coordinates="):
        _ = plain + with_coords


@pytest.mark.parametrize("microbatch_size", [1, 3, 4, 7, 50])
def test_any_batch_size_with_any_microbatch_size(microbatch_size):
    loss_fn, params, batch = make_problem("embedding", n=7)
    expected = as_flat_dict(
        ab.per_example_stats(loss_fn, coordinates=True, inner=True)(params, batch)
    )
    chunked = ab.per_example_stats(
        loss_fn, coordinates=True, inner=True, microbatch_size=microbatch_size
    )
    assert_fields_close(as_flat_dict(chunked(params, batch)), expected, rtol=2e-6)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one_is_finite_and_documented(backend):
    loss_fn, params, batch = make_problem("mlp", n=1)
    stats_fn = ab.per_example_stats(loss_fn, coordinates=True, inner=True, backend=backend)
    stats = stats_fn(params, batch)
    assert_fields_close(as_flat_dict(stats), brute_force_stats(loss_fn, params, batch))
    # One example: no spread to measure. Unbiased estimates are defined as 0, not NaN.
    assert float(stats.variance(ddof=1)) == 0.0
    assert float(stats.inner_variance(ddof=1)) == 0.0
    assert all(float(jnp.max(v)) == 0.0 for v in jax.tree.leaves(stats.coordinate_variance(1)))
    # Biased (divisor b) estimates are exactly 0 for one example up to round-off.
    assert float(stats.variance(ddof=0)) <= 1e-6 * float(stats.sq_norm_sum)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_batch_gives_zeros_not_nan(backend):
    loss_fn, params, batch = make_problem("mlp", n=6)
    stats_fn = ab.per_example_stats(loss_fn, coordinates=True, inner=True, backend=backend)
    stats = stats_fn(params, batch, mask=jnp.zeros(6))
    assert float(stats.count) == 0.0
    derived = [
        stats.mean_loss,
        stats.mean_grad,
        stats.variance(0),
        stats.variance(1),
        stats.coordinate_variance(1),
        stats.inner_variance(1),
        stats.orthogonal_variance(1),
    ]
    for leaf in jax.tree.leaves((stats, derived)):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


# --------------------------------------------------------------------------- derived estimates


def test_variance_helpers_match_numpy_definitions():
    loss_fn, params, batch = make_problem("cnn", n=11)
    stats = ab.per_example_stats(loss_fn, coordinates=True, inner=True)(params, batch)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch64 = {"x": jnp.asarray(batch["x"], jnp.float64), "y": batch["y"]}
        grads = jax.vmap(
            jax.grad(lambda p, ex: loss_fn(p, jax.tree.map(lambda x: x[None], ex))[0]),
            in_axes=(None, 0),
        )(params64, batch64)
        g = np.concatenate([np.asarray(x).reshape(11, -1) for x in jax.tree.leaves(grads)], axis=1)
    b, mean = g.shape[0], g.mean(0)
    p = g @ mean
    for ddof in (0, 1):
        expected = {
            "variance": np.sum((g - mean) ** 2) / (b - ddof),
            "coordinate": np.sum((g - mean) ** 2, axis=0) / (b - ddof),
            "inner": np.sum((p - mean @ mean) ** 2) / (b - ddof),
            "orthogonal": np.sum((g - np.outer(p / (mean @ mean), mean)) ** 2) / (b - ddof),
        }
        actual = {
            "variance": float(stats.variance(ddof)),
            "coordinate": _flat(stats.coordinate_variance(ddof)),
            "inner": float(stats.inner_variance(ddof)),
            "orthogonal": float(stats.orthogonal_variance(ddof)),
        }
        assert_fields_close(actual, expected, rtol=2e-4)
    np.testing.assert_allclose(float(stats.mean_loss), float(stats.loss_sum) / b, rtol=1e-6)
    np.testing.assert_allclose(float(stats.mean_grad_sq_norm), mean @ mean, rtol=1e-5)


def test_helpers_needing_missing_fields_say_how_to_get_them():
    loss_fn, params, batch = make_problem("mlp", n=4)
    stats = ab.per_example_stats(loss_fn)(params, batch)
    with pytest.raises(ValueError, match="coordinates=True"):
        stats.coordinate_variance()
    with pytest.raises(ValueError, match="inner=True"):
        stats.inner_variance()
    with pytest.raises(ValueError, match="inner=True"):
        stats.orthogonal_variance()


# --------------------------------------------------------------------------- compilation


def test_no_recompile_on_second_call_with_same_shapes():
    traces = []

    def counting_loss(params, batch):
        traces.append(1)
        return mlp_loss(params, batch)

    _, params, batch = make_problem("mlp", n=8)
    stats_fn = ab.per_example_stats(counting_loss, inner=True, microbatch_size=3)
    stats_fn(params, batch)
    traced_once = len(traces)
    other_batch = mlp_batch(jax.random.key(11), 8)
    stats_fn(params, other_batch, mask=jnp.ones(8))
    stats_fn(params, other_batch, mask=jnp.ones(8))
    assert traced_once > 0
    # The first call without a mask and the later ones with a mask differ in signature:
    # one more trace for that, then none.
    traced_twice = len(traces)
    stats_fn(jax.tree.map(lambda x: x + 1, params), batch, mask=jnp.zeros(8))
    assert len(traces) == traced_twice


def test_usable_inside_an_outer_jit():
    loss_fn, params, batch = make_problem("mlp", n=8)
    stats_fn = ab.per_example_stats(loss_fn, inner=True)

    @jax.jit
    def step(params, batch):
        stats = stats_fn(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, stats.mean_grad), stats.variance()

    new_params, variance = step(params, batch)
    assert np.isfinite(float(variance)) and float(variance) > 0
    chex_tree_shapes_equal(new_params, params)


# --------------------------------------------------------------------------- bad input


def test_scalar_loss_is_rejected_with_the_fix():
    _, params, batch = make_problem("mlp", n=5)
    stats_fn = ab.per_example_stats(lambda p, b: mlp_loss(p, b).mean())
    with pytest.raises(ValueError, match=r"per-example losses of shape \(B,\) = \(5,\).*drop"):
        stats_fn(params, batch)


def test_wrong_loss_shape_is_rejected():
    _, params, batch = make_problem("mlp", n=5)
    stats_fn = ab.per_example_stats(lambda p, b: mlp_loss(p, b)[:, None])
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(5,\), got shape \(5, 1\)"):
        stats_fn(params, batch)


def test_wrong_mask_shape_is_rejected():
    loss_fn, params, batch = make_problem("mlp", n=5)
    with pytest.raises(ValueError, match=r"mask of shape \(5,\)"):
        ab.per_example_stats(loss_fn)(params, batch, mask=jnp.ones((5, 1)))


def test_integer_params_are_rejected_naming_the_leaf():
    loss_fn, params, batch = make_problem("embedding", n=5)
    params["head"] = params["head"].astype(jnp.int32)
    with pytest.raises(TypeError, match=r"params\['head'\] has dtype int32"):
        ab.per_example_stats(loss_fn)(params, batch)


def test_ragged_batch_is_rejected_naming_the_sizes():
    loss_fn, params, batch = make_problem("mlp", n=5)
    batch["y"] = batch["y"][:4]
    with pytest.raises(ValueError, match=r"different leading.*\['x'\]: 5.*\['y'\]: 4"):
        ab.per_example_stats(loss_fn)(params, batch)


def test_direction_with_wrong_structure_is_rejected():
    loss_fn, params, batch = make_problem("embedding", n=5)
    with pytest.raises(ValueError, match="same structure as params"):
        ab.per_example_stats(loss_fn, inner=True)(params, batch, direction=params["head"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "magic"}, "backend='magic' is not available"),
        ({"microbatch_size": 0}, "microbatch_size=0 must be a positive int"),
        ({"microbatch_size": 2.5}, "microbatch_size=2.5 must be a positive int"),
    ],
)
def test_bad_factory_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ab.per_example_stats(mlp_loss, **kwargs)
