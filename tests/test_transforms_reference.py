"""Every transform against an independent NumPy float64 implementation of its rule.

The references below are written from REFERENCES.md and compute every statistic from
the per-example gradients directly (explicit deviations, not the sum identities that
`GradStats` uses). Each transform runs 25 steps on (a) synthetic per-example gradients
whose signal fades, so the tests fail and the batch grows, and (b) real statistics of a
least-squares model from `per_example_stats`, where the parameters move. Batch sizes
must agree step for step and updates to 1e-6. JAX runs in float64 here
(``jax.enable_x64``) so that the comparison tests the rule, not float32 round-off; a
float32 run checks the same trajectories at float32 tolerance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab

STEPS = 25
LR = 0.05

# --------------------------------------------------------------------- references


def _moments(G):
    gbar = G.mean(axis=0)
    return G.shape[0], gbar, float(gbar @ gbar)


def _grow(state, b, demand, lo, hi, monotone):
    wanted = max(state["batch_size"], b, demand) if monotone else demand
    return int(min(max(math.ceil(wanted), lo), hi))


class RefSamplingTest:
    """Norm / inner-product / augmented / coordinate test (Byrd 2012; Bollapragada 2018)."""

    def __init__(self, kind, tol=0.1, nu=0.1, lo=16, hi=2048, init=None, every=1, monotone=True):
        self.kind, self.tol, self.nu = kind, tol, nu
        self.lo, self.hi, self.every, self.monotone = lo, hi, every, monotone
        self.state = {"batch_size": init or lo, "step": 0}

    def demand(self, G):
        b, gbar, g2 = _moments(G)
        if self.kind == "norm":
            S = np.sum((G - gbar) ** 2) / (b - 1)
            return S / (self.tol**2 * g2)
        p = G @ gbar
        if self.kind in ("inner", "augmented"):
            S_ip = np.sum((p - g2) ** 2) / (b - 1)
            d = S_ip / (self.tol**2 * g2**2)
            if self.kind == "augmented":
                S_o = np.sum((G - np.outer(p / g2, gbar)) ** 2) / (b - 1)
                d = max(d, S_o / (self.nu**2 * g2))
            return d
        V = np.sum((G - gbar) ** 2, axis=0) / (b - 1)
        J = gbar != 0
        return np.max(V[J] / (self.tol**2 * gbar[J] ** 2))

    def step(self, G, losses):
        b, gbar, g2 = _moments(G)
        informative = b >= 2 and (np.any(gbar != 0) if self.kind == "coordinate" else g2 > 0)
        if informative and self.state["step"] % self.every == 0:
            d = min(self.demand(G), 1e30)  # inf → the cap, as a huge number
            self.state["batch_size"] = _grow(self.state, b, d, self.lo, self.hi, self.monotone)
        self.state["step"] += 1
        return self.state["batch_size"]


class RefCabs:
    """Official CABS semantics: averages from xi=0, loss=1, decay .95, no bias correction."""

    def __init__(self, alpha, c=1.0, lo=16, hi=2048, eps=1e-8, mu=0.95):
        self.alpha, self.c, self.lo, self.hi, self.eps, self.mu = alpha, c, lo, hi, eps, mu
        self.loss_avg, self.xi_avg, self.batch_size = 1.0, 0.0, lo

    def step(self, G, losses):
        _, _, g2 = _moments(G)
        xi = max(np.mean(np.sum(G**2, axis=1)) - g2, 0.0)
        self.loss_avg = self.mu * self.loss_avg + (1 - self.mu) * np.mean(losses)
        self.xi_avg = self.mu * self.xi_avg + (1 - self.mu) * xi
        m = np.round(self.c * self.alpha * self.xi_avg / (self.loss_avg + self.eps))  # half to even
        self.batch_size = int(np.clip(m, self.lo, self.hi))
        return self.batch_size


class RefSGD:
    def __init__(self, lr):
        self.lr = lr

    def update(self, gbar):
        return -self.lr * gbar


class RefTorchAdagrad:
    def __init__(self, lr, eps=1e-10):
        self.lr, self.eps, self.s = lr, eps, 0.0

    def update(self, gbar):
        self.s = self.s + gbar**2
        return -self.lr * gbar / (np.sqrt(self.s) + self.eps)


class RefAdagradNorm:
    def __init__(self, lr, b0=0.01):
        self.lr, self.v = lr, b0**2

    def update(self, gbar):
        self.v += gbar @ gbar
        return -self.lr * gbar / np.sqrt(self.v)


class RefBatchScale:
    """r = S, √S or AdaScale's (σ²+μ²)/(σ²/S+μ²), times SGD."""

    def __init__(self, lr, b0, rule, cap=None, mu=0.9):
        self.lr, self.b0, self.rule, self.cap, self.mu = lr, b0, rule, cap, mu
        self.var_avg = self.sq_avg = 0.0
        self.r = 1.0

    def observe(self, G):
        b, gbar, g2 = _moments(G)
        if self.rule == "linear":
            r = b / self.b0
        elif self.rule == "sqrt":
            r = math.sqrt(b / self.b0)
        else:
            var = np.sum((G - gbar) ** 2) / (b - 1)
            self.var_avg = self.mu * self.var_avg + (1 - self.mu) * var
            self.sq_avg = self.mu * self.sq_avg + (1 - self.mu) * max(g2 - var / b, 0.0)
            sigma2 = self.var_avg / self.b0
            r = (sigma2 + self.sq_avg) / (sigma2 * self.b0 / b + self.sq_avg)
        self.r = min(r, self.cap) if self.cap is not None else r

    def update(self, gbar):
        return -self.lr * self.r * gbar


