"""The aggregation of `benchmarks/stats_fast.py --repeats N` (the timing itself is not
run here: benchmarks print ratios, tests do not time)."""

import sys

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("stats_fast")


def _row(model, batch, plain_ms, fast_x, coords_x, mem_x):
    return {
        "model": model,
        "batch": batch,
        "plain_ms": plain_ms,
        "fast_x": fast_x,
        "fast_coords_x": coords_x,
        "fast_coords_mem_x": mem_x,
    }


def test_median_rows_takes_medians_and_ranges_per_model_and_batch(bench):
    runs = [
        [_row("mlp", 64, 1.0, 1.10, 1.50, 1.3), _row("mlp", 256, 3.0, 1.00, 1.41, 1.3)],
        [_row("mlp", 64, 2.0, 1.02, 1.38, 1.3), _row("mlp", 256, 5.0, 1.04, 1.39, 1.3)],
        [_row("mlp", 64, 4.0, 1.06, 1.40, 1.3)],  # this run lost its B = 256 row
    ]
    rows = {row["batch"]: row for row in bench.median_rows(runs)}

    assert rows[64]["runs"] == 3 and rows[256]["runs"] == 2
    assert rows[64]["fast_coords_x"] == pytest.approx(1.40)
    assert rows[64]["fast_coords_x_range"] == [1.38, 1.50]
    assert rows[64]["plain_ms"] == pytest.approx(2.0)
    assert "plain_ms_range" not in rows[64]  # ranges for the ratios only
    assert rows[256]["fast_x"] == pytest.approx(1.02)  # median of two: their mean
    assert rows[256]["fast_coords_mem_x_range"] == [1.3, 1.3]


def test_targets_are_judged_on_the_medians(bench):
    runs = [
        [_row("mlp", 64, 1.0, 1.10, 1.45, 1.3)],
        [_row("mlp", 64, 1.0, 1.10, 1.38, 1.3)],
        [_row("mlp", 64, 1.0, 1.10, 1.39, 1.3)],
    ]
    for row in runs[0] + runs[1] + runs[2]:
        row["fast_mem_x"] = 1.0
    met = bench.targets_met(bench.median_rows(runs))
    assert met["coords_le_1.4x"] and met["norms_le_1.15x"]
    assert not bench.targets_met(runs[0])["coords_le_1.4x"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats 0"),
        (["--repeats", "2", "--same-process"], "same-process"),
        (["--batch-sizes", "64", "0"], "--batch-sizes [64, 0]"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(bench, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["stats_fast.py", *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_per_example_gradients_baseline_gives_the_exact_backends_sums(bench):
    """The benchmark's direct per-example-gradient column must time the same statistics
    as the exact backend (else its ratio to the fast backend compares unlike work)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adaptive_batch.stats import per_example_stats

    params, loss_fn, make_batch = bench.mlp(jax.random.key(0))
    batch = make_batch(jax.random.key(1), 6)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    grad_sum, sq_norm_sum = bench.per_example_gradients(loss_fn)(params, batch, mask)
    want = per_example_stats(loss_fn, backend="vmap")(params, batch, mask)
    np.testing.assert_allclose(sq_norm_sum, want.sq_norm_sum, rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(grad_sum), jax.tree.leaves(want.grad_sum), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_the_vmap_target_is_reported_against_both_baselines(bench):
    row = _row("mlp", 256, 3.0, 1.0, 1.3, 1.3)
    row.update(fast_mem_x=1.0, vmap_over_fast=15.0, grads_over_fast=45.0)
    met = bench.targets_met([row])
    assert not met["mlp_b256_vmap_over_fast_ge_20"]
    assert met["mlp_b256_grads_over_fast_ge_20"]
