"""Fast statistics of leaves without a layer rule (the fallback), against a plain
gradient and the exact backend, measured side by side.

A leaf that no layer rule covers gets exact per-example gradients (the other leaves
keep their rules): a leaf of up to `_fast._LARGEST_COPIED_LEAF` entries from one copy
per example inside the fast pass, a larger one from an exact pass of its own
(`_fast._exact_pass`). Six models, each a fallback leaf next to dense layers:

* ``weight-norm W``: MLP 40-W-W-10 whose middle weight is normalised by its column
  norms before the product (w / ‖w‖ per column, nonlinear in the leaf), W = 512 and 128
  (an exact pass) and 32 (1024 entries, the bound: copies);
* ``scale W``: MLP 40-W-10 whose hidden features are scaled by exp(s), s a vector of
  W = 4096 (an exact pass) or 1024 (copies) entries, a leaf that meets the batch
  elementwise;
* ``temperature``: MLP 40-512-512-10 whose logits are scaled by exp(t), t a scalar.

For each, in this one process: ``fast`` / ``fast+coords`` (``per_example_stats(backend=
"fast")``, norms only / with Σgᵢ⊙gᵢ) and ``other`` / ``other+coords`` (the same with
the bound moved so that the leaf takes the other way: copies where it takes the pass,
the pass where it takes copies) interleaved in rounds with ``plain``
(``jax.value_and_grad`` of the masked mean loss, the unit); then ``fast`` interleaved
with ``vmap`` / ``vmap+coords`` (the exact backend) as ``fast / vmap``, apart, as vmap's
per-example gradients of every leaf evict the caches and slowed the plain gradient run
after them. Time is the median over rounds of the ratio within a round; memory the
compiled temporary buffers, as a ratio to the plain gradient's.

Temporaries of tens of MB: glibc may hand them back to the system after each call and
fault their pages in again on the next (see the recurrent weights in
docs/fast_backend.md), which can dominate these times. To compare the computations
alone, run with ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296``.

Usage: ``python benchmarks/fallback.py [--quick] [--batch-sizes 64 256]``. The last
line is a JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_rounds, median_ratio, plain_and_fast, print_table, ratios_to_plain

import adaptive_batch.stats._fast as fast_module
from adaptive_batch.stats import fast_stats_report, per_example_stats

MODELS = (
    ("weight-norm", 512),
    ("weight-norm", 128),
    ("weight-norm", 32),
    ("scale", 4096),
    ("scale", 1024),
    ("temperature", 512),
)


def make_model(kind: str, width: int):
    """``(params, loss_fn)`` of one of `MODELS`."""
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(ks[0], (40, width)) / 40**0.5}
    if kind != "scale":
        params["w2"] = jax.random.normal(ks[1], (width, width)) / width**0.5
    params["w3"] = jax.random.normal(ks[2], (width, 10)) / width**0.5
    if kind == "scale":
        params["s"] = jnp.zeros(width)
    if kind == "temperature":
        params["t"] = jnp.zeros(())

    def loss_fn(p, batch):
        h = jax.nn.relu(batch["x"] @ p["w1"])
        if kind == "scale":
            h = h * jnp.exp(p["s"])
        else:
            w2 = p["w2"]
            if kind == "weight-norm":
                w2 = w2 / jnp.linalg.norm(w2, axis=0, keepdims=True)
            h = jax.nn.relu(h @ w2)
        logits = h @ p["w3"]
        if kind == "temperature":
            logits = logits * jnp.exp(p["t"])
        picked = jnp.take_along_axis(logits, batch["y"][:, None], 1)[:, 0]
        return jax.nn.logsumexp(logits, -1) - picked

    return params, loss_fn


@contextlib.contextmanager
def largest_copied_leaf(bound):
    """`_fast._LARGEST_COPIED_LEAF` set to ``bound`` while tracing."""
    default = fast_module._LARGEST_COPIED_LEAF
    fast_module._LARGEST_COPIED_LEAF = bound
    try:
        yield
    finally:
        fast_module._LARGEST_COPIED_LEAF = default


def _call(compiled, call):
    return jax.block_until_ready(compiled(*call))


def measure(kind: str, width: int, batch_size: int, budget: float) -> dict:
    params, loss_fn = make_model(kind, width)
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
    fallback = [k for k, rule in report.items() if rule.startswith("fallback")]
    size = sum(jnp.size(v) for k, v in params.items() if f"['{k}']" in fallback)
    copied = size <= fast_module._LARGEST_COPIED_LEAF
    with largest_copied_leaf(0 if copied else float("inf")):
        for coordinates, name in ((False, "other"), (True, "other+coords")):
            fn = per_example_stats(loss_fn, backend="fast", coordinates=coordinates)
            compiled[name] = fn.lower(*call).compile()
    row = {"model": f"{kind} {width}", "B": batch_size, "fallback": size}
    row["way"] = "copies" if copied else "pass"
    ours = ("plain", "fast", "fast+coords", "other", "other+coords")
    row.update(ratios_to_plain({n: compiled[n] for n in ours}, call, budget / 2))
    runs = {
        name: functools.partial(_call, compiled[name], call)
        for name in ("fast", "vmap", "fast+coords", "vmap+coords")
    }
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget / 2)
    row["fast / vmap"] = median_ratio(times, "fast", "vmap")
    row["fast / vmap coords"] = median_ratio(times, "fast+coords", "vmap+coords")
    plain_bytes = compiled["plain"].memory_analysis().temp_size_in_bytes
    for name in ("vmap", "vmap+coords"):
        row[f"mem {name} x"] = compiled[name].memory_analysis().temp_size_in_bytes / plain_bytes
    return row


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
    for kind, width in MODELS:
        for batch_size in args.batch_sizes:
            rows.append(measure(kind, width, batch_size, args.budget))
            print(rows[-1], flush=True)
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
