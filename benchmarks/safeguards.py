"""What the fast backend's safeguards cost: the MLP with coordinates with each one
switched off, against a plain gradient and the hand-written statistics, side by side.

The statistics written by hand for the MLP 40-512-512-10 (`stats_fast.coordinates_by_hand`)
ignore three failures that ``per_example_stats(backend="fast")`` guards against:

* ``real_rows``: padding rows are replaced by a real row before the pass
  (`adaptive_batch.stats._vmap.with_real_rows`), so NaN or inf in padding cannot reach
  the sums through 0 × NaN;
* ``all_padding_guard``: a micro-batch without a real row gives zero statistics rather
  than NaN (`adaptive_batch.stats._fast_tap.guarded`);
* ``waiting_cotangent``: each tapped layer's statistics are finished before the
  reverse pass goes on (`adaptive_batch.stats._fast_tap.waiting_cotangents`), which
  keeps compiled memory within issue 7's 1.5x of a plain gradient's.

Each variant compiles ``per_example_stats(loss_fn, backend="fast", coordinates=True)``
with safeguards patched out while it is traced (the package is restored right after),
must compile to a program other than the unpatched one, and must give the same
statistics on the benchmark's batch, which has no padding. Then all are timed in
interleaved rounds with the plain gradient (`_common.interleaved_rounds`); time and
compiled temporary memory are ratios to it.

Usage: ``python benchmarks/safeguards.py [--batch-sizes 64 256] [--budget S]``. The
last line is a JSON object. Results: benchmarks/README.md, "Targets of issue 7, in full".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats_fast
from _common import compiled_temp_bytes, interleaved_rounds, median_ratio, print_table

from adaptive_batch.stats import _fast, _fast_tap, per_example_stats


def _unguarded(rule, records, delta, count, leaf_aval, coordinates):
    """`_fast_tap.guarded` without the zeroing of an all-padding micro-batch."""
    records, delta = jax.tree.map(_fast_tap.widen, (records, delta))
    return rule(records, delta)


def _zero_cotangents(records, stats):
    """`_fast_tap.waiting_cotangents` without the dependency on the statistics."""
    return [
        jnp.zeros(jnp.shape(r), r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else None
        for r in records
    ]


# (module, attribute, replacement): `_fast` imports `guarded` from `_fast_tap`, so both
# modules' names are patched.
PATCHES = {
    "real_rows": [(_fast, "with_real_rows", lambda batch, mask: batch)],
    "all_padding_guard": [(_fast_tap, "guarded", _unguarded), (_fast, "guarded", _unguarded)],
    "waiting_cotangent": [(_fast_tap, "waiting_cotangents", _zero_cotangents)],
}
PATCHES["all_three"] = [p for name in list(PATCHES) for p in PATCHES[name]]


@contextlib.contextmanager
def patched(patches):
    """The package with ``patches`` applied; restored on exit. A missing attribute is an
    error: a renamed function would otherwise make the ablation measure nothing."""
    for module, name, _ in patches:
        if not hasattr(module, name):
            raise AttributeError(
                f"{module.__name__} has no {name!r}: update PATCHES in benchmarks/safeguards.py"
            )
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def compile_variants(loss_fn, args) -> dict:
    """Compiled ``fn(params, batch, mask)`` of every variant, the plain gradient first.

    Raises if a patched variant compiles to the unpatched program or gives other
    statistics on ``args``."""
    plain = jax.jit(jax.value_and_grad(stats_fast.masked_mean_loss(loss_fn)))
    compiled = {"plain": plain.lower(*args).compile()}
    fast = per_example_stats(loss_fn, backend="fast", coordinates=True)
    compiled["fast+coords"] = fast.lower(*args).compile()
    expected = compiled["fast+coords"](*args)
    for name, patches in PATCHES.items():
        with patched(patches):
            # A new function each time: the jit cache must not hand back the unpatched trace.
            fn = per_example_stats(loss_fn, backend="fast", coordinates=True)
            compiled[f"no {name}"] = fn.lower(*args).compile()
        if compiled[f"no {name}"].as_text() == compiled["fast+coords"].as_text():
            raise RuntimeError(f"patching out {name} left the compiled program unchanged")
        got = compiled[f"no {name}"](*args)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    compiled["by hand"] = stats_fast.coordinates_by_hand().lower(*args).compile()
    return compiled


def measure(batch_size: int, budget_s: float) -> dict:
    params, loss_fn, make_batch = stats_fast.mlp(jax.random.key(0))
    args = (params, make_batch(jax.random.key(batch_size), batch_size), jnp.ones(batch_size))
    compiled = compile_variants(loss_fn, args)
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    runs = {name: lambda fn=fn: jax.block_until_ready(fn(*args)) for name, fn in compiled.items()}
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget_s)
    plain_bytes = compiled_temp_bytes(compiled["plain"])
    row = {"B": batch_size, "plain ms": 1e3 * float(np.median(times["plain"]))}
    for name in compiled:
        if name != "plain":
            row[f"{name} x"] = median_ratio(times, name, "plain")
    for name in compiled:
        if name != "plain":
            row[f"mem {name} x"] = compiled_temp_bytes(compiled[name]) / plain_bytes
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of rounds per B")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes {args.batch_sizes}: every batch size must be at least 1")
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be a positive number of seconds")
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(measure(batch_size, args.budget))
        print(f"measured B = {batch_size}", file=sys.stderr, flush=True)
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; MLP 40-512-512-10 with "
        "coordinates; ratios to the plain gradient, measured side by side"
    )
    print_table(rows, list(rows[0]))
    print(json.dumps({"rows": rows}))
    return rows


if __name__ == "__main__":
    main()
