"""Train steps: padding changes nothing, micro-batch accumulation is exact, the statistics
the transform receives equal float64 brute-force sums, and bad input fails clearly."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab
from adaptive_batch.training._accumulate import split_microbatches

FEATURES = 5


def loss_fn(params, batch):
    """Least squares with a bias: ℓᵢ = ½ (xᵢ·w + c − yᵢ)²."""
    residual = batch["x"] @ params["w"] + params["c"] - batch["y"]
    return 0.5 * residual**2


def make_data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=FEATURES) + 0.3 * rng.normal(size=n)).astype(np.float32)
    return {"x": x, "y": y}


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=FEATURES) * 0.1, jnp.float32),
        "c": jnp.asarray(0.2, jnp.float32),
    }


class RecordState(NamedTuple):
    stats: ab.GradStats  # the last grad_stats received


def record_stats(params_like) -> optax.GradientTransformationExtraArgs:
    """Identity on the updates; keeps the grad_stats it is given in its state."""
    scalar = jnp.zeros((), jnp.float32)
    zeros = jax.tree.map(jnp.zeros_like, params_like)
    empty = ab.GradStats(scalar, scalar, zeros, scalar, zeros, scalar, scalar)

    def init_fn(params):
        del params
        return RecordState(empty)

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra):
        del state, params, extra
        return updates, RecordState(grad_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def brute_force_stats(params, data, rows):
    """Float64 NumPy sums over the given rows, gᵢ = rᵢ (xᵢ, 1), direction ḡ."""
    w = np.asarray(params["w"], np.float64)
    c = float(params["c"])
    x = data["x"][rows].astype(np.float64)
    y = data["y"][rows].astype(np.float64)
    residual = x @ w + c - y
    grads = np.concatenate([residual[:, None] * x, residual[:, None]], axis=1)  # (b, F+1)
    mean = grads.mean(axis=0)
    products = grads @ mean
    return {
        "count": len(rows),
        "loss_sum": np.sum(0.5 * residual**2),
        "grad_sum": grads.sum(axis=0),
        "sq_norm_sum": np.sum(grads**2),
        "sq_sum": np.sum(grads**2, axis=0),
        "inner_sum": products.sum(),
        "inner_sq_sum": np.sum(products**2),
    }


def flat(tree):
    """(w, c) leaves as one vector in the brute force's order."""
    return np.concatenate([np.ravel(tree["w"]), np.ravel(tree["c"])])


def check_stats(stats: ab.GradStats, reference, rtol=2e-5):
    np.testing.assert_allclose(float(stats.count), reference["count"])
    for name in ("loss_sum", "sq_norm_sum", "inner_sum", "inner_sq_sum"):
        np.testing.assert_allclose(float(getattr(stats, name)), reference[name], rtol=rtol)
    for name in ("grad_sum", "sq_sum"):
        np.testing.assert_allclose(
            flat(getattr(stats, name)), reference[name], rtol=rtol, atol=1e-5, err_msg=name
        )


def optimizer(params):
    """Records the statistics, then CABS (reads them) and SGD."""
    return optax.chain(record_stats(params), ab.cabs(0.05, min_batch_size=2))


def test_split_microbatches_takes_rows_j_mod_k():
    rows = jnp.arange(12)
    micro = split_microbatches({"r": rows}, 3)["r"]
    assert micro.shape == (3, 4)
    for j in range(3):
        np.testing.assert_array_equal(micro[j], np.arange(12)[j::3])


