"""Per-example products gᵢ = aᵢᵀδᵢ of a dense weight shared over positions: one example
at a time against chunks of examples, and a wide CNN whose products stay batched.

The ``dense-products`` rule of the fast backend (a weight shared over P positions, with
coordinates; recurrent weights over their steps) needs every example's gᵢ. On XLA:CPU it
takes them one example at a time, a plain (K×P)·(P×N) matrix product per iteration of a
loop, for weights of 64·64 entries or more (`_fast_rules._BY_EXAMPLE_MIN_SIZE`), and
elsewhere the batched product of a chunk of examples. Part 1 times both ways of
computing (Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ) on random inputs and signals of several shapes, with
the summed product aᵀδ (what a plain gradient computes for that weight) as the unit.

The convolution rule's per-example products have the same batched form but were left
batched: part 2 times the fast statistics of a CNN of 64 and 128 channels on 32×32×3
images against its plain gradient, whose own convolutions are slow on XLA:CPU.

All timings are medians over rounds that run every function once (`interleaved_rounds`).

Usage: ``python benchmarks/products.py [--quick]``. The last line is a JSON object.
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
from _common import interleaved_rounds, plain_and_fast, print_table, ratios_to_plain
from stats_fast import cnn

from adaptive_batch.stats import _fast_rules

# (B, P, K, N): the rule's threshold neighbourhood, the recurrent weight of
# benchmarks/scan.py (P = T = 16 steps, 256 × 256) and wider layers.
SHAPES = [
    (256, 16, 16, 16),
    (256, 16, 64, 64),
    (256, 16, 128, 128),
    (256, 32, 64, 256),
    (64, 16, 256, 256),
    (256, 16, 256, 256),
    (64, 16, 512, 512),
]
QUICK_SHAPES = [(64, 16, 16, 16), (64, 16, 256, 256)]
WIDE_CNN = [(3, 64, 1), (64, 64, 1), (64, 128, 2)]  # (in, out, stride), 3×3 kernels


def product_row(batch, positions, k, n, budget_s):
    """ms of (Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ) example by example and by chunks, and of aᵀδ."""
    ka, kd = jax.random.split(jax.random.key(batch * positions + k))
    a = jax.random.normal(ka, (batch, 1, positions, k))  # (B, H, P, K), one head
    d = jax.random.normal(kd, (batch, 1, positions, n))
    budget = 2 * max(a.size + d.size, positions * positions)  # as `_dense_products`

    def by_chunks(a, d):
        def products(a, d):
            return _fast_rules._grouped_products("bhpk,bhpn->bhkn", a, d)

        return _fast_rules.chunked_sums(products, (a, d), budget, True)

    fns = {
        "by example": jax.jit(
            lambda a, d: _fast_rules._dense_products_by_example(a, d, coordinates=True)
        ),
        "by chunks": jax.jit(by_chunks),
        "summed aTd": jax.jit(lambda a, d: jnp.einsum("bhpk,bhpn->kn", a, d)),
    }
    one, two = fns["by example"](a, d), fns["by chunks"](a, d)
    for x, y in zip(one, two, strict=True):  # the two ways must agree
        np.testing.assert_allclose(np.ravel(x), np.ravel(y), rtol=1e-4, atol=1e-3)
    runs = {name: lambda f=f: jax.block_until_ready(f(a, d)) for name, f in fns.items()}
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget_s)
    row = {"B": batch, "P": positions, "K": k, "N": n}
    row.update({f"{name} ms": 1e3 * float(np.median(t)) for name, t in times.items()})
    row["chunks / example"] = row["by chunks ms"] / row["by example ms"]
    row["rule on CPU"] = "by example" if k * n >= _fast_rules._BY_EXAMPLE_MIN_SIZE else "chunks"
    return row


def cnn_row(batch, budget_s):
    """The wide CNN: fast statistics (norms, coordinates) / plain gradient."""
    params, loss_fn, make_batch = cnn(jax.random.key(0), WIDE_CNN, image_size=32)
    args = (params, make_batch(jax.random.key(batch), batch), jnp.ones(batch))
    compiled = {name: fn.lower(*args).compile() for name, fn in plain_and_fast(loss_fn).items()}
    return {"B": batch, **ratios_to_plain(compiled, args, budget_s)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, B = 8 CNN, short rounds")
    args = parser.parse_args()
    shapes, cnn_batches, budget = (
        (QUICK_SHAPES, [8], 1.0) if args.quick else (SHAPES, [32, 128], 8.0)
    )
    products = []
    for shape in shapes:
        products.append(product_row(*shape, budget_s=budget))
        print(f"measured products {shape}", file=sys.stderr, flush=True)
    print(f"jax {jax.__version__} on {jax.default_backend()}; per-example products with")
    print("coordinates, example by example vs chunks of examples (ms, medians of rounds)")
    print_table(products, list(products[0]))
    cnn = []
    for batch in cnn_batches:
        cnn.append(cnn_row(batch, budget_s=2 * budget))
        print(f"measured CNN at B = {batch}", file=sys.stderr, flush=True)
    print("\nCNN 3->64->64->128 channels, 32x32x3: fast statistics / plain gradient")
    print_table(cnn, list(cnn[0]))
    print(json.dumps({"products": products, "cnn": cnn}))


if __name__ == "__main__":
    main()
