"""`scale_by_curvature`: learning rate and momentum from Lanczos eigenvalue estimates.

The references are the closed forms on quadratics whose Hessian is known exactly:
H = Q diag(λ) Qᵀ built from data, so the optimal steps are known numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab
from adaptive_batch.curvature import mean_loss, scale_by_curvature


def quadratic_loss(w, batch):
    """ℓᵢ = ½ s (xᵢᵀ(w − w*))²; with s = 1 the mean has Hessian XᵀX / b."""
    residual = batch["x"] @ w - batch["target"]
    return 0.5 * batch["sign"] * residual**2


def quadratic_problem(eigenvalues, seed=0, sign=1.0):
    """A batch whose mean-loss Hessian is Q diag(eigenvalues) Qᵀ, and the minimiser w*."""
    n = len(eigenvalues)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    x = np.sqrt(n) * np.diag(np.sqrt(eigenvalues)) @ q.T  # XᵀX/n = Q diag(λ) Qᵀ
    w_star = rng.normal(size=n)
    batch = {
        "x": jnp.asarray(x, jnp.float32),
        "target": jnp.asarray(x @ w_star, jnp.float32),
        "sign": jnp.full((n,), sign, jnp.float32),
    }
    return batch, jnp.asarray(w_star, jnp.float32)


def run(tx, batch, w0, steps):
    """`steps` updates in one jit; returns the final params, state and the trace count."""
    traces = []

    @jax.jit
    def step(w, state):
        traces.append(1)
        grads = jax.grad(lambda p: mean_loss(quadratic_loss, p, batch))(w)
        updates, state = tx.update(grads, state, w, batch=batch, grad_stats=None, unknown=3)
        return optax.apply_updates(w, updates), state

    w, state = w0, tx.init(w0)
    for _ in range(steps):
        w, state = step(w, state)
    return w, state, len(traces)


def excess_loss(w, batch):
    return float(mean_loss(quadratic_loss, w, batch))


def test_gradient_descent_rule_finds_the_optimal_learning_rate_and_converges():
    eigenvalues = np.linspace(1.0, 10.0, 16)
    batch, _ = quadratic_problem(eigenvalues)
    w0 = jnp.zeros(16)
    # 10 Lanczos steps on a 16-dimensional problem: the extremes, not the whole spectrum.
    tx = scale_by_curvature(quadratic_loss, rule="gradient_descent", num_iters=10)
    w, state, traces = run(tx, batch, w0, 120)
    optimal = 2 / (eigenvalues.max() + eigenvalues.min())
    assert abs(float(state.learning_rate) - optimal) <= 0.05 * optimal
    assert float(state.momentum) == 0
    # Error contracts by (κ − 1)/(κ + 1) = 9/11 per step: 120 steps → loss × 1e-20.
    assert excess_loss(w, batch) < 1e-8 * excess_loss(w0, batch)
    assert traces == 1


def test_lambda_max_rule_matches_its_formula_and_converges():
    factor = 1.5
    eigenvalues = np.geomspace(0.5, 20.0, 12)
    batch, _ = quadratic_problem(eigenvalues, seed=1)
    w0 = jnp.zeros(12)
    tx = scale_by_curvature(quadratic_loss, factor=factor, num_iters=12)
    w, state, _ = run(tx, batch, w0, 150)
    kappa = eigenvalues.max() / eigenvalues.min()
    np.testing.assert_allclose(state.lambda_max, eigenvalues.max(), rtol=1e-3)
    np.testing.assert_allclose(state.lambda_lo, eigenvalues.min(), rtol=1e-2)
    np.testing.assert_allclose(state.learning_rate, factor / eigenvalues.max(), rtol=1e-3)
    beta = ((np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)) ** 2
    np.testing.assert_allclose(state.momentum, beta, rtol=1e-2)
    assert excess_loss(w, batch) < 1e-6 * excess_loss(w0, batch)


def test_polyak_momentum_beats_gradient_descent_on_an_ill_conditioned_quadratic():
    eigenvalues = np.geomspace(0.01, 1.0, 16)  # κ = 100
    batch, _ = quadratic_problem(eigenvalues, seed=2)
    w0 = jnp.zeros(16)
    results = {}
    for rule in ("polyak", "gradient_descent"):
        tx = scale_by_curvature(quadratic_loss, rule=rule, num_iters=16)
        w, state, _ = run(tx, batch, w0, 150)
        results[rule] = excess_loss(w, batch) / excess_loss(w0, batch)
    lo, hi = eigenvalues.min(), eigenvalues.max()
    np.testing.assert_allclose(state.learning_rate, 2 / (hi + lo), rtol=0.05)
    # Rates per step: heavy ball (√κ − 1)/(√κ + 1) = 0.82, gradient descent 0.98.
    assert results["polyak"] < 1e-6
    assert results["polyak"] < 1e-3 * results["gradient_descent"], results
    tx = scale_by_curvature(quadratic_loss, rule="polyak", num_iters=16)
    _, state, _ = run(tx, batch, w0, 1)
    np.testing.assert_allclose(state.learning_rate, 4 / (np.sqrt(hi) + np.sqrt(lo)) ** 2, rtol=0.05)
    np.testing.assert_allclose(state.momentum, (9 / 11) ** 2, rtol=0.05)


def quartic_loss(w, batch):
    """ℓᵢ = ¼ (xᵢᵀw)⁴ + ½ (xᵢᵀw)²: the Hessian changes as w moves."""
    z = batch["x"] @ w
    return 0.25 * z**4 + 0.5 * z**2


def test_estimates_every_k_steps_inside_one_compiled_step():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
    batch = {"x": x}
    tx = scale_by_curvature(quartic_loss, estimate_every=3, num_iters=4, init_learning_rate=0.01)
    traces = []

    @jax.jit
    def step(w, state):
        traces.append(1)
        grads = jax.grad(lambda p: mean_loss(quartic_loss, p, batch))(w)
        updates, state = tx.update(grads, state, w, batch=batch)
        return optax.apply_updates(w, updates), state

    w = jnp.ones(4)
    state = tx.init(w)
    for t in range(7):
        if t % 3 == 0:
            with jax.enable_x64(True):
                h = jax.hessian(lambda p: mean_loss(quartic_loss, p, {"x": x.astype(float)}))(
                    w.astype(float)
                )
            expected = np.linalg.eigvalsh(np.asarray(h))[-1]
        previous = float(state.lambda_max)
        w, state = step(w, state)
        if t % 3 == 0:
            np.testing.assert_allclose(state.lambda_max, expected, rtol=1e-3)
            assert float(state.lambda_max) != previous
        else:
            assert float(state.lambda_max) == previous
    assert len(traces) == 1
    assert int(state.count) == 7


def test_negative_or_zero_curvature_keeps_the_previous_rates():
    batch, _ = quadratic_problem(np.array([1.0, 2.0, 4.0]))
    negative = dict(batch, sign=-batch["sign"])
    tx = scale_by_curvature(quadratic_loss, estimate_every=1, num_iters=3, init_momentum=0.3)
    w = jnp.ones(3)
    grads = jnp.ones(3)

    # A first estimate on negative curvature: the initial values stay.
    state = tx.init(w)
    _, state = tx.update(grads, state, w, batch=negative)
    assert float(state.learning_rate) == pytest.approx(1e-3)
    assert float(state.momentum) == pytest.approx(0.3)

    _, state = tx.update(grads, state, w, batch=batch)
    accepted = (float(state.learning_rate), float(state.momentum))
    np.testing.assert_allclose(accepted[0], 1 / 4, rtol=1e-4)
    # Negative curvature, then zero curvature (an all-padding batch): kept.
    for kwargs in ({"batch": negative}, {"batch": batch, "mask": jnp.zeros(3)}):
        updates, state = tx.update(grads, state, w, **kwargs)
        assert (float(state.learning_rate), float(state.momentum)) == accepted
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))


def test_curvature_batch_overrides_the_training_batch():
    batch, _ = quadratic_problem(np.array([1.0, 2.0]))
    steep, _ = quadratic_problem(np.array([3.0, 8.0]))
    tx = scale_by_curvature(quadratic_loss, num_iters=2)
    w = jnp.zeros(2)
    _, state = tx.update(jnp.ones(2), tx.init(w), w, batch=batch, curvature_batch=steep)
    np.testing.assert_allclose(state.lambda_max, 8.0, rtol=1e-4)


def test_first_update_is_minus_learning_rate_times_gradient_then_heavy_ball():
    batch, _ = quadratic_problem(np.array([1.0, 4.0]))
    tx = scale_by_curvature(quadratic_loss, num_iters=2, estimate_every=100)
    w = jnp.zeros(2)
    g1, g2 = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    u1, state = tx.update(g1, tx.init(w), w, batch=batch)
    lr, beta = float(state.learning_rate), float(state.momentum)
    np.testing.assert_allclose(u1, -lr * g1, rtol=1e-6)
    u2, _ = tx.update(g2, state, w, batch=batch)
    np.testing.assert_allclose(u2, -lr * g2 + beta * u1, rtol=1e-6)
    tx = scale_by_curvature(quadratic_loss, num_iters=2, flip_sign=False)
    u, _ = tx.update(g1, tx.init(w), w, batch=batch)
    np.testing.assert_allclose(u, -u1, rtol=1e-6)


def test_composes_with_scale_by_batch_size_in_optax_chain():
    batch, _ = quadratic_problem(np.array([1.0, 2.0, 4.0, 8.0]))
    stats_fn = ab.per_example_stats(quadratic_loss)
    w = jnp.ones(4)
    stats = stats_fn(w, batch)
    alone = scale_by_curvature(quadratic_loss, num_iters=4)
    chained = optax.chain(
        ab.scale_by_batch_size(2, "linear"),  # factor b/b₀ = 4/2
        scale_by_curvature(quadratic_loss, num_iters=4),
        optax.clip_by_global_norm(1e6),
    )
    expected, _ = alone.update(stats.mean_grad, alone.init(w), w, batch=batch)
    update = jax.jit(lambda s: chained.update(stats.mean_grad, s, w, batch=batch, grad_stats=stats))
    updates, state = update(chained.init(w))
    np.testing.assert_allclose(updates, 2 * expected, rtol=1e-5)
    assert float(state[1].lambda_max) == pytest.approx(8.0, rel=1e-4)


def test_inject_hyperparams_drives_the_factor():
    batch, _ = quadratic_problem(np.array([1.0, 4.0]))
    make = optax.inject_hyperparams(
        scale_by_curvature, static_args=("loss_fn", "rule", "num_iters", "estimate_every")
    )
    tx = make(quadratic_loss, factor=0.5, num_iters=2)
    w = jnp.zeros(2)
    _, state = jax.jit(lambda s: tx.update(jnp.ones(2), s, w, batch=batch))(tx.init(w))
    np.testing.assert_allclose(state.inner_state.learning_rate, 0.5 / 4, rtol=1e-4)


def test_bfloat16_params_stay_finite():
    batch, _ = quadratic_problem(np.array([1.0, 4.0, 9.0]))
    w = jnp.ones(3, jnp.bfloat16)
    tx = scale_by_curvature(quadratic_loss, num_iters=3)
    updates, state = tx.update(jnp.ones(3, jnp.bfloat16), tx.init(w), w, batch=batch)
    assert updates.dtype == jnp.bfloat16
    np.testing.assert_allclose(state.lambda_max, 9.0, rtol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 0.0}, r"factor=0.0 must lie in \(0, 2\]"),
        ({"factor": 2.5}, "factor=2.5"),
        ({"rule": "adam"}, "rule='adam'"),
        ({"estimate_every": 0}, "estimate_every=0"),
        ({"num_iters": 1.5}, "num_iters=1.5"),
        ({"max_momentum": 1.0}, "max_momentum=1.0"),
        ({"max_condition": 0.5}, "max_condition=0.5"),
        ({"init_learning_rate": -1.0}, "init_learning_rate=-1.0"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_by_curvature(quadratic_loss, **kwargs)


def test_missing_inputs_say_what_to_pass():
    tx = scale_by_curvature(quadratic_loss)
    w = jnp.zeros(2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        scale_by_curvature("loss")
    # A missing extra argument is a TypeError that shows the call (the package's rule);
    # the fixed batch it suggests is an argument the factory takes.
    with pytest.raises(TypeError, match=r"tx.update\(grads, state, params, batch=batch") as error:
        tx.update(jnp.ones(2), tx.init(w), w)
    assert "scale_by_curvature(loss_fn, curvature_batch=batch" in str(error.value)
    scale_by_curvature(quadratic_loss, curvature_batch={"x": jnp.ones((2, 2))})
    with pytest.raises(TypeError, match="needs the current params"):
        tx.update(jnp.ones(2), tx.init(w), batch={"x": jnp.ones((2, 2))})


def test_trains_an_mlp_on_digits():
    """On a network (indefinite Hessian, changing curvature) the loss falls, rates stay sane."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data[:512] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:512])

    def loss_fn(params, batch):
        hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        log_probs = jax.nn.log_softmax(hidden @ params["w2"] + params["b2"])
        return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (64, 32)) / 8.0,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 10)) / 6.0,
        "b2": jnp.zeros(10),
    }
    tx = scale_by_curvature(loss_fn, estimate_every=10, num_iters=10)
    rng = np.random.default_rng(0)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: mean_loss(loss_fn, p, batch))(params)
        updates, state = tx.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state, loss

    full = {"x": x, "y": y}
    initial = float(mean_loss(loss_fn, params, full))
    state = tx.init(params)
    for _ in range(20):
        rows = rng.choice(len(y), 64, replace=False)
        params, state, _ = step(params, state, {"x": x[rows], "y": y[rows]})
    final = float(mean_loss(loss_fn, params, full))
    assert final < 0.5 * initial, (initial, final)
    assert 0 < float(state.lambda_lo) <= float(state.lambda_max)
    np.testing.assert_allclose(state.learning_rate, 1 / state.lambda_max, rtol=1e-5)
    assert 0 <= float(state.momentum) <= 0.95