class RefNoiseScale:
    def __init__(self, mu):
        self.mu, self.trace, self.sq, self.bsimple = mu, 0.0, 0.0, 0.0

    def step(self, G, losses):
        b, gbar, g2 = _moments(G)
        S = np.sum((G - gbar) ** 2) / (b - 1)
        self.trace = self.mu * self.trace + (1 - self.mu) * S
        self.sq = self.mu * self.sq + (1 - self.mu) * (g2 - S / b)
        if self.sq > 0:
            self.bsimple = self.trace / self.sq
        return None


# --------------------------------------------------------------------- cases
# name -> (JAX transform, reference rule or None, reference step, batch size if fixed)


def make_case(name):
    if name == "cabs":
        # c = 1000 puts c·α·ξ/F in the range [16, 256] for these problems.
        tx = ab.cabs(LR, max_batch_size=256, scale=1000.0)
        return tx, RefCabs(LR, c=1000.0, hi=256), RefSGD(LR)
    if name == "norm_test":
        tx = optax.chain(ab.norm_test(0.3, max_batch_size=256), optax.sgd(LR))
        return tx, RefSamplingTest("norm", 0.3, hi=256), RefSGD(LR)
    if name == "norm_test_every3_free":
        tx = ab.norm_test(0.3, min_batch_size=8, max_batch_size=256, every=3, monotone=False)
        ref = RefSamplingTest("norm", 0.3, lo=8, hi=256, every=3, monotone=False)
        return optax.chain(tx, optax.sgd(LR)), ref, RefSGD(LR)
    if name == "inner_product_test":
        tx = optax.chain(ab.inner_product_test(0.2, max_batch_size=256), optax.sgd(LR))
        return tx, RefSamplingTest("inner", 0.2, hi=256), RefSGD(LR)
    if name == "augmented_inner_product_test":
        tx = ab.augmented_inner_product_test(0.3, 0.5, max_batch_size=256)
        ref = RefSamplingTest("augmented", 0.3, 0.5, hi=256)
        return optax.chain(tx, optax.sgd(LR)), ref, RefSGD(LR)
    if name == "coordinate_norm_test":
        tx = ab.coordinate_norm_test(1.5, min_batch_size=4, max_batch_size=256)
        ref = RefSamplingTest("coordinate", 1.5, lo=4, hi=256)
        return optax.chain(tx, optax.sgd(LR)), ref, RefSGD(LR)
    if name == "adadagrad":  # test="norm" by default, as the official experiments
        tx = ab.adadagrad(LR, eta=0.3, min_batch_size=4, max_batch_size=256)
        return tx, RefSamplingTest("norm", 0.3, lo=4, hi=256), RefTorchAdagrad(LR)
    if name == "adadagrad_coordinate":
        tx = ab.adadagrad(LR, eta=1.5, test="coordinate", min_batch_size=4, max_batch_size=256)
        return tx, RefSamplingTest("coordinate", 1.5, lo=4, hi=256), RefTorchAdagrad(LR)
    if name == "adadagrad_norm":
        tx = ab.adadagrad_norm(LR, eta=0.3, max_batch_size=256)
        return tx, RefSamplingTest("norm", 0.3, hi=256), RefAdagradNorm(LR)
    if name.startswith("scale_by_batch_size"):
        rule = name.split("-")[1]
        cap = 3.0 if rule == "linear" else None
        tx = optax.chain(
            ab.norm_test(0.3, max_batch_size=256),
            ab.scale_by_batch_size(16, rule, max_scale=cap),
            optax.sgd(LR),
        )
        return tx, RefSamplingTest("norm", 0.3, hi=256), RefBatchScale(LR, 16, rule, cap)
    if name == "gradient_noise_scale":
        tx = optax.chain(
            ab.norm_test(0.3, max_batch_size=256), ab.gradient_noise_scale(0.8), optax.sgd(LR)
        )
        return tx, [RefSamplingTest("norm", 0.3, hi=256), RefNoiseScale(0.8)], RefSGD(LR)
    raise KeyError(name)


