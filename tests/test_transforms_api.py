"""The API contract of the transforms: argument checks, `suggested_batch_size` in nested
states, composition, and the documented edge cases of the batch-size tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab

# --------------------------------------------------------------------- argument checks

BAD_ARGUMENTS = [
    (lambda: ab.norm_test(0.0), ValueError, r"eta=0\.0 .*\(0, inf\)"),
    (lambda: ab.norm_test(-1), ValueError, r"eta=-1"),
    (lambda: ab.norm_test(float("nan")), ValueError, r"eta=nan"),
    (lambda: ab.norm_test("0.1"), TypeError, r"eta='0.1' must be a number"),
    (lambda: ab.norm_test(min_batch_size=0), ValueError, r"min_batch_size=0 .*\[1, "),
    (lambda: ab.norm_test(min_batch_size=64, max_batch_size=32), ValueError, r"min_batch_size=64"),
    (
        lambda: ab.norm_test(initial_batch_size=4),
        ValueError,
        r"initial_batch_size=4 .*\[16, 2048\]",
    ),
    (lambda: ab.norm_test(every=0), ValueError, r"every=0"),
    (lambda: ab.norm_test(every=1.5), ValueError, r"every=1.5 must be an integer"),
    (lambda: ab.norm_test(monotone="yes"), TypeError, r"monotone='yes'"),
    (lambda: ab.inner_product_test(theta=0), ValueError, r"theta=0"),
    (lambda: ab.augmented_inner_product_test(nu=-0.1), ValueError, r"nu=-0.1"),
    (lambda: ab.coordinate_norm_test(eta=0), ValueError, r"eta=0"),
    (lambda: ab.cabs(-0.1), ValueError, r"learning_rate=-0.1"),
    (lambda: ab.cabs(optax.constant_schedule(0.1)), TypeError, r"constant learning rate"),
    (lambda: ab.cabs_rule(0.1, decay=1.0), ValueError, r"decay=1.0 .*\[0, 1\)"),
    (lambda: ab.cabs_rule(0.1, eps=-1e-8), ValueError, r"eps=-1e-08"),
    (lambda: ab.cabs_rule(0.1, scale=0), ValueError, r"scale=0"),
    (lambda: ab.cabs(0.1, max_batch_size=2**31), ValueError, r"max_batch_size=2147483648"),
    (lambda: ab.adadagrad(0.0), ValueError, r"learning_rate=0.0"),
    (lambda: ab.adadagrad(0.1, eps=-1), ValueError, r"eps=-1"),
    (
        lambda: ab.adadagrad(0.1, test="ip"),
        ValueError,
        r"test='ip' is not one of \['coordinate', 'norm'\]\. Pass test='norm'",
    ),
    (lambda: ab.adadagrad(0.1, test=None), ValueError, r"test=None is not one of"),
    (lambda: ab.adadagrad(0.1, test="coordinate", eta=0), ValueError, r"eta=0"),
    (lambda: ab.adadagrad_norm(0.1, b0=0), ValueError, r"b0=0"),
    (lambda: ab.scale_by_adagrad_norm(b0=-1.0), ValueError, r"b0=-1.0"),
    (lambda: ab.scale_by_batch_size(0), ValueError, r"base_batch_size=0"),
    (lambda: ab.scale_by_batch_size(32, "cubic"), ValueError, r"rule='cubic'.*linear"),
    (lambda: ab.scale_by_batch_size(32, max_scale=0.0), ValueError, r"max_scale=0.0"),
    (lambda: ab.scale_by_batch_size(32, "adascale", decay=1.5), ValueError, r"decay=1.5"),
    (lambda: ab.gradient_noise_scale(decay=-0.1), ValueError, r"decay=-0.1"),
]


@pytest.mark.parametrize(("factory", "error", "match"), BAD_ARGUMENTS)
def test_bad_hyperparameters_fail_in_the_factory(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_error_names_range_and_fix():
    with pytest.raises(ValueError) as info:
        ab.norm_test(eta=-0.5)
    message = str(info.value)
    assert "eta=-0.5" in message and "range" in message and "eta=0.1" in message


def test_grad_stats_of_the_wrong_type():
    tx = ab.norm_test()
    with pytest.raises(TypeError, match=r"must be an adaptive_batch\.GradStats"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)), grad_stats={"count": 3})


# --------------------------------------------------------------------- suggested_batch_size


def test_suggested_batch_size_in_nested_states():
    params = jnp.zeros(3)
    chain = optax.chain(ab.norm_test(0.2, initial_batch_size=32), optax.adam(1e-3))
    assert int(ab.suggested_batch_size(chain.init(params))) == 32

    named = optax.named_chain(
        ("rule", ab.norm_test(initial_batch_size=24)), ("opt", optax.sgd(0.1))
    )
    assert int(ab.suggested_batch_size(named.init(params))) == 24

    injected = optax.inject_hyperparams(ab.adadagrad)(learning_rate=0.1, initial_batch_size=40)
    assert int(ab.suggested_batch_size(injected.init(params))) == 40
    injected = optax.inject_hyperparams(ab.adadagrad)(0.1, test="coordinate", min_batch_size=8)
    assert int(ab.suggested_batch_size(injected.init(params))) == 8

    multi = optax.MultiSteps(ab.cabs(0.1, initial_batch_size=20), every_k_schedule=2)
    assert int(ab.suggested_batch_size(multi.init(params))) == 20

    guarded = optax.apply_if_finite(ab.adadagrad_norm(0.1, initial_batch_size=48), 3)
    assert int(ab.suggested_batch_size(guarded.init(params))) == 48


def test_several_rules_give_the_largest():
    tx = optax.chain(
        ab.norm_test(initial_batch_size=32),
        ab.cabs_rule(0.1, initial_batch_size=64),
        ab.coordinate_norm_test(initial_batch_size=16),
    )
    assert int(ab.suggested_batch_size(tx.init(jnp.zeros(2)))) == 64


def test_no_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="no batch-size rule"):
        ab.suggested_batch_size(optax.adam(1e-3).init(jnp.zeros(2)))


def test_suggested_batch_size_under_jit():
    state = ab.cabs(0.1, initial_batch_size=100).init(jnp.zeros(2))
    size = jax.jit(ab.suggested_batch_size)(state)
    assert size.dtype == jnp.int32 and int(size) == 100


# --------------------------------------------------------------------- composition


def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def test_norm_test_composes_with_adam():
    stats_fn = ab.per_example_stats(loss_fn)
    tx = optax.chain(ab.norm_test(0.2), optax.adam(1e-3))
    w = jnp.zeros(3)
    state = tx.init(w)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 3))), "y": jnp.asarray(rng.normal(size=16))}
    stats = stats_fn(w, batch)
    updates, state = tx.update(stats.mean_grad, state, w, grad_stats=stats)
    adam_only = optax.adam(1e-3)
    expected, _ = adam_only.update(stats.mean_grad, adam_only.init(w), w)
    np.testing.assert_allclose(updates, expected)
    assert int(ab.suggested_batch_size(state)) >= 16


# --------------------------------------------------------------------- edge cases


def stats_from(G, losses=None):
    """GradStats with every field from per-example gradients G (b × d)."""
    G = np.asarray(G, np.float64)
    gbar = G.mean(axis=0)
    p = G @ gbar
    losses = np.ones(len(G)) if losses is None else losses
    return ab.GradStats(
        count=jnp.asarray(len(G), jnp.float32),
        loss_sum=jnp.asarray(np.sum(losses), jnp.float32),
        grad_sum=jnp.asarray(G.sum(axis=0), jnp.float32),
        sq_norm_sum=jnp.asarray(np.sum(G**2), jnp.float32),
        sq_sum=jnp.asarray(np.sum(G**2, axis=0), jnp.float32),
        inner_sum=jnp.asarray(p.sum(), jnp.float32),
        inner_sq_sum=jnp.asarray(np.sum(p**2), jnp.float32),
    )


def noisy(b, mean, noise, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(mean) + noise * rng.normal(size=(b, len(mean)))


def step(tx, state, G):
    return tx.update(jnp.zeros(G.shape[1]), state, grad_stats=stats_from(G))[1]


def test_norm_test_grows_only_unless_asked():
    noisy_batch = noisy(16, [1.0, 1.0], 5.0)  # fails: demands ~ 50²·... >> 16
    quiet_batch = noisy(64, [1.0, 1.0], 0.01)  # passes easily
    for monotone in (True, False):
        tx = ab.norm_test(0.5, min_batch_size=2, max_batch_size=1024, monotone=monotone)
        state = step(tx, tx.init(jnp.zeros(2)), noisy_batch)
        assert not bool(state.passed) and int(state.batch_size) > 16
        grown = int(state.batch_size)
        state = step(tx, state, quiet_batch)
        assert bool(state.passed)
        expected = max(grown, 64) if monotone else 2
        assert int(state.batch_size) == expected


def test_norm_test_caps_at_max_batch_size():
    tx = ab.norm_test(0.1, max_batch_size=100)
    state = step(tx, tx.init(jnp.zeros(2)), noisy(16, [1e-3, 0.0], 10.0))
    assert int(state.batch_size) == 100


def test_every_k_tests_on_steps_0_k_2k():
    tx = ab.norm_test(0.1, min_batch_size=2, max_batch_size=4096, every=3)
    state = tx.init(jnp.zeros(2))
    sizes = []
    for t in range(7):
        state = step(tx, state, noisy(8, [1.0, 1.0], 0.5 * (t + 1), seed=t))
        sizes.append(int(state.batch_size))
    changes = [t for t in range(1, 7) if sizes[t] != sizes[t - 1]]
    assert set(changes) <= {3, 6} and sizes[0] > 2
    assert changes, sizes


def test_coordinate_test_ignores_coordinates_with_zero_mean():
    # Coordinate 0: gradients +1/-1 (mean exactly 0, variance > 0): left out.
    # Coordinate 1: mean 1, small noise: demands V₁/(η²ḡ₁²).
    G = noisy(32, [0.0, 1.0], 0.2, seed=3)
    G[:, 0] = np.where(np.arange(32) % 2 == 0, 1.0, -1.0)
    gbar1 = G[:, 1].mean()
    V1 = G[:, 1].var(ddof=1)
    tx = ab.coordinate_norm_test(0.05, min_batch_size=2, max_batch_size=10**6, monotone=False)
    state = step(tx, tx.init(jnp.zeros(2)), G)
    assert int(state.batch_size) == int(np.ceil(V1 / (0.05**2 * gbar1**2)))
    # All coordinates with zero mean: no information, the batch size stays.
    G[:, 1] = -G[:, 0]
    state2 = step(tx, state, G)
    assert int(state2.batch_size) == int(state.batch_size)


def test_coordinate_test_tiny_mean_gives_the_cap():
    G = noisy(32, [0.0, 1.0], 0.2, seed=4)
    G[:, 0] = 1e-6 + np.where(np.arange(32) % 2 == 0, 0.5, -0.5)  # demand ~ 1e13
    tx = ab.coordinate_norm_test(0.1, max_batch_size=512)
    state = step(tx, tx.init(jnp.zeros(2)), G)
    assert int(state.batch_size) == 512


def test_cabs_negative_running_loss_gives_the_cap():
    tx = ab.cabs_rule(0.1, max_batch_size=256)
    G = noisy(8, [1.0, 1.0], 1.0)
    state = tx.update(
        jnp.zeros(2), tx.init(jnp.zeros(2)), grad_stats=stats_from(G, -100.0 * np.ones(8))
    )[1]
    assert float(state.loss_avg) < 0 and int(state.batch_size) == 256


def test_rules_run_inside_multisteps():
    stats_fn = ab.per_example_stats(loss_fn)
    tx = optax.MultiSteps(ab.adadagrad_norm(0.1, eta=0.2, min_batch_size=4), every_k_schedule=2)
    w = jnp.zeros(3)
    state = tx.init(w)
    rng = np.random.default_rng(1)
    update = jax.jit(tx.update)
    for _ in range(4):
        batch = {"x": jnp.asarray(rng.normal(size=(8, 3))), "y": jnp.asarray(rng.normal(size=8))}
        stats = stats_fn(w, batch)
        updates, state = update(stats.mean_grad, state, w, grad_stats=stats)
        w = optax.apply_updates(w, updates)
    assert int(state.gradient_step) == 2
    assert int(ab.suggested_batch_size(state)) > 4  # the test ran on the emitted steps


# --------------------------------------------------------------------- extra arguments

#: Each exported transform, built with its required arguments only.
EXPORTED = {
    "adadagrad": lambda: ab.adadagrad(0.1),
    "adadagrad_norm": lambda: ab.adadagrad_norm(0.1),
    "augmented_inner_product_test": ab.augmented_inner_product_test,
    "cabs": lambda: ab.cabs(0.1),
    "cabs_rule": lambda: ab.cabs_rule(0.1),
    "coordinate_norm_test": ab.coordinate_norm_test,
    "gradient_noise_scale": ab.gradient_noise_scale,
    "inner_product_test": ab.inner_product_test,
    "norm_test": ab.norm_test,
    "scale_by_adagrad_norm": ab.scale_by_adagrad_norm,
    "scale_by_adagrad_torch": ab.transforms.scale_by_adagrad_torch,
    "scale_by_batch_size": lambda: ab.scale_by_batch_size(16),
}


def test_every_exported_transform_is_listed_here():
    exported = ab.transforms.__all__
    factories = {n for n in exported if n[0].islower() and n != "suggested_batch_size"}
    assert factories == set(EXPORTED)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_transform_takes_grad_stats_and_unknown_keywords(name):
    tx = EXPORTED[name]()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    w = jnp.array([0.5, -1.0, 2.0])
    stats = ab.per_example_stats(loss_fn, coordinates=True, inner=True)(
        w, {"x": jnp.asarray(np.eye(3)[[0, 1, 2, 0]] + 0.1), "y": jnp.arange(4.0)}
    )
    state = tx.init(w)
    plain = tx.update(stats.mean_grad, state, w, grad_stats=stats)
    extra = tx.update(stats.mean_grad, state, w, grad_stats=stats, rng="unused", loss=1.0)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), plain, extra)
    assert all(jax.tree.leaves(chex_equal))


# --------------------------------------------------------------------- sharded states


def test_adagrad_state_keeps_the_sharding_of_its_parameters():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    w = jax.device_put(jnp.arange(8.0), sharding)
    for tx in (ab.transforms.scale_by_adagrad_torch(), ab.adadagrad(0.1)):
        state = tx.init(w)
        sums = [leaf for leaf in jax.tree.leaves(state) if jnp.shape(leaf) == (8,)]
        assert sums and all(leaf.sharding == sharding for leaf in sums)