@pytest.mark.parametrize("fixed", [False, True], ids=["step's batch", "factory's batch"])
def test_scale_by_curvature_runs_in_fit(fixed):
    """From `fit`: the train step hands its batch to the transform (or the factory holds
    a fixed one), so the estimate is the data's Hessian: λ_max = 10, and the
    gradient-descent rule's rate 2 / (λ_max + λ_lo) = 2 / 11."""
    eigenvalues = np.linspace(1.0, 10.0, 16)
    batch, _ = quadratic_problem(eigenvalues)
    extra = {"curvature_batch": batch, "curvature_mask": jnp.ones(16, bool)} if fixed else {}
    tx = optax.chain(
        ab.norm_test(0.5, min_batch_size=16, max_batch_size=16),
        scale_by_curvature(quadratic_loss, rule="gradient_descent", num_iters=16, **extra),
    )
    step = ab.make_train_step(quadratic_loss, tx)
    w0 = jnp.zeros(16)
    # Batches of all 16 rows (each a permutation of the data: the same Hessian).
    controller = ab.BatchSizeController(16, 16, buckets=None)
    result = ab.fit(step, (w0, tx.init(w0)), jax.device_get(batch), controller, steps=30,
                    progress=False)  # fmt: skip
    curvature = result.state[1][1]
    np.testing.assert_allclose(curvature.lambda_max, 10.0, rtol=1e-3)
    np.testing.assert_allclose(curvature.learning_rate, 2 / 11, rtol=1e-3)
    assert excess_loss(result.state[0], batch) < 1e-3 * excess_loss(w0, batch)
