"""Throughput of the adaptive training loop against fixed-batch loops at the same sizes.

An MLP is trained on a synthetic classification task with the norm test choosing the
batch size (``optax.chain(ab.norm_test(eta), optax.sgd(lr))``) through `ab.fit`
(default controller with ``lag=1``; fit's default loader, which prefetches on a thread
for accelerators and not on the CPU backend). Its sequence of batch sizes is then
replayed by a plain fixed-batch loop — one jitted step per batch size, exactly that
size, each batch gathered from NumPy arrays through a per-epoch permutation — for the
same steps. Both use the same statistics and optimizer, so the ratio of real examples
per second measures what the adaptive machinery costs: padding up to the bucket, the
controller, the loader and the one host read per step.

Every shape is compiled before timing; the runs are interleaved (adaptive, fixed,
fixed at padded sizes) and ratios are medians over the repeats. Reported:

* ``throughput_ratio`` — the default controller (pow2 buckets, ``fill_buckets=True``:
  each batch takes as many real examples as its bucket holds) / the fixed loop at the
  same sizes, real examples per second. Target >= 0.9.
* ``padded_ratio`` — pow2 buckets with ``fill_buckets=False`` (the rule's exact sizes,
  the rest of the bucket masked padding) / the fixed loop at the exact sizes: padding
  counts as lost work.
* ``overhead_ratio`` — the same padded run against the fixed loop at the *padded*
  sizes: the loop's own overhead, without the padding.
* ``fine_buckets_ratio`` — exact sizes with buckets spaced by 2^(1/4) (padding under
  19%, more compiles).
* ``prefetch_thread_ratio`` — the default controller with ``fit(prefetch=2)``: a
  background thread builds the batches (fit's default on accelerators, not on CPU).
* ``checkpoint_ratio`` — the padded pow2 run (several hundred steps) saving an Orbax
  checkpoint every 100 steps (and after the last), timed around the whole `fit` call
  (checkpoints included, which ``wall_time`` leaves out) / the same run without
  checkpoints; ``checkpoint_seconds`` the cost per checkpoint.
* ``guard_ratio`` — the fixed loop with steps that skip non-finite updates (the
  default, ``skip_nonfinite=True``: finiteness checks and a select of the state) /
  the same loop with ``skip_nonfinite=False``, examples per second.
* ``compiles`` — train-step compiles (JAX's monitoring events) of the first run of
  each configuration, and of exact sizes without buckets (the fixed loop: one per
  distinct size), with the wall time of each first, compiling, run.

    python benchmarks/loop.py            # 100 000 examples a run, batch 32 → 2048
    python benchmarks/loop.py --quick    # 40 000 examples a run, batch 32 → 1024

Last line: a JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table

import adaptive_batch as ab


def make_task(n, features, classes, seed=0):
    """Labels from a random teacher network plus 10% label noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    teacher = rng.normal(size=(features, classes))
    y = np.argmax(np.tanh(x @ teacher) + 0.3 * rng.normal(size=(n, classes)), axis=1)
    noisy = rng.random(n) < 0.1
    y[noisy] = rng.integers(0, classes, noisy.sum())
    return {"x": x, "y": y.astype(np.int32)}


def make_model(features, hidden, classes, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w1": jax.random.normal(k1, (features, hidden)) / math.sqrt(features),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, classes)) / math.sqrt(hidden),
        "b2": jnp.zeros(classes),
    }

    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return params, loss_fn


def fine_buckets(lo, hi, per_octave=4):
    sizes = {hi}
    k = 0
    while (size := math.ceil(lo * 2 ** (k / per_octave))) < hi:
        sizes.add(size)
        k += 1
    return sorted(sizes)


def adaptive_run(args, step, source, buckets, *, params, tx, fill, prefetch=None, every=None):
    """`fit`'s result, with ``elapsed``: seconds of the whole call (``every``: save a
    checkpoint every so many steps, into a new directory)."""
    controller = ab.BatchSizeController(
        args.min_batch, args.max_batch, buckets=buckets, lag=1, fill_buckets=fill
    )
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        result = ab.fit(
            step, (params, tx.init(params)), source, controller,
            examples=args.budget, progress=False, log_every=50, prefetch=prefetch,
            checkpoint_dir=directory if every else None, checkpoint_every=every,
        )  # fmt: skip
        result.elapsed = time.perf_counter() - start
    return result


