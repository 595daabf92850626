"""Sums over the rows of an array (`_row_sums.row_sums`) against NumPy float64, and the
exact backend's coordinate sums, which use them, against brute-force gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_batch.stats import _vmap, per_example_stats
from adaptive_batch.stats._row_sums import _WIDEST_REDUCED_ROW, row_sums

# Narrow rows take XLA's reduction, wide ones the row loop (or the product with ones).
SHAPES = [(64, 40), (6, 3, _WIDEST_REDUCED_ROW // 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("squares", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("square_blocks", [True, False])
def test_row_sums_match_float64(shape, with_mask, squares, dtype, square_blocks):
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    mask = None
    if with_mask:  # the masked rows hold NaN, which must not reach the sums
        mask = jnp.arange(shape[0]) % 3 != 1
        x = jnp.where(mask.reshape(-1, *[1] * (len(shape) - 1)), x, jnp.nan)
    total, square_total = jax.jit(
        lambda x, m: row_sums(x, squares=squares, mask=m, square_blocks=square_blocks)
    )(x, mask)

    rows = np.asarray(x.astype(jnp.float32), np.float64)
    if with_mask:
        rows = rows[np.asarray(mask)]
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(total, rows.sum(0), rtol=1e-5, atol=1e-5)
    if squares:
        np.testing.assert_allclose(square_total, (rows**2).sum(0), rtol=1e-5, atol=1e-5)
    else:
        assert square_total is None


@pytest.mark.parametrize("squares", [True, False])
def test_wide_rows_are_added_one_by_one_on_cpu_only(squares):
    """On XLA:CPU a reduction over the leading axis of wide rows is slow, so the rows are
    added in a loop (or, without squares, by a product with ones); lowered for CUDA from
    this machine, it stays one reduction."""
    x = jnp.ones((8, _WIDEST_REDUCED_ROW + 1))

    def lowered(platform):
        fn = jax.jit(lambda x: row_sums(x, squares=squares))
        return jax.export.export(fn, platforms=(platform,))(x).mlir_module()

    cpu, cuda = lowered("cpu"), lowered("cuda")
    assert cpu.count("stablehlo.while") == (1 if squares else 0)
    assert cpu.count("stablehlo.dot_general") == (0 if squares else 1)
    assert cuda.count("stablehlo.while") == cuda.count("stablehlo.dot_general") == 0


@pytest.mark.parametrize("square_blocks", [True, False])
def test_narrow_rows_square_by_blocks_only_when_asked(square_blocks):
    """Rows of up to `_WIDEST_REDUCED_ROW` entries take XLA's reduction; on XLA:CPU their
    squares are summed over blocks of rows (a loop) unless ``square_blocks=False``."""
    x = jnp.ones((8, _WIDEST_REDUCED_ROW))
    fn = jax.jit(lambda x: row_sums(x, square_blocks=square_blocks))
    cpu = jax.export.export(fn, platforms=("cpu",))(x).mlir_module()
    assert cpu.count("stablehlo.while") == (1 if square_blocks else 0)
    assert cpu.count("stablehlo.dot_general") == 0


def _wide_problem():
    """A 128×129 weight: per-example gradients of 16512 entries, above the widest row
    that XLA's reduction sums (`_WIDEST_REDUCED_ROW`), and a NaN padding row."""
    ks = jax.random.split(jax.random.key(1), 4)
    params = {
        "w": jax.random.normal(ks[0], (128, 129)) / 11,
        "b": jax.random.normal(ks[1], (129,)),
    }
    x = jax.random.normal(ks[2], (12, 128)).at[4].set(jnp.nan)
    y = jax.random.normal(ks[3], (12,))
    mask = jnp.ones(12, bool).at[4].set(False)

    def loss_fn(p, batch):
        x, y = batch
        return (jnp.sum(jnp.tanh(x @ p["w"] + p["b"]), -1) - y) ** 2

    return loss_fn, params, (x, y), mask


@pytest.fixture(params=["cpu", "elsewhere"])
def norms_route(request, monkeypatch):
    """The exact backend's norms-only route of XLA:CPU, or that of other platforms
    (`_vmap._norm_sums`, ``by_columns``) forced here on the CPU."""
    if request.param == "elsewhere":
        monkeypatch.setattr(_vmap, "on_cpu", lambda on_xla_cpu, elsewhere, *a: elsewhere(*a))
    return request.param