def test_padded_bucket_step_equals_unpadded_step():
    data = make_data(100)
    params = init_params()
    tx = optimizer(params)
    step = ab.make_train_step(loss_fn, tx, coordinates=True, inner=True)

    p1, s1, m1 = step(params, tx.init(params), data, np.ones(100, bool))
    # Pad to 128 with garbage rows (NaN and huge values) that the mask must hide.
    padded = {
        "x": np.concatenate([data["x"], np.full((28, FEATURES), np.nan, np.float32)]),
        "y": np.concatenate([data["y"], np.full(28, 1e30, np.float32)]),
    }
    mask = np.arange(128) < 100
    p2, s2, m2 = step(params, tx.init(params), padded, mask)

    assert not np.allclose(flat(p1), flat(params))  # the step moved the params
    np.testing.assert_allclose(flat(p2), flat(p1), atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert int(m2["count"]) == 100
    assert int(m2["batch_size"]) == int(m1["batch_size"])
    check_stats(s2[0].stats, brute_force_stats(params, data, np.arange(100)))


@pytest.mark.parametrize("num_real", [512, 500])
def test_one_batch_of_512_equals_4_microbatches_of_128(num_real):
    data = make_data(512, seed=2)
    mask = np.arange(512) < num_real
    params = init_params()
    tx = optimizer(params)
    step = ab.make_train_step(loss_fn, tx, coordinates=True, inner=True)

    p1, s1, m1 = step(params, tx.init(params), data, mask)
    p4, s4, m4 = step(params, tx.init(params), data, mask, num_microbatches=4)

    np.testing.assert_allclose(flat(p4), flat(p1), atol=1e-6)
    stats1, stats4 = s1[0].stats, s4[0].stats
    for name in ("count", "loss_sum", "sq_norm_sum", "inner_sum", "inner_sq_sum"):
        np.testing.assert_allclose(
            float(getattr(stats4, name)), float(getattr(stats1, name)), rtol=1e-5, err_msg=name
        )
    for name in ("grad_sum", "sq_sum"):
        np.testing.assert_allclose(
            flat(getattr(stats4, name)), flat(getattr(stats1, name)), rtol=1e-5, atol=1e-6
        )
    assert int(m4["batch_size"]) == int(m1["batch_size"])
    # Both against float64 brute force: the inner sums use the whole batch's mean
    # gradient (a per-micro-batch direction would give other numbers).
    reference = brute_force_stats(params, data, np.arange(num_real))
    check_stats(stats1, reference)
    check_stats(stats4, reference)


def test_microbatches_without_inner_sums_match_too():
    data = make_data(256, seed=3)
    params = init_params()
    # Needs the coordinate sums, not the inner ones.
    tx = optax.chain(ab.coordinate_norm_test(0.5, min_batch_size=4), optax.adagrad(0.1))
    step = ab.make_train_step(loss_fn, tx)
    p1, _, m1 = step(params, tx.init(params), data)
    p8, _, m8 = step(params, tx.init(params), data, num_microbatches=8)
    np.testing.assert_allclose(flat(p8), flat(p1), atol=1e-6)
    assert int(m8["batch_size"]) == int(m1["batch_size"])


def test_statistics_options_are_detected_from_the_transform():
    params = init_params()
    data = make_data(16)
    cases = {
        "plain": (optax.sgd(0.1), None),  # the mean gradient only
        "cabs": (ab.cabs(0.1, min_batch_size=2), (False, False)),
        "coordinate": (optax.chain(ab.coordinate_norm_test(0.5, min_batch_size=2), optax.sgd(0.1)),
                       (True, False)),
        "inner": (optax.chain(ab.inner_product_test(0.5, min_batch_size=2), optax.sgd(0.1)),
                  (False, True)),
    }  # fmt: skip
    for name, (tx, expected) in cases.items():
        step = ab.make_train_step(loss_fn, tx)
        _, _, metrics = step(params, tx.init(params), data)
        assert list(step._options.values()) == [expected], name
        assert ("batch_size" in metrics) == (name != "plain"), name


def test_plain_optax_transform_and_learning_rate_metric():
    params = init_params()
    data = make_data(32)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.25)
    step = ab.make_train_step(loss_fn, tx)
    new_params, _, metrics = step(params, tx.init(params), data)
    assert float(metrics["learning_rate"]) == pytest.approx(0.25)
    # Plain SGD on the mean loss, against the float64 brute-force mean gradient.
    reference = brute_force_stats(params, data, np.arange(32))
    expected = flat(params) - 0.25 * reference["grad_sum"] / 32
    np.testing.assert_allclose(flat(new_params), expected, rtol=1e-5, atol=1e-6)