def fixed_loop(step, sizes, source, tx, params):
    """Seconds of a plain shuffled loop taking ``sizes[i]`` examples at step i, with
    one jitted step per size and each batch gathered through the epoch's permutation
    (what a fixed-batch input pipeline does)."""
    n = len(source["y"])
    x, y = source["x"], source["y"]
    p, s = params, tx.init(params)
    rng = np.random.default_rng(0)
    order, position = rng.permutation(n), 0
    start = time.perf_counter()
    for size in sizes:
        if position + size > n:  # next epoch (the tail of this one is skipped)
            order, position = rng.permutation(n), 0
        rows = order[position : position + size]
        p, s, _ = step(p, s, {"x": x[rows], "y": y[rows]})
        position += size
    jax.block_until_ready(p)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.eta, args.lr, args.min_batch = 1.0, 0.5, 32
    # Each run trains on the same number of examples (``budget``).
    if args.quick:
        args.examples, args.features, args.hidden = 8192, 64, 512
        args.max_batch, args.budget, repeats = 1024, 40_000, 15
    else:
        args.examples, args.features, args.hidden = 20000, 64, 512
        args.max_batch, args.budget, repeats = 2048, 100_000, 21
    classes = 10
    source = make_task(args.examples, args.features, classes)
    params, loss_fn = make_model(args.features, args.hidden, classes)
    tx = optax.chain(
        ab.norm_test(args.eta, min_batch_size=args.min_batch, max_batch_size=args.max_batch),
        optax.sgd(args.lr),
    )

    rows, overhead = [], None
    configs = (
        ("pow2 filled (default)", "pow2", True, None),
        ("pow2 padded", "pow2", False, None),
        ("fine padded", fine_buckets(args.min_batch, args.max_batch), False, None),
        ("pow2 filled, prefetch=2", "pow2", True, 2),
    )
    for name, buckets, fill, prefetch in configs:
        run_kwargs = {"params": params, "tx": tx, "fill": fill, "prefetch": prefetch}
        step = ab.make_train_step(loss_fn, tx)
        # The fixed loop's step compiles once per distinct size, which is also what an
        # adaptive loop without buckets (exact sizes) compiles.
        fixed_step = ab.make_train_step(loss_fn, tx)
        first = adaptive_run(args, step, source, buckets, **run_kwargs)
        sizes = first.history.column("batch_size")
        padded = first.history.column("padded_size")
        with ab.training.CompileCounter() as counter:
            first_fixed = fixed_loop(fixed_step, sizes, source, tx, params)  # compiles
        if name == "pow2 padded":
            fixed_loop(fixed_step, padded, source, tx, params)  # compiles the padded sizes
        # Interleaved repeats, so that a change in the machine's load hits both loops.
        adaptive, fixed, at_padded = [], [], []
        for _ in range(repeats):
            run = adaptive_run(args, step, source, buckets, **run_kwargs)
            assert run.history.column("batch_size") == sizes and run.compiles == 0
            adaptive.append(run.wall_time)
            fixed.append(fixed_loop(fixed_step, sizes, source, tx, params))
            if name == "pow2 padded":
                at_padded.append(fixed_loop(fixed_step, padded, source, tx, params))
        ratio = statistics.median(f / a for f, a in zip(fixed, adaptive, strict=True))
        if name == "pow2 padded":
            exact = {
                "buckets": "exact (fixed loop)",
                "steps": first.steps,
                "examples": first.examples,
                "distinct sizes": len(set(sizes)),
                "compiles": counter.count(fixed_step.name),
                "padding": 0.0,
                "first run s": first_fixed,
                "adaptive s": None,
                "fixed loop s": statistics.median(fixed),
                "ratio": None,
            }
            overhead = statistics.median(f / a for f, a in zip(at_padded, adaptive, strict=True))
            trajectory = sizes
        rows.append(
            {
                "buckets": name,
                "steps": first.steps,
                "examples": first.examples,
                "distinct sizes": len(set(sizes)),
                "compiles": first.compiles,
                "padding": sum(padded) / sum(sizes) - 1,
                "first run s": first.wall_time,
                "adaptive s": statistics.median(adaptive),
                "fixed loop s": statistics.median(fixed),
                "ratio": ratio,
            }
        )
    rows.append(exact)
    print_table(rows, list(rows[0]))
    checkpoint_ratio, checkpoint_seconds, checkpoints = checkpoint_cost(
        args, source, params, loss_fn, tx, repeats
    )
    guard = guard_cost(source, params, loss_fn, tx, trajectory, repeats)
    print(
        f"\ncheckpoint every 100 steps: {checkpoints} checkpoints, whole fit call "
        f"{checkpoint_ratio:.3f}x the time without ({checkpoint_seconds * 1e3:.0f} ms each)"
    )
    print(f"steps that skip non-finite updates / raw steps, examples/s: {guard:.3f}")
    print(
        "\npow2 padded against a fixed loop at the padded sizes (loop overhead alone): "
        f"{overhead:.3f}"
    )
    print("exact batch sizes (pow2 padded run) every 25 steps:", trajectory[::25])

    summary = {
        "throughput_ratio": round(rows[0]["ratio"], 3),
        "padded_ratio": round(rows[1]["ratio"], 3),
        "overhead_ratio": round(overhead, 3),
        "fine_buckets_ratio": round(rows[2]["ratio"], 3),
        "prefetch_thread_ratio": round(rows[3]["ratio"], 3),
        "checkpoint_ratio": round(checkpoint_ratio, 3),
        "checkpoint_seconds": round(checkpoint_seconds, 4),
        "guard_ratio": round(guard, 3),
        "compiles": {"pow2_filled": rows[0]["compiles"], "pow2_padded": rows[1]["compiles"],
                     "fine_padded": rows[2]["compiles"], "exact": exact["compiles"]},
        "distinct_batch_sizes": rows[0]["distinct sizes"],
        "distinct_batch_sizes_padded": rows[1]["distinct sizes"],
        "first_run_seconds": {"pow2_filled": round(rows[0]["first run s"], 2),
                              "pow2_padded": round(rows[1]["first run s"], 2),
                              "fine_padded": round(rows[2]["first run s"], 2),
                              "exact": round(exact["first run s"], 2)},
        "padding_fraction": {"pow2_filled": round(rows[0]["padding"], 3),
                             "pow2_padded": round(rows[1]["padding"], 3),
                             "fine_padded": round(rows[2]["padding"], 3)},
        "steps": rows[0]["steps"],
        "quick": args.quick,
    }  # fmt: skip
    print(json.dumps(summary))


