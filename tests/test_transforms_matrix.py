"""The shared matrix over every transform and optimizer of `adaptive_batch.transforms`.

Each case is a factory ``make(learning_rate) -> optax transform`` run on a noisy
least-squares problem with real statistics from `per_example_stats`. Batches are padded
to one bucket with a mask, so a whole run compiles once.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab

BUCKET = 64
BOUNDS = {"min_batch_size": 4, "max_batch_size": BUCKET}


def _then_sgd(rule):
    def make(learning_rate=0.05):
        return optax.chain(rule, optax.sgd(learning_rate))

    return make


CASES = {
    "cabs": lambda learning_rate=0.05: ab.cabs(learning_rate, **BOUNDS),
    "norm_test": _then_sgd(ab.norm_test(0.2, **BOUNDS)),
    "norm_test_every2": _then_sgd(ab.norm_test(0.2, every=2, monotone=False, **BOUNDS)),
    "inner_product_test": _then_sgd(ab.inner_product_test(0.2, **BOUNDS)),
    "augmented_inner_product_test": _then_sgd(ab.augmented_inner_product_test(0.3, 0.5, **BOUNDS)),
    "coordinate_norm_test": _then_sgd(ab.coordinate_norm_test(0.5, **BOUNDS)),
    "adadagrad": lambda learning_rate=0.3: ab.adadagrad(learning_rate, eta=0.5, **BOUNDS),
    "adadagrad_coordinate": lambda learning_rate=0.3: ab.adadagrad(
        learning_rate, eta=0.5, test="coordinate", **BOUNDS
    ),
    "adadagrad_norm": lambda learning_rate=0.3: ab.adadagrad_norm(learning_rate, **BOUNDS),
    "scale_by_adagrad_norm": lambda learning_rate=0.3: optax.chain(
        ab.scale_by_adagrad_norm(), optax.scale_by_learning_rate(learning_rate)
    ),
    "scale_by_batch_size-linear": _then_sgd(ab.scale_by_batch_size(16, "linear", max_scale=2.0)),
    "scale_by_batch_size-sqrt": _then_sgd(ab.scale_by_batch_size(16, "sqrt")),
    "scale_by_batch_size-adascale": _then_sgd(ab.scale_by_batch_size(16, "adascale")),
    "gradient_noise_scale": _then_sgd(ab.gradient_noise_scale(0.9)),
    "norm_test+adam": lambda learning_rate=0.05: optax.chain(
        ab.norm_test(0.2, **BOUNDS), optax.adam(learning_rate)
    ),
}
READS_STATS = [name for name in CASES if name != "scale_by_adagrad_norm"]
HAS_RULE = [  # cases whose state holds a batch size
    "cabs",
    "norm_test",
    "norm_test_every2",
    "inner_product_test",
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "adadagrad",
    "adadagrad_coordinate",
    "adadagrad_norm",
    "norm_test+adam",
]

# --------------------------------------------------------------------- the problem

W_TRUE = np.array([1.0, -2.0, 0.5, 1.5])
_rng = np.random.default_rng(0)
X = _rng.normal(size=(512, 4)).astype(np.float32)
Y = (X @ W_TRUE + 0.3 + 0.5 * _rng.normal(size=512)).astype(np.float32)


def loss_fn(params, batch):
    prediction = batch["x"].astype(params["w"].dtype) @ params["w"] + params["c"]
    return 0.5 * jnp.square(prediction.astype(jnp.float32) - batch["y"])


STATS_FN = ab.per_example_stats(loss_fn, coordinates=True, inner=True)


def full_loss(params):
    return float(jnp.mean(loss_fn(params, {"x": X, "y": Y})))


def init_params(dtype=jnp.float32):
    return {"w": jnp.zeros(4, dtype), "c": jnp.zeros((), dtype)}


def batch_for(step, state, size=None):
    """A padded batch of the suggested size (16 where no rule is in the state)."""
    if size is None:
        try:
            size = int(ab.suggested_batch_size(state))
        except ValueError:
            size = 16
    idx = np.random.default_rng(step).choice(len(X), size=size, replace=False)
    pad = BUCKET - size
    batch = {"x": np.pad(X[idx], ((0, pad), (0, 0))), "y": np.pad(Y[idx], (0, pad))}
    return batch, np.arange(BUCKET) < size


def make_step(tx, counter=None):
    """One training step: the statistics (one compiled function shared by every test),
    then the transform and the parameter update under one jit of their own."""

    @jax.jit
    def apply(params, state, stats):
        if counter is not None:
            counter.append(1)  # runs once per trace
        # bfloat16 models keep bfloat16 gradients; the statistics stay in float32.
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), stats.mean_grad, params)
        updates, state = tx.update(grads, state, params, grad_stats=stats)
        return optax.apply_updates(params, updates), state, updates

    def step(params, state, batch, mask):
        return apply(params, state, STATS_FN(params, batch, mask))

    return step


def run(tx, steps, params=None, step=None):
    params = init_params() if params is None else params
    state = tx.init(params)
    step = make_step(tx) if step is None else step
    history = []
    for t in range(steps):
        batch, mask = batch_for(t, state)
        params, state, updates = step(params, state, batch, mask)
        history.append(updates)
    return params, state, history


TRACES = {name: [] for name in CASES}


@functools.cache
def case(name):
    """The transform of a case and its compiled step (tracing into TRACES[name]),
    shared by the tests."""
    tx = CASES[name]()
    return tx, make_step(tx, counter=TRACES[name])


@functools.cache
def baseline(name):
    """(params, state, updates) of 5 float32 steps of a case."""
    tx, step = case(name)
    return run(tx, steps=5, step=step)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


# --------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("name", CASES)
def test_jit_compiles_once(name):
    baseline(name)  # 5 steps with the case's shared step function
    tx, step = case(name)
    run(tx, steps=3, step=step)  # a fresh state and params: same shapes, no new trace
    traces = TRACES[name]
    assert len(traces) == 1, f"{name} traced {len(traces)} times for one input shape"


@pytest.mark.parametrize("name", CASES)
def test_unknown_extra_args_are_ignored(name):
    tx = CASES[name]()
    params = init_params()
    state = tx.init(params)
    batch, mask = batch_for(0, state)
    stats = STATS_FN(params, batch, mask)
    plain = tx.update(stats.mean_grad, state, params, grad_stats=stats)
    extra = tx.update(
        stats.mean_grad, state, params, grad_stats=stats, loss=jnp.ones(()), rng="anything"
    )
    assert_trees_close(plain, extra, rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_inside_optax_chain(name):
    _, state, history = baseline(name)
    chained = optax.chain(optax.identity(), CASES[name](), optax.identity())
    _, chained_state, chained_history = run(chained, steps=5)
    assert_trees_close(history, chained_history)
    assert_trees_close(state, chained_state[1])


@pytest.mark.parametrize("name", CASES)
def test_inject_hyperparams_learning_rate(name):
    make = CASES[name]
    _, state, history = baseline(name)
    learning_rate = inspect.signature(make).parameters["learning_rate"].default
    injected = optax.inject_hyperparams(make)(learning_rate=learning_rate)
    _, injected_state, injected_history = run(injected, steps=5)
    assert_trees_close(history, injected_history)
    if name in HAS_RULE:
        assert int(ab.suggested_batch_size(injected_state)) == int(ab.suggested_batch_size(state))
    # Every update rule here is linear in the learning rate at a given state: a doubled
    # injected rate doubles the update.
    params = init_params()
    batch, mask = batch_for(9, injected_state)
    stats = STATS_FN(params, batch, mask)
    once, _ = injected.update(stats.mean_grad, injected_state, params, grad_stats=stats)
    doubled_state = injected_state._replace(
        hyperparams={**injected_state.hyperparams, "learning_rate": jnp.asarray(2 * learning_rate)}
    )
    twice, _ = injected.update(stats.mean_grad, doubled_state, params, grad_stats=stats)
    assert_trees_close(jax.tree.map(lambda u: 2 * u, once), twice, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_param_dtypes(name, dtype):
    if dtype == jnp.float32:
        params, state, history = baseline(name)
    else:
        params, state, history = run(CASES[name](), steps=5, params=init_params(dtype))
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(history[-1]))
    for leaf in jax.tree.leaves(state):
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))), f"non-finite state: {state}"
    if name in HAS_RULE:
        size = ab.suggested_batch_size(state)
        assert size.dtype == jnp.int32 and 4 <= int(size) <= BUCKET
    assert full_loss(params) < full_loss(init_params(dtype))


@pytest.mark.parametrize("name", CASES)
def test_converges_on_noisy_least_squares(name):
    initial = full_loss(init_params())
    tx, step = case(name)
    params, _, _ = run(tx, steps=150, step=step)
    noise_floor = 0.5 * 0.5**2
    assert full_loss(params) < noise_floor + 0.05 * initial, (full_loss(params), initial)


# --------------------------------------------------------------------- grad_stats contract


@pytest.mark.parametrize("name", READS_STATS)
def test_missing_grad_stats_shows_the_call(name):
    tx = CASES[name]()
    params = init_params()
    with pytest.raises(TypeError, match=r"grad_stats=stats_fn\(params, batch\)"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize(
    ("factory", "option"),
    [
        (lambda: ab.coordinate_norm_test(), "coordinates=True"),
        (lambda: ab.adadagrad(0.1, test="coordinate"), "coordinates=True"),
        (lambda: ab.inner_product_test(), "inner=True"),
        (lambda: ab.augmented_inner_product_test(), "inner=True"),
    ],
)
def test_missing_optional_sums_says_which(factory, option):
    tx = factory()
    params = init_params()
    stats = ab.per_example_stats(loss_fn)(params, {"x": X[:8], "y": Y[:8]})
    with pytest.raises(TypeError, match=option):
        tx.update(stats.mean_grad, tx.init(params), params, grad_stats=stats)


def test_adadagrad_norm_test_needs_no_coordinate_sums():
    """test="norm" runs on the plain statistics and matches norm_test + AdaGrad on them."""
    params = init_params()
    stats = ab.per_example_stats(loss_fn)(params, {"x": X[:8], "y": Y[:8]})
    assert stats.sq_sum is None
    tx = ab.adadagrad(0.3, eta=0.5, **BOUNDS)
    by_parts = optax.chain(
        ab.norm_test(0.5, **BOUNDS),
        ab.transforms.scale_by_adagrad_torch(),
        optax.scale_by_learning_rate(0.3),
    )
    got = tx.update(stats.mean_grad, tx.init(params), params, grad_stats=stats)
    want = by_parts.update(stats.mean_grad, by_parts.init(params), params, grad_stats=stats)
    assert_trees_close(got, want)
    assert int(ab.suggested_batch_size(got[1])) > BOUNDS["min_batch_size"]


def _has_counter(node):
    return "skipped" in getattr(node, "_fields", ())


def _skip_states(state):
    """The states (of rules and monitors) that carry a ``skipped`` counter."""
    return [x for x in jax.tree.leaves(state, is_leaf=_has_counter) if _has_counter(x)]


def _poisoned(stats, poison):
    if poison == "loss":
        return stats._replace(loss_sum=jnp.nan)
    if poison == "grad":
        return stats._replace(grad_sum=jax.tree.map(lambda g: g + jnp.inf, stats.grad_sum))
    return stats._replace(sq_norm_sum=jnp.nan)


@pytest.mark.parametrize("name", READS_STATS)
def test_non_finite_statistics_leave_the_state(name):
    tx, _ = case(name)
    params, state, _ = baseline(name)
    stats = STATS_FN(params, *batch_for(5, state))
    for poison in ("loss", "grad", "sq_norm"):
        _, new_state = tx.update(
            stats.mean_grad, state, params, grad_stats=_poisoned(stats, poison)
        )
        before, after = _skip_states(state), _skip_states(new_state)
        assert before, "no state with a skipped counter"
        for old, new in zip(before, after, strict=True):
            assert int(new.skipped) == int(old.skipped) + 1, poison
            assert_trees_close(old._replace(skipped=0), new._replace(skipped=0), rtol=0, atol=0)


@pytest.mark.parametrize("name", READS_STATS)
def test_non_finite_step_is_skipped_by_apply_if_finite(name):
    tx = optax.apply_if_finite(CASES[name](), max_consecutive_errors=5)
    params, _, _ = baseline(name)
    state = tx.init(params)
    stats = _poisoned(STATS_FN(params, *batch_for(5, state)), "grad")
    updates, new_state = tx.update(stats.mean_grad, state, params, grad_stats=stats)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(new_state.notfinite_count) == 1
    assert_trees_close(state.inner_state, new_state.inner_state, rtol=0, atol=0)


@pytest.mark.parametrize("name", READS_STATS)
def test_fewer_than_two_examples_is_no_information(name):
    tx, _ = case(name)
    params, state, _ = baseline(name)
    batch, _ = batch_for(5, state)
    for real_examples in (0, 1):
        stats = STATS_FN(params, batch, np.arange(BUCKET) < real_examples)
        _, new_state = tx.update(stats.mean_grad, state, params, grad_stats=stats)
        for leaf in jax.tree.leaves(new_state):
            assert bool(jnp.all(jnp.isfinite(leaf))), new_state
        if name in HAS_RULE:
            assert int(ab.suggested_batch_size(new_state)) == int(ab.suggested_batch_size(state))
        for old, new in zip(_skip_states(state), _skip_states(new_state), strict=True):
            assert int(new.skipped) == int(old.skipped)


@pytest.mark.parametrize("name", HAS_RULE)
def test_zero_gradient_keeps_the_batch_size(name):
    tx = CASES[name]()
    params = init_params()
    batch = {"x": X[:BUCKET], "y": np.zeros(BUCKET, np.float32)}  # w = 0 fits y = 0 exactly
    stats = STATS_FN(params, batch, np.ones(BUCKET, bool))
    assert float(stats.mean_grad_sq_norm) == 0.0
    state = tx.init(params)
    _, new_state = tx.update(stats.mean_grad, state, params, grad_stats=stats)
    assert int(ab.suggested_batch_size(new_state)) == int(ab.suggested_batch_size(state))
    for leaf in jax.tree.leaves(new_state):
        assert bool(jnp.all(jnp.isfinite(leaf)))


# --------------------------------------------------------------------- injected rule settings


RULE_FACTORIES = {
    "norm_test": (ab.norm_test, {"eta": 0.2, "every": 2, **BOUNDS}),
    "inner_product_test": (ab.inner_product_test, {"theta": 0.2, **BOUNDS}),
    "augmented_inner_product_test": (
        ab.augmented_inner_product_test,
        {"theta": 0.3, "nu": 0.5, **BOUNDS},
    ),
    "coordinate_norm_test": (ab.coordinate_norm_test, {"eta": 0.5, **BOUNDS}),
    "cabs_rule": (ab.cabs_rule, {"learning_rate": 0.05, "decay": 0.9, **BOUNDS}),
    "scale_by_batch_size": (ab.scale_by_batch_size, {"base_batch_size": 8, "max_scale": 3.0}),
    "gradient_noise_scale": (ab.gradient_noise_scale, {"decay": 0.9}),
}


@pytest.mark.parametrize("name", RULE_FACTORIES)
def test_rule_hyperparameters_can_be_injected(name):
    factory, kwargs = RULE_FACTORIES[name]
    plain = optax.chain(factory(**kwargs), optax.sgd(0.05))
    injected = optax.chain(optax.inject_hyperparams(factory)(**kwargs), optax.sgd(0.05))
    _, state, history = run(plain, steps=6)
    _, injected_state, injected_history = run(injected, steps=6)
    assert_trees_close(history, injected_history)
    assert_trees_close(state[0], injected_state[0].inner_state)