def test_plain_transform_takes_one_gradient_and_no_per_example_pass():
    params = init_params()
    data = make_data(12)
    data["x"][9:] = np.nan  # padding rows (mask 0) holding NaN
    mask = np.arange(12) < 9
    shapes = []

    def recording_loss(params, batch):
        shapes.append(batch["x"].shape[0])  # at trace time: the rows it is called with
        return loss_fn(params, batch)

    tx = optax.sgd(0.25)
    step = ab.make_train_step(recording_loss, tx)
    new_params, _, metrics = step(params, tx.init(params), data, mask)
    assert shapes and set(shapes) == {12}  # the whole batch; never one example
    reference = brute_force_stats(params, data, np.arange(9))
    expected = flat(params) - 0.25 * reference["grad_sum"] / 9
    np.testing.assert_allclose(flat(new_params), expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["count"]) == 9
    assert float(metrics["loss"]) == pytest.approx(reference["loss_sum"] / 9, rel=1e-5)
    # Three micro-batches of 4 give the same step.
    split, _, _ = step(params, tx.init(params), data, mask, num_microbatches=3)
    np.testing.assert_allclose(flat(split), flat(new_params), rtol=1e-5, atol=1e-6)
    # So do four of 3, the last one (rows 3::4) all padding with NaN.
    rows = np.array([i for i in range(12) if i % 4 != 3])
    holes = make_data(12)
    holes["x"][3::4] = np.nan
    stepped, _, _ = step(params, tx.init(params), holes, np.arange(12) % 4 != 3, num_microbatches=4)
    reference = brute_force_stats(params, holes, rows)
    expected = flat(params) - 0.25 * reference["grad_sum"] / len(rows)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(flat(stepped), expected, rtol=1e-5, atol=1e-6)

    # Asking for a statistics option forces the per-example pass.
    shapes.clear()
    forced = ab.make_train_step(recording_loss, tx, coordinates=False)
    forced_params, _, _ = forced(params, tx.init(params), data, mask)
    assert 1 in shapes
    np.testing.assert_allclose(flat(forced_params), flat(new_params), rtol=1e-5, atol=1e-6)


def test_plain_statistics_refuse_to_give_a_variance():
    step = ab.make_train_step(loss_fn, optax.sgd(0.1))
    params = init_params()
    stats = step.stats(step.tx, params, step.tx.init(params), make_data(4), np.ones(4, bool), 1)
    assert stats.sq_norm_sum is None
    with pytest.raises(ValueError, match="plain gradient"):
        stats.variance()
    with pytest.raises(TypeError, match="plain gradient"):
        tx = ab.norm_test(0.1)
        tx.update(stats.mean_grad, tx.init(params), params, grad_stats=stats)


def test_step_rejects_bad_input():
    with pytest.raises(TypeError, match="loss_fn"):
        ab.make_train_step("not a function", optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"optax\.GradientTransformation"):
        ab.make_train_step(loss_fn, 0.1)
    with pytest.raises(ValueError, match="backend"):
        ab.make_train_step(loss_fn, optax.sgd(0.1), backend="nope")
    step = ab.make_train_step(loss_fn, optax.sgd(0.1))
    params = init_params()
    with pytest.raises(ValueError, match="num_microbatches=3"):
        step(params, optax.sgd(0.1).init(params), make_data(16), num_microbatches=3)