def checkpoint_cost(args, source, params, loss_fn, tx, repeats):
    """(whole-call time with a checkpoint every 100 steps / without, seconds per
    checkpoint, checkpoints per run), medians over interleaved repeats."""
    step = ab.make_train_step(loss_fn, tx)
    # The rule's exact sizes (padded): several hundred steps, so several checkpoints.
    kwargs = {"params": params, "tx": tx, "fill": False}
    adaptive_run(args, step, source, "pow2", **kwargs)  # compiles
    plain, saving, steps = [], [], 0
    for _ in range(max(3, repeats // 3)):
        plain.append(adaptive_run(args, step, source, "pow2", **kwargs).elapsed)
        run = adaptive_run(args, step, source, "pow2", every=100, **kwargs)
        saving.append(run.elapsed)
        steps = run.steps
    count = steps // 100 + (steps % 100 != 0)
    ratio = statistics.median(s / p for s, p in zip(saving, plain, strict=True))
    return ratio, (statistics.median(saving) - statistics.median(plain)) / count, count


def guard_cost(source, params, loss_fn, tx, sizes, repeats):
    """Examples/s of a fixed loop whose step skips non-finite updates (the default) /
    one whose step does not, medians over interleaved repeats."""
    guarded = ab.make_train_step(loss_fn, tx)
    raw = ab.make_train_step(loss_fn, tx, skip_nonfinite=False)
    for step in (guarded, raw):
        fixed_loop(step, sizes, source, tx, params)  # compiles
    ratios = []
    for _ in range(repeats):
        with_guard = fixed_loop(guarded, sizes, source, tx, params)
        ratios.append(fixed_loop(raw, sizes, source, tx, params) / with_guard)
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
