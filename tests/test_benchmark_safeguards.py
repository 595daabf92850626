"""`benchmarks/safeguards.py`: its patches switch off what they name, and only while
patched (the timing itself is not run here: benchmarks print ratios, tests do not time)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("safeguards")


def small_mlp():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 8)), "w2": jax.random.normal(k2, (8, 2))}

    def loss_fn(params, batch):
        logits = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
        return jax.nn.logsumexp(logits, -1) - logits[:, 0]

    return params, loss_fn, {"x": jax.random.normal(k3, (4, 3))}


def fast_stats(bench, patches, loss_fn, params, batch, mask):
    with bench.patched(patches):
        # traced inside the patch, as the benchmark does
        stats_fn = bench.per_example_stats(loss_fn, backend="fast", coordinates=True)
        return stats_fn(params, batch, mask=mask)


def all_finite(stats) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(stats))


def test_real_rows_keep_nan_in_padding_out_of_the_sums(bench):
    params, loss_fn, batch = small_mlp()
    batch = {"x": batch["x"].at[3].set(jnp.nan)}
    mask = jnp.array([True, True, True, False])
    assert all_finite(fast_stats(bench, [], loss_fn, params, batch, mask))
    unguarded = fast_stats(bench, bench.PATCHES["real_rows"], loss_fn, params, batch, mask)
    assert not all_finite(unguarded)


def test_all_padding_guard_gives_zeros_not_nan(bench):
    params, loss_fn, batch = small_mlp()
    batch = {"x": jnp.full_like(batch["x"], jnp.nan)}
    mask = jnp.zeros(4, bool)
    guarded = fast_stats(bench, [], loss_fn, params, batch, mask)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(guarded.sq_sum))
    unguarded = fast_stats(bench, bench.PATCHES["all_padding_guard"], loss_fn, params, batch, mask)
    assert not all_finite(unguarded.sq_sum)


def test_patches_are_undone_and_a_renamed_function_is_an_error(bench):
    originals = {(m, n): getattr(m, n) for m, n, _ in bench.PATCHES["all_three"]}
    with bench.patched(bench.PATCHES["all_three"]):
        assert all(getattr(m, n) is not f for (m, n), f in originals.items())
    assert all(getattr(m, n) is f for (m, n), f in originals.items())
    missing = [(bench._fast, "no_such_function", None)]
    with pytest.raises(AttributeError, match="update PATCHES"), bench.patched(missing):
        pass


@pytest.mark.slow
def test_every_variant_compiles_to_another_program_with_the_same_statistics(bench):
    params, loss_fn, make_batch = bench.stats_fast.mlp(jax.random.key(0))
    args = (params, make_batch(jax.random.key(1), 8), jnp.ones(8))
    compiled = bench.compile_variants(loss_fn, args)  # raises on an ineffective patch
    assert set(compiled) == {"plain", "fast+coords", "by hand"} | {
        f"no {name}" for name in bench.PATCHES
    }
    hand = compiled["by hand"](*args)
    fast = compiled["fast+coords"](*args)
    np.testing.assert_allclose(hand[3][1]["w"], fast.sq_sum[1]["w"], rtol=1e-5)