def test_a_mask_between_0_and_1_is_refused():
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pytest

    import adaptive_batch as ab

    tx = optax.sgd(0.1)
    step = ab.make_train_step(lambda w, b: (b["x"] @ w) ** 2, tx)
    w = jnp.zeros(3)
    data = {"x": np.ones((4, 3), np.float32)}
    with pytest.raises(ValueError, match=r"mask holds \[0.5\]: a mask marks each row"):
        step(w, tx.init(w), data, np.array([1.0, 0.5, 1.0, 0.0], np.float32))
    step(w, tx.init(w), data, np.array([1.0, 1.0, 0.0, 0.0], np.float32))  # 0 and 1: fine


@pytest.mark.parametrize("tx_name", ["norm_test+adam", "adam"])
def test_bfloat16_parameters_keep_their_dtype_and_compile_once(tx_name):
    # The statistics sum bfloat16 gradients in float32; the optimizer gets the mean
    # gradient back in bfloat16, so Adam's moments stay bfloat16 and the step's input
    # types never change.
    tx = {
        "norm_test+adam": optax.chain(ab.norm_test(0.5, min_batch_size=8), optax.adam(1e-2)),
        "adam": optax.adam(1e-2),
    }[tx_name]
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params())
    opt_state = tx.init(params)
    step = ab.make_train_step(loss_fn, tx)
    data = make_data(32)
    with ab.training.CompileCounter() as compiles:
        for _ in range(3):
            params, opt_state, _ = step(params, opt_state, data)
    assert compiles.count(step.name) == 1
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    moments = [leaf for leaf in jax.tree.leaves(opt_state) if jnp.shape(leaf) == (FEATURES,)]
    assert len(moments) == 2 and all(m.dtype == jnp.bfloat16 for m in moments)


def test_multisteps_around_a_rule_is_refused_with_the_exact_alternative():
    rule = optax.chain(ab.norm_test(0.5, min_batch_size=8), optax.sgd(0.1))
    params = init_params()
    for tx in (optax.MultiSteps(rule, 4), optax.MultiSteps(rule, 4).gradient_transformation()):
        step = ab.make_train_step(loss_fn, tx)
        with pytest.raises(TypeError, match=r"last micro-step only.*num_microbatches=k"):
            step(params, tx.init(params), make_data(16))
    # A plain optimizer reads no statistics: MultiSteps is fine around it.
    tx = optax.MultiSteps(optax.sgd(0.1), 2)
    step = ab.make_train_step(loss_fn, tx)
    params, state, _ = step(params, tx.init(params), make_data(16))
    assert int(state.mini_step) == 1


def test_noise_scale_metric_against_per_example_gradients():
    """B_simple of the batch, tr Σ̂ / ‖ḡ‖² with the unbiased tr Σ̂, against a float64
    brute force from per-example gradients (the masked rows excluded)."""
    tx = optax.chain(ab.norm_test(0.5, min_batch_size=8), optax.sgd(0.01))
    params = init_params()
    data = make_data(24)
    mask = np.arange(24) < 20
    step = ab.make_train_step(loss_fn, tx)
    _, _, metrics = step(params, tx.init(params), data, mask)
    x = np.asarray(data["x"], np.float64)[:20]
    y = np.asarray(data["y"], np.float64)[:20]
    w, c = np.asarray(params["w"], np.float64), float(params["c"])
    residual = x @ w + c - y
    grads = np.concatenate([residual[:, None] * x, residual[:, None]], axis=1)  # (b, 6)
    mean = grads.mean(0)
    trace = ((grads - mean) ** 2).sum() / (len(grads) - 1)
    np.testing.assert_allclose(float(metrics["noise_scale"]), trace / (mean @ mean), rtol=1e-4)
    # A plain optimizer gets one plain gradient: no per-example sums, no noise scale.
    plain = ab.make_train_step(loss_fn, optax.sgd(0.01))
    _, _, metrics = plain(params, optax.sgd(0.01).init(params), data, mask)
    assert "noise_scale" not in metrics
