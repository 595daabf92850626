"""Fast statistics of leaves without a layer rule (the fallback), against a plain
gradient and the exact backend, measured side by side.

A leaf that no layer rule covers gets exact per-example gradients inside the fast
backend's one pass (the other leaves keep their rules). Two MLPs 40-512-512-10:

* ``weight-norm``: the middle weight normalised by its column norms before the product
  (w / ‖w‖ per column, a nonlinear function of the leaf), so its 262144 entries fall
  back: B per-example copies of it in memory, like the exact backend;
* ``temperature``: logits times exp(t) for a scalar t, a fallback of one entry.

For each, in this one process: ``fast`` / ``fast+coords`` (``per_example_stats(backend=
"fast")``, norms only / with Σgᵢ⊙gᵢ) interleaved in rounds with ``plain``
(``jax.value_and_grad`` of the masked mean loss, the unit), then interleaved with
``vmap`` / ``vmap+coords`` (the exact backend) as ``fast / vmap``. Time is the median
over rounds of the ratio within a round; memory the compiled temporary buffers, as a
ratio to the plain gradient's.

Usage: ``python benchmarks/fallback.py [--quick] [--batch-sizes 64 256]``. The last
line is a JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_rounds, median_ratio, plain_and_fast, print_table, ratios_to_plain

from adaptive_batch.stats import fast_stats_report, per_example_stats


def make_model(kind: str):
    ks = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(ks[0], (40, 512)) / 40**0.5,
        "w2": jax.random.normal(ks[1], (512, 512)) / 512**0.5,
        "w3": jax.random.normal(ks[2], (512, 10)) / 512**0.5,
        "t": jnp.zeros(()),
    }

    def loss_fn(p, batch):
        w2 = p["w2"]
        if kind == "weight-norm":
            w2 = w2 / jnp.linalg.norm(w2, axis=0, keepdims=True)
        h = jax.nn.relu(jax.nn.relu(batch["x"] @ p["w1"]) @ w2)
        logits = h @ p["w3"]
        if kind == "temperature":
            logits = logits * jnp.exp(p["t"])
        picked = jnp.take_along_axis(logits, batch["y"][:, None], 1)[:, 0]
        return jax.nn.logsumexp(logits, -1) - picked

    if kind != "temperature":
        del params["t"]
    return params, loss_fn


def _call(compiled, call):
    return jax.block_until_ready(compiled(*call))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of rounds per row")
    parser.add_argument("--quick", action="store_true", help="B = 64 only, 2 s per row")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.budget = [64], 2.0
    warnings.filterwarnings("ignore", message="backend='fast': no layer rule")
    rows = []
    for kind in ("weight-norm", "temperature"):
        params, loss_fn = make_model(kind)
        for batch_size in args.batch_sizes:
            k1, k2 = jax.random.split(jax.random.key(batch_size))
            batch = {
                "x": jax.random.normal(k1, (batch_size, 40)),
                "y": jax.random.randint(k2, (batch_size,), 0, 10),
            }
            call = (params, batch, jnp.ones(batch_size))
            fns = plain_and_fast(loss_fn)
            fns["vmap"] = per_example_stats(loss_fn, backend="vmap")
            fns["vmap+coords"] = per_example_stats(loss_fn, backend="vmap", coordinates=True)
            compiled = {name: fn.lower(*call).compile() for name, fn in fns.items()}
            report = fast_stats_report(loss_fn, params, batch)
            fallback = sorted(k for k, rule in report.items() if rule.startswith("fallback"))
            row = {"model": kind, "B": batch_size, "fallback": " ".join(fallback)}
            # Against the plain gradient without vmap in the rounds: its B per-example
            # gradients of every leaf evict the caches, which slowed the plain gradient
            # run after it (the temperature model's statistics looked 0.77x plain).
            fast = {name: compiled[name] for name in ("plain", "fast", "fast+coords")}
            row.update(ratios_to_plain(fast, call, args.budget / 2))
            # fast against vmap, both as heavy where a large leaf falls back.
            runs = {
                name: functools.partial(_call, compiled[name], call)
                for name in ("fast", "vmap", "fast+coords", "vmap+coords")
            }
            times = interleaved_rounds(runs, rounds=10**6, budget_s=args.budget / 2)
            row["fast / vmap"] = median_ratio(times, "fast", "vmap")
            row["fast / vmap coords"] = median_ratio(times, "fast+coords", "vmap+coords")
            plain_bytes = compiled["plain"].memory_analysis().temp_size_in_bytes
            for name in ("vmap", "vmap+coords"):
                vmap_bytes = compiled[name].memory_analysis().temp_size_in_bytes
                row[f"mem {name} x"] = vmap_bytes / plain_bytes
            rows.append(row)
            print(row, flush=True)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
