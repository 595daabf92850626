"""Sums over the leading axis, (Σᵢ xᵢ, Σᵢ xᵢ⊙xᵢ): XLA's reduction against `row_sums`.

Per-example gradients (the ``vmap`` backend, fallback leaves, chunks of per-example
products) and per-step values of a loop are summed over their leading axis. On XLA:CPU
(jax 0.10) a reduction over the leading axis of rows of tens of thousands of entries
runs an order of magnitude slower than adding the rows one at a time; `row_sums`
(`adaptive_batch/stats/_row_sums.py`) adds them in a loop there, or as a product with a
row of ones when squares are not needed.

Part 1 times, on random arrays of (rows, row size):

* ``jnp.sum``: ``jnp.sum(x, 0)`` and ``jnp.sum(x * x, 0)``, what the code did before;
* ``row_sums``: the same two sums by `row_sums`;
* ``sum only``: ``jnp.sum(x, 0)`` against ``row_sums(x, squares=False)``.

Part 2 times the exact ``vmap`` backend on the benchmark MLP 40-512-512-10, where the
per-example gradients of the 512×512 weight are rows of 262144 entries, against the same
backend with ``jnp.sum`` for its sums (`vmap_sums_by_reduction`), and a plain gradient.

All timings are medians over rounds that run every function once (`interleaved_rounds`).

Usage: ``python benchmarks/row_sums.py [--quick]``. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_rounds, print_table
from stats_fast import masked_mean_loss, mlp

from adaptive_batch.stats import per_example_stats
from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._row_sums import row_sums
from adaptive_batch.stats._vmap import masked

# (rows, row size): a bias's per-example gradients, the two sides of XLA:CPU's cliff
# (`_row_sums._WIDEST_REDUCED_ROW`), per-step signals of the LSTM and Elman RNN of
# benchmarks/scan.py (T = 16 steps of B·N entries), chunks and batches of per-example
# gradients of a 512×512 weight.
SHAPES = [
    (256, 512),
    (256, 16384),
    (256, 16640),
    (16, 256 * 128),
    (16, 256 * 256),
    (8, 512 * 512),
    (64, 512 * 512),
    (256, 512 * 512),
]
QUICK_SHAPES = [(256, 512), (16, 256 * 128)]


def shape_row(rows, size, budget_s):
    x = jax.random.normal(jax.random.key(rows + size), (rows, size))
    fns = {
        "jnp.sum": jax.jit(lambda x: (jnp.sum(x, 0), jnp.sum(x * x, 0))),
        "row_sums": jax.jit(row_sums),
        "jnp.sum, sum only": jax.jit(lambda x: jnp.sum(x, 0)),
        "row_sums, sum only": jax.jit(lambda x: row_sums(x, squares=False)[0]),
    }
    reference = fns["jnp.sum"](x)
    for result in (fns["row_sums"](x), (fns["row_sums, sum only"](x), reference[1])):
        for got, want in zip(result, reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    runs = {name: lambda f=f: jax.block_until_ready(f(x)) for name, f in fns.items()}
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget_s)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return {
        "rows": rows,
        "row size": size,
        "MB": x.nbytes / 2**20,
        **{f"{name} ms": value for name, value in ms.items()},
        "jnp.sum / row_sums": ms["jnp.sum"] / ms["row_sums"],
        "sum only: jnp.sum / row_sums": ms["jnp.sum, sum only"] / ms["row_sums, sum only"],
    }


def vmap_sums_by_reduction(loss_fn):
    """The ``vmap`` backend's sums with ``jnp.sum`` over the batch axis (as before)."""

    def stats_fn(params, batch, mask):
        def example_loss(p, example):
            return loss_fn(p, jax.tree.map(lambda x: x[None], example))[0]

        losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0))(params, batch)
        grads = jax.tree.map(lambda g: masked(g, mask), grads)
        sq_sum = jax.tree.map(lambda g: jnp.sum(jnp.square(g), 0), grads)
        return GradStats(
            count=jnp.sum(mask, dtype=jnp.float32),
            loss_sum=jnp.sum(masked(losses, mask)),
            grad_sum=jax.tree.map(lambda g: jnp.sum(g, 0), grads),
            sq_norm_sum=sum(jnp.sum(s) for s in jax.tree.leaves(sq_sum)),
            sq_sum=sq_sum,
        )

    return jax.jit(stats_fn)


def vmap_row(batch_size, budget_s):
    params, loss_fn, make_batch = mlp(jax.random.key(0))
    args = (params, make_batch(jax.random.key(1), batch_size), jnp.ones(batch_size, bool))
    fns = {
        "plain": jax.jit(jax.value_and_grad(masked_mean_loss(loss_fn))),
        "vmap, jnp.sum": vmap_sums_by_reduction(loss_fn),
        "vmap, row_sums": per_example_stats(loss_fn, backend="vmap", coordinates=True),
    }
    new, old = fns["vmap, row_sums"](*args), fns["vmap, jnp.sum"](*args)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    runs = {name: lambda f=f: jax.block_until_ready(f(*args)) for name, f in fns.items()}
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget_s)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return {
        "B": batch_size,
        **{f"{name} ms": value for name, value in ms.items()},
        "jnp.sum / row_sums": ms["vmap, jnp.sum"] / ms["vmap, row_sums"],
        "row_sums / plain": ms["vmap, row_sums"] / ms["plain"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, B = 16, short rounds")
    args = parser.parse_args()
    shapes, batches, budget = (QUICK_SHAPES, [16], 0.5) if args.quick else (SHAPES, [64, 256], 4.0)
    sums = []
    for rows, size in shapes:
        sums.append(shape_row(rows, size, budget))
        print(f"measured {rows} x {size}", file=sys.stderr, flush=True)
    print(f"jax {jax.__version__} on {jax.default_backend()}; sums over the leading axis (ms)")
    print_table(sums, list(sums[0]))
    vmap = []
    for batch_size in batches:
        vmap.append(vmap_row(batch_size, 2 * budget))
        print(f"measured vmap backend at B = {batch_size}", file=sys.stderr, flush=True)
    print("\nvmap backend with coordinates, MLP 40-512-512-10 (ms)")
    print_table(vmap, list(vmap[0]))
    print(json.dumps({"sums": sums, "vmap": vmap}))


if __name__ == "__main__":
    main()