@pytest.mark.parametrize("coordinates", [True, False])
def test_exact_backend_with_wide_leaves_matches_brute_force(coordinates, norms_route):
    """Coordinates: the wide rows go through the row loop. Norms: on XLA:CPU, Σgᵢ is the
    gradient of the masked loss sum, over real rows standing in for the NaN padding;
    elsewhere, column sums as with coordinates."""
    loss_fn, params, (x, y), mask = _wide_problem()
    stats_fn = per_example_stats(loss_fn, backend="vmap", coordinates=coordinates)
    stats = stats_fn(params, (x, y), mask)

    def example_grad(i):
        g = jax.grad(lambda p: loss_fn(p, (x[i : i + 1], y[i : i + 1]))[0])(params)
        return jax.tree.map(lambda v: np.asarray(v, np.float64), g)

    grads = [example_grad(i) for i in range(12) if mask[i]]
    for name in params:
        per_example = np.stack([g[name] for g in grads])
        # atol at 1e-5 of the field's scale: entries near zero are differences of terms of
        # that scale, summed in another order on a GPU (1.5e-5 off at a scale of 33).
        scale = np.abs(per_example.sum(0)).max()
        np.testing.assert_allclose(
            stats.grad_sum[name], per_example.sum(0), rtol=1e-4, atol=1e-5 * scale
        )
        if coordinates:
            np.testing.assert_allclose(stats.sq_sum[name], (per_example**2).sum(0), rtol=1e-4)
    total = sum((np.stack([g[n] for g in grads]) ** 2).sum() for n in params)
    np.testing.assert_allclose(stats.sq_norm_sum, total, rtol=1e-5)
    assert int(stats.count) == 11


@pytest.mark.parametrize("coordinates", [True, False])
def test_exact_backend_with_wide_leaves_gives_zeros_for_all_padding(coordinates, norms_route):
    """No real row to stand in for the NaN padding: zeros, not NaN."""
    loss_fn, params, (x, y), _ = _wide_problem()
    x = jnp.full_like(x, jnp.nan)
    stats_fn = per_example_stats(loss_fn, backend="vmap", coordinates=coordinates)
    stats = stats_fn(params, (x, y), jnp.zeros(12, bool))
    for leaf in jax.tree.leaves(stats):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.devices(8)
def test_exact_backend_norms_of_wide_leaves_sum_over_devices():
    """The backward pass for Σgᵢ of wide leaves inside ``shard_map``: per-device sums that
    add up, over 8 devices, to the whole batch's (no psum of its own)."""
    loss_fn, params, (x, y), mask = _wide_problem()
    x, y = jnp.concatenate([x, x[:4]]), jnp.concatenate([y, y[:4]])
    mask = jnp.concatenate([mask, jnp.ones(4, bool)])  # 16 rows, one of them NaN padding
    stats_fn = per_example_stats(loss_fn, backend="vmap")
    whole = stats_fn(params, (x, y), mask)

    devices = jax.devices()[:8]
    assert len(devices) == 8, "tests/conftest.py asks for 8 simulated CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    spec = jax.sharding.PartitionSpec

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(spec(), spec("data"), spec("data")), out_specs=spec())
    def data_parallel(params, batch, mask):
        return jax.lax.psum(stats_fn(params, batch, mask), "data")

    sharded = data_parallel(params, (x, y), mask)
    for name, a, b in zip(("count", "loss", "grad", "norms"), whole, sharded, strict=False):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5, err_msg=name)


def test_exact_norms_off_cpu_sum_columns_behind_a_barrier():
    """Norms only, on other platforms than XLA:CPU: Σgᵢ and Σgᵢ⊙gᵢ by column sums, as with
    coordinates, with a barrier before the squares' total. XLA:GPU fused Σgᵢ with the
    per-row ‖gᵢ‖² into kernels that took minutes to compile and failed with a misaligned
    address (H100, jax 0.11.2). Lowered for CUDA from this CPU machine, the barrier is
    there; the CPU program keeps the per-row norms."""
    loss_fn, params, (x, y), mask = _wide_problem()
    stats_fn = per_example_stats(loss_fn, backend="vmap")

    def barriers(platform):
        exported = jax.export.export(stats_fn, platforms=(platform,))(params, (x, y), mask)
        return exported.mlir_module().count("stablehlo.optimization_barrier")

    assert (barriers("cpu"), barriers("cuda")) == (0, 1)