CASES = [
    "cabs",
    "norm_test",
    "norm_test_every3_free",
    "inner_product_test",
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "adadagrad",
    "adadagrad_coordinate",
    "adadagrad_norm",
    "scale_by_batch_size-linear",
    "scale_by_batch_size-sqrt",
    "scale_by_batch_size-adascale",
    "gradient_noise_scale",
]

# --------------------------------------------------------------------- drivers

# Parameters are a small pytree; the references work on its flattening (leaf order).
SHAPES = {"a": (3,), "b": (2, 2)}
DIM = 7


def unflatten(vector, dtype):
    out, start = {}, 0
    for key in sorted(SHAPES):
        size = int(np.prod(SHAPES[key]))
        out[key] = jnp.asarray(vector[start : start + size].reshape(SHAPES[key]), dtype)
        start += size
    return out


def flatten(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(SHAPES)])


def synthetic_stats(G, losses, dtype):
    """GradStats with every field, from per-example gradients G (b × d)."""
    gbar = G.mean(axis=0)
    p = G @ gbar
    return ab.GradStats(
        count=jnp.asarray(G.shape[0], jnp.float32),
        loss_sum=jnp.asarray(losses.sum(), dtype),
        grad_sum=unflatten(G.sum(axis=0), dtype),
        sq_norm_sum=jnp.asarray(np.sum(G**2), dtype),
        sq_sum=unflatten(np.sum(G**2, axis=0), dtype),
        inner_sum=jnp.asarray(p.sum(), dtype),
        inner_sq_sum=jnp.asarray(np.sum(p**2), dtype),
    )


def synthetic_batch(step, b):
    """Per-example gradients whose mean fades (1/(1+step)) under constant noise; some
    coordinates are identically 0 on even steps (exercises ḡⱼ = 0)."""
    rng = np.random.default_rng(1000 + step)
    mean = np.linspace(1.0, 2.0, DIM) / (1.0 + 0.5 * step)
    G = mean + rng.normal(size=(b, DIM)) * np.linspace(0.5, 1.5, DIM)
    if step % 2 == 0:
        G[:, 2] = 0.0
    losses = 1.0 / (1.0 + 0.2 * step) + 0.1 * rng.random(b)
    return G, losses


def real_problem():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(1024, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 1.5, 3.0]) + 0.7 + 0.8 * rng.normal(size=1024)
    return X, y


def real_loss(params, batch):
    r = batch["x"] @ params["w"] + params["c"][0] - batch["y"]
    return 0.5 * r**2


def real_per_example(w_flat, X, y):
    """Analytic per-example gradients of ½(x·w + c − y)², leaf order (c, w)."""
    r = X @ w_flat[1:] + w_flat[0] - y
    return np.concatenate([r[:, None], r[:, None] * X], axis=1), 0.5 * r**2


def reference_steps(rule, step_ref, G, losses):
    """One step of the reference: (update, next batch size)."""
    rules = rule if isinstance(rule, list) else [rule]
    for r in rules:
        r.step(G, losses)
    if isinstance(step_ref, RefBatchScale):
        step_ref.observe(G)
    first = rules[0]
    batch_size = (
        first.state["batch_size"] if isinstance(first, RefSamplingTest) else first.batch_size
    )
    return step_ref.update(G.mean(axis=0)), batch_size


