"""Curvature: HVP, Lanczos, SLQ, top eigenvalue, Hutchinson trace, against dense Hessians.

References are float64: `jax.hessian` of the flattened mean loss and `numpy.linalg.eigh`,
and a NumPy Lanczos written here. Statistical checks use tolerances of 5 standard
deviations computed exactly from the dense Hessian (a Rademacher quadratic form zᵀAz has
variance 2 Σ_{i≠j} A_ij²), so they fail by chance with probability < 1e-6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from adaptive_batch.curvature import (
    hutchinson_trace,
    hvp,
    lanczos,
    mean_loss,
    plot_spectrum,
    spectral_density,
    top_eigenvalue,
)

# ----------------------------------------------------------------------------- models


def mlp_loss(params, batch):
    """Per-example softmax cross-entropy of a one-hidden-layer tanh MLP."""
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]


def make_problem(dtype=jnp.float32, batch_size=12, sizes=(4, 5, 3), seed=0):
    """A small MLP (43 parameters by default) and a batch; weights large enough that the
    Hessian is far from a multiple of the identity."""
    d_in, d_hidden, d_out = sizes
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "w1": jax.random.normal(k[0], (d_in, d_hidden), dtype),
        "b1": 0.1 * jax.random.normal(k[1], (d_hidden,), dtype),
        "w2": jax.random.normal(k[2], (d_hidden, d_out), dtype),
        "b2": 0.1 * jax.random.normal(k[3], (d_out,), dtype),
    }
    batch = {
        "x": jax.random.normal(k[4], (batch_size, d_in), dtype),
        "y": jax.random.randint(k[5], (batch_size,), 0, d_out),
    }
    return params, batch


def dense_hessian(loss_fn, params, batch, mask=None):
    """The float64 Hessian of the (masked) mean loss w.r.t. the flattened params."""
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        batch64 = jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            batch,
        )
        return np.asarray(_compiled_hessian(loss_fn, params64, batch64, mask), np.float64)


# Compiled whole, once per loss and shapes: op by op, jax.hessian compiled ~140 small
# programs of its own for each new shape.
@functools.partial(jax.jit, static_argnums=0)
def _compiled_hessian(loss_fn, params, batch, mask):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda x: mean_loss(loss_fn, unravel(x), batch, mask))(flat)


def numpy_lanczos(h, start, m):
    """Reference: Lanczos with full reorthogonalisation in NumPy float64."""
    q = start / np.linalg.norm(start)
    basis, alphas, betas = [q], [], []
    for j in range(m):
        w = h @ basis[j]
        alphas.append(basis[j] @ w)
        for _ in range(2):
            stacked = np.array(basis)
            w = w - stacked.T @ (stacked @ w)
        if j < m - 1:
            betas.append(np.linalg.norm(w))
            basis.append(w / betas[-1])
    return np.array(alphas), np.array(betas)


def rademacher_sd(a, n, num_probes):
    """Standard deviation of the mean of num_probes values vᵀAv, v = z/√n, z Rademacher."""
    off_diagonal = np.sum(a**2) - np.sum(np.diag(a) ** 2)
    return np.sqrt(2 * off_diagonal / n**2 / num_probes)


# ----------------------------------------------------------------------------- HVP


def test_hvp_matches_central_finite_differences_and_dense_hessian():
    with jax.enable_x64(True):
        params, batch = make_problem(jnp.float64)
        v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
        product = ravel_pytree(hvp(mlp_loss, params, batch, v))[0]

        grad_fn = jax.jit(jax.grad(lambda p: mean_loss(mlp_loss, p, batch)))
        eps = 1e-5
        plus = jax.tree.map(lambda p, d: p + eps * d, params, v)
        minus = jax.tree.map(lambda p, d: p - eps * d, params, v)
        fd = (ravel_pytree(grad_fn(plus))[0] - ravel_pytree(grad_fn(minus))[0]) / (2 * eps)
        # Central differences: truncation error O(eps²) ≈ 1e-10, round-off ≈ 1e-16/eps.
        np.testing.assert_allclose(product, fd, rtol=1e-7, atol=1e-8)

        h = dense_hessian(mlp_loss, params, batch)
        np.testing.assert_allclose(product, h @ np.asarray(ravel_pytree(v)[0]), rtol=1e-10)


def test_hvp_rejects_mismatched_vector_and_mean_losses():
    params, batch = make_problem()
    with pytest.raises(ValueError, match="same structure as params"):
        hvp(mlp_loss, params, batch, params["w1"])
    with pytest.raises(ValueError, match=r"per-example losses of shape \(B,\)"):
        hvp(lambda p, b: mlp_loss(p, b).mean(), params, batch, params)


def pad(batch, mask_rows, seed=3):
    """Append rows of random (finite) garbage, and the mask that marks them padding."""
    key = jax.random.key(seed)
    padded = {
        "x": jnp.concatenate([batch["x"], 5 * jax.random.normal(key, (mask_rows, 4))]),
        "y": jnp.concatenate([batch["y"], jnp.full((mask_rows,), 2)]),
    }
    mask = jnp.concatenate([jnp.ones(len(batch["y"])), jnp.zeros(mask_rows)])
    return padded, mask


def test_padding_changes_nothing():
    params, batch = make_problem()
    padded, mask = pad(batch, 5)
    v = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(
        ravel_pytree(hvp(mlp_loss, params, padded, v, mask=mask))[0],
        ravel_pytree(hvp(mlp_loss, params, batch, v))[0],
        rtol=1e-5,
        atol=1e-6,
    )
    key = jax.random.key(1)
    np.testing.assert_allclose(
        top_eigenvalue(mlp_loss, params, padded, key=key, num_iters=15, mask=mask),
        top_eigenvalue(mlp_loss, params, batch, key=key, num_iters=15),
        rtol=1e-4,
    )
    a = spectral_density(mlp_loss, params, padded, key=key, num_iters=6, num_probes=2, mask=mask)
    b = spectral_density(mlp_loss, params, batch, key=key, num_iters=6, num_probes=2)
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-4, atol=1e-5)


def test_all_padding_batch_gives_zero_curvature_without_nan():
    params, batch = make_problem()
    mask = jnp.zeros(len(batch["y"]))
    key = jax.random.key(0)
    assert float(top_eigenvalue(mlp_loss, params, batch, key=key, num_iters=5, mask=mask)) == 0
    density = spectral_density(mlp_loss, params, batch, key=key, num_iters=5, mask=mask)
    assert np.all(np.isfinite(density.nodes)) and np.all(np.isfinite(density.weights))
    assert float(density.moment(1)) == 0


# ----------------------------------------------------------------------------- Lanczos


def test_lanczos_tridiagonal_matches_numpy_reference():
    params, batch = make_problem()
    h = dense_hessian(mlp_loss, params, batch)
    start = np.random.default_rng(0).normal(size=h.shape[0])
    with jax.enable_x64(True):
        result = lanczos(lambda v: jnp.asarray(h) @ v, jnp.asarray(start), 12)
    alphas, betas = numpy_lanczos(h, start, 12)
    np.testing.assert_allclose(result.alphas, alphas, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.betas, betas, rtol=1e-9, atol=1e-12)
    assert int(result.num_steps) == 12
    np.testing.assert_allclose(result.ritz_values, np.linalg.eigvalsh(result.tridiagonal))


def test_ritz_values_interlace_the_dense_spectrum():
    params, batch = make_problem()
    h = dense_hessian(mlp_loss, params, batch)
    eigenvalues = np.linalg.eigvalsh(h)
    n, m = len(eigenvalues), 10
    with jax.enable_x64(True):
        start = jnp.asarray(np.random.default_rng(1).normal(size=n))
        ritz = np.asarray(lanczos(lambda v: jnp.asarray(h) @ v, start, m).ritz_values)
    # Cauchy interlacing for T = QᵀHQ with orthonormal Q (n × m): λ_k ≤ θ_k ≤ λ_{k+n−m}.
    tol = 1e-10 * np.abs(eigenvalues).max()
    assert np.all(ritz >= eigenvalues[:m] - tol)
    assert np.all(ritz <= eigenvalues[n - m :] + tol)
    # The extreme Ritz values are already close to the extreme eigenvalues.
    assert abs(ritz[-1] - eigenvalues[-1]) < 1e-3 * abs(eigenvalues[-1])


def test_gauss_quadrature_is_exact_for_low_degree_polynomials():
    params, batch = make_problem()
    h = dense_hessian(mlp_loss, params, batch)
    v = np.random.default_rng(2).normal(size=h.shape[0])
    v /= np.linalg.norm(v)
    m = 3
    with jax.enable_x64(True):
        result = lanczos(lambda x: jnp.asarray(h) @ x, jnp.asarray(v), m)
    nodes, weights = np.asarray(result.ritz_values), np.asarray(result.weights)
    assert abs(weights.sum() - 1) < 1e-12
    for degree in range(2 * m):  # exact up to degree 2m − 1
        expected = v @ np.linalg.matrix_power(h, degree) @ v
        np.testing.assert_allclose(np.sum(weights * nodes**degree), expected, rtol=1e-8)


def test_breakdown_on_an_invariant_subspace_stops_cleanly():
    # Three distinct eigenvalues, each twice: the Krylov space of ones has dimension 3.
    h = jnp.diag(jnp.array([1.0, 1.0, 2.0, 2.0, 4.0, 4.0]))
    result = lanczos(lambda v: h @ v, jnp.ones(6), 8)
    assert int(result.num_steps) == 3
    assert np.all(np.isfinite(result.ritz_values)) and np.all(np.isfinite(result.weights))
    assert np.all(np.asarray(result.betas[2:]) == 0)
    np.testing.assert_allclose(np.asarray(result.ritz_values)[[0, -1]], [1.0, 4.0], rtol=1e-6)
    # Padded Ritz values carry no quadrature weight: the rule still integrates exactly.
    np.testing.assert_allclose(np.sum(result.weights * result.ritz_values), 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(np.sum(result.weights), 1, rtol=1e-6)


@pytest.mark.parametrize(
    ("matrix", "start"),
    [(jnp.zeros((4, 4)), jnp.ones(4)), (jnp.eye(4), jnp.zeros(4))],
    ids=["zero_matrix", "zero_start"],
)
def test_degenerate_inputs_give_finite_results(matrix, start):
    result = lanczos(lambda v: matrix @ v, start, 5)
    assert all(np.all(np.isfinite(x)) for x in result)
    assert int(result.num_steps) <= 1


def test_more_steps_than_dimensions_recovers_the_whole_spectrum():
    a = np.random.default_rng(3).normal(size=(5, 5))
    h = a @ a.T
    with jax.enable_x64(True):
        result = lanczos(lambda v: jnp.asarray(h) @ v, jnp.ones(5, jnp.float64), 9)
    assert int(result.num_steps) == 5
    ritz = np.asarray(result.ritz_values)
    for eigenvalue in np.linalg.eigvalsh(h):
        assert np.min(np.abs(ritz - eigenvalue)) < 1e-8 * np.abs(h).max()


def test_lanczos_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_iters=0"):
        lanczos(lambda v: v, jnp.ones(3), 0)
    with pytest.raises(ValueError, match="1-D floating-point"):
        lanczos(lambda v: v, jnp.ones((3, 2)), 2)


# ----------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_top_eigenvalue_matches_dense_within_1e_3(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params, batch = make_problem(dtype)
        estimate = float(
            top_eigenvalue(mlp_loss, params, batch, key=jax.random.key(0), num_iters=25)
        )
    expected = np.linalg.eigvalsh(dense_hessian(mlp_loss, params, batch))[-1]
    assert abs(estimate - expected) <= 1e-3 * abs(expected)


def test_slq_moments_match_dense_spectrum():
    num_probes, n_iters = 64, 8
    with jax.enable_x64(True):
        params, batch = make_problem(jnp.float64)
        density = spectral_density(
            mlp_loss,
            params,
            batch,
            key=jax.random.key(4),
            num_iters=n_iters,
            num_probes=num_probes,
        )
        moments = {k: float(density.moment(k)) for k in (1, 2)}
    weights = np.asarray(density.weights)
    h = dense_hessian(mlp_loss, params, batch)
    n = h.shape[0]
    assert weights.shape == (num_probes, n_iters)
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-10)
    # Each probe's rule integrates t and t² exactly, so the moments are the Rademacher
    # estimates of tr(H)/n and tr(H²)/n: unbiased, with exactly known spread.
    for k, moment in moments.items():
        power = np.linalg.matrix_power(h, k)
        expected = np.trace(power) / n
        sd = rademacher_sd(power, n, num_probes)
        assert abs(moment - expected) < 5 * sd, (k, moment, expected, sd)
        assert sd < 0.1 * abs(expected)  # the check is tight enough to mean something


def test_density_on_grid_matches_numpy_kernel_sum():
    params, batch = make_problem()
    density = spectral_density(mlp_loss, params, batch, key=jax.random.key(5), num_iters=6)
    grid, values = density.on_grid(sigma=0.05, num_points=400)
    nodes, weights = np.asarray(density.nodes, np.float64), np.asarray(density.weights)
    t = np.asarray(grid, np.float64)[:, None, None]
    reference = (
        np.sum(
            weights * np.exp(-((t - nodes) ** 2) / (2 * 0.05**2)) / (0.05 * np.sqrt(2 * np.pi)),
            axis=(1, 2),
        )
        / nodes.shape[0]
    )
    np.testing.assert_allclose(values, reference, rtol=1e-4, atol=1e-6)
    # A density: it integrates to 1 and its mean is the first moment.
    assert abs(np.trapezoid(values, grid) - 1) < 1e-3
    np.testing.assert_allclose(np.trapezoid(values * grid, grid), density.moment(1), atol=1e-3)


def test_hutchinson_trace_matches_dense_trace():
    num_probes = 100
    with jax.enable_x64(True):
        params, batch = make_problem(jnp.float64)
        estimate = float(
            hutchinson_trace(mlp_loss, params, batch, key=jax.random.key(6), num_probes=num_probes)
        )
    h = dense_hessian(mlp_loss, params, batch)
    n = h.shape[0]
    sd = rademacher_sd(h, n, num_probes) * n  # for zᵀHz rather than vᵀHv
    assert abs(estimate - np.trace(h)) < 5 * sd
    assert sd < 0.2 * abs(np.trace(h))


def test_plot_spectrum_writes_the_density(tmp_path):
    params, batch = make_problem()
    density = spectral_density(mlp_loss, params, batch, key=jax.random.key(0), num_iters=6)
    path = tmp_path / "spectrum.png"
    grid, values = plot_spectrum(density, path, num_points=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected_grid, expected = density.on_grid(num_points=100)
    np.testing.assert_allclose(grid, expected_grid)
    np.testing.assert_allclose(values, expected)


# ----------------------------------------------------------------------------- batch size


def test_batch_hessian_top_eigenvalue_grows_as_the_batch_shrinks():
    """Granziol et al.'s point on a real model: an MLP on scikit-learn's digits.

    λ_max is convex in H, and a batch Hessian of size 2b is the mean of two of size b, so
    E λ_max(H_b) decreases with b; the smallest batches are far above the full-data value.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target)
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k[0], (64, 16)) / 8.0,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[1], (16, 10)) / 4.0,
        "b2": jnp.zeros(10),
    }
    # A few steps of gradient descent, so the model is a trained one rather than random.
    grad_fn = jax.jit(jax.grad(lambda p: mean_loss(mlp_loss, p, {"x": x, "y": y})))
    for _ in range(30):
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad_fn(params))

    # Every batch is padded to 64 rows and masked, so one compiled function serves all.
    rng = np.random.default_rng(0)
    estimate = jax.jit(
        lambda batch, mask, key: top_eigenvalue(
            mlp_loss, params, batch, key=key, num_iters=15, mask=mask
        )
    )
    means = []
    for size in (4, 16, 64):
        values = []
        for trial in range(6):
            rows = rng.choice(len(y), 64, replace=False)
            mask = jnp.arange(64) < size
            values.append(
                float(estimate({"x": x[rows], "y": y[rows]}, mask, jax.random.key(trial)))
            )
        means.append(np.mean(values))
    full = float(top_eigenvalue(mlp_loss, params, {"x": x, "y": y}, key=k[2], num_iters=15))
    assert means[0] > means[1] > means[2] > full, (means, full)
    assert means[0] > 1.5 * full, (means, full)