def run_synthetic(name, dtype):
    tx, rule, step_ref = make_case(name)
    params = unflatten(np.zeros(DIM), dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    b = int(ab.suggested_batch_size(state))
    sizes = []
    for step in range(STEPS):
        G, losses = synthetic_batch(step, b)
        stats = synthetic_stats(G, losses, dtype)
        updates, state = update(stats.mean_grad, state, params, grad_stats=stats)
        ref_update, ref_b = reference_steps(rule, step_ref, G, losses)
        b = int(ab.suggested_batch_size(state))
        yield step, b, ref_b, flatten(updates), ref_update, state, rule
        sizes.append(b)


@pytest.mark.parametrize("name", CASES)
def test_synthetic_statistics_match_reference(name):
    with jax.enable_x64(True):
        sizes = []
        for step, b, ref_b, update, ref_update, _, _ in run_synthetic(name, jnp.float64):
            assert b == ref_b, f"step {step}: batch size {b}, reference {ref_b}"
            np.testing.assert_allclose(update, ref_update, rtol=1e-6, atol=1e-12)
            sizes.append(b)
    assert len(set(sizes)) >= 2, f"the batch size never moved: {sizes}"


@pytest.mark.parametrize(
    "name", ["cabs", "norm_test", "adadagrad", "adadagrad_coordinate", "adadagrad_norm"]
)
def test_synthetic_statistics_match_reference_in_float32(name):
    for step, b, ref_b, update, ref_update, _, _ in run_synthetic(name, jnp.float32):
        assert b == ref_b, f"step {step}: batch size {b}, reference {ref_b}"
        np.testing.assert_allclose(update, ref_update, rtol=2e-5, atol=1e-7)


def test_noise_scale_and_cabs_state_match_reference():
    with jax.enable_x64(True):
        for _, _, _, _, _, state, rule in run_synthetic("gradient_noise_scale", jnp.float64):
            monitor = state[1]
            np.testing.assert_allclose(float(monitor.trace_avg), rule[1].trace, rtol=1e-9)
            np.testing.assert_allclose(float(monitor.sq_norm_avg), rule[1].sq, rtol=1e-9)
            np.testing.assert_allclose(float(monitor.noise_scale), rule[1].bsimple, rtol=1e-9)
        assert rule[1].bsimple > 0
        for _, _, _, _, _, state, rule in run_synthetic("cabs", jnp.float64):
            np.testing.assert_allclose(float(state[0].loss_avg), rule.loss_avg, rtol=1e-12)
            np.testing.assert_allclose(float(state[0].xi_avg), rule.xi_avg, rtol=1e-12)


REAL_STATS_FN = ab.per_example_stats(real_loss, coordinates=True, inner=True)
PADDED = 256  # every batch padded (mask 0) to the cap: one compile for all steps


@pytest.mark.parametrize("name", CASES)
def test_real_statistics_match_reference(name):
    """A least-squares model trained 25 steps by both; statistics from per_example_stats
    on batches padded to a fixed shape with a mask."""
    X, y = real_problem()
    with jax.enable_x64(True):
        tx, rule, step_ref = make_case(name)
        update = jax.jit(tx.update)
        params = {"c": jnp.zeros(1), "w": jnp.zeros(5)}
        w_ref = np.zeros(6)
        state = tx.init(params)
        b = int(ab.suggested_batch_size(state))
        sizes = []
        for step in range(STEPS):
            idx = np.random.default_rng(step).choice(len(X), size=b, replace=False)
            pad = PADDED - b
            batch = {"x": jnp.asarray(np.pad(X[idx], ((0, pad), (0, 0)))),
                     "y": jnp.asarray(np.pad(y[idx], (0, pad)))}  # fmt: skip
            stats = REAL_STATS_FN(params, batch, jnp.arange(PADDED) < b)
            updates, state = update(stats.mean_grad, state, params, grad_stats=stats)
            params = optax.apply_updates(params, updates)
            G, losses = real_per_example(w_ref, X[idx], y[idx])
            ref_update, ref_b = reference_steps(rule, step_ref, G, losses)
            w_ref = w_ref + ref_update
            b = int(ab.suggested_batch_size(state))
            assert b == ref_b, f"step {step}: batch size {b}, reference {ref_b}"
            got = np.concatenate([np.asarray(updates["c"]), np.asarray(updates["w"])])
            np.testing.assert_allclose(got, ref_update, rtol=1e-6, atol=1e-12)
            sizes.append(b)
    assert len(set(sizes)) >= 2, f"the batch size never moved: {sizes}"


# --------------------------------------------------------------------- CABS details


def _stats_with(count, loss_mean, sq_norm_sum, dim=2):
    return ab.GradStats(
        count=jnp.asarray(count, jnp.float32),
        loss_sum=jnp.asarray(loss_mean * count, jnp.float32),
        grad_sum=jnp.zeros(dim),
        sq_norm_sum=jnp.asarray(sq_norm_sum, jnp.float32),
    )


@pytest.mark.parametrize(("xi", "expected"), [(41.0, 20), (43.0, 22), (45.0, 22), (47.0, 24)])
def test_cabs_rounds_half_to_even(xi, expected):
    # decay 0.5 keeps the arithmetic exact: loss_avg = 1, xi_avg = ξ/2 ∈ {20.5, 21.5, ...}.
    tx = ab.cabs_rule(1.0, min_batch_size=2, decay=0.5, eps=0.0)
    _, state = tx.update(
        jnp.zeros(2), tx.init(jnp.zeros(2)), grad_stats=_stats_with(2, 1.0, 2 * xi)
    )
    assert int(state.batch_size) == expected


def test_cabs_starts_from_official_averages_and_clips():
    tx = ab.cabs_rule(0.1)
    state = tx.init(jnp.zeros(2))
    assert (float(state.loss_avg), float(state.xi_avg), int(state.batch_size)) == (1.0, 0.0, 16)
    # loss → 0 drives the batch to the cap, without NaN (ε > 0).
    for _ in range(200):
        _, state = tx.update(jnp.zeros(2), state, grad_stats=_stats_with(8, 0.0, 8 * 50.0))
    assert int(state.batch_size) == 2048
    assert np.isfinite(float(state.loss_avg))
