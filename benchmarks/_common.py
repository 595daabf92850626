"""Timing and memory helpers shared by the benchmark scripts.

Timings are medians over repeats of an already compiled function, so compile time is
excluded; memory is the compiled executable's temporary buffer size from XLA's own
`memory_analysis()`. Ratios are measured side by side in one process, which is what
matters on a noisy machine.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_batch.stats import per_example_stats


def median_seconds(fn, *args, repeats: int = 5, min_total: float = 0.0) -> float:
    """Median wall time of ``fn(*args)`` (compiled first, results blocked on)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    while len(times) < repeats or sum(times) < min_total:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_rounds(runs: dict, rounds: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each function in ``runs`` (no arguments, blocking), in rounds
    that run every function once, back to back: load from other processes on a shared
    machine then hits all of them alike. At least 3 rounds, at most ``rounds``, and no
    new round after ``budget_s`` seconds."""
    times = {name: [] for name in runs}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median_ratio(times: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of the time ratio within a round (see `interleaved_rounds`)."""
    return float(np.median(np.asarray(times[numerator]) / np.asarray(times[denominator])))


def plain_and_fast(loss_fn) -> dict:
    """Functions of ``(params, batch, mask)`` to compare: ``plain``, the value and
    gradient of the masked mean loss (the unit), and ``fast`` / ``fast+coords``, the
    fast statistics, norms only / with Σgᵢ⊙gᵢ."""

    def mean_loss(params, batch, mask):
        return jnp.sum(mask * loss_fn(params, batch)) / jnp.sum(mask)

    return {
        "plain": jax.jit(jax.value_and_grad(mean_loss)),
        "fast": per_example_stats(loss_fn, backend="fast"),
        "fast+coords": per_example_stats(loss_fn, backend="fast", coordinates=True),
    }


def ratios_to_plain(compiled: dict, args, budget_s: float) -> dict:
    """Time and temporary-memory ratios of compiled functions to ``compiled["plain"]``.

    Every function is called once, then all are timed in `interleaved_rounds`. Returns
    ``{"plain ms", "<name> x" (median ratio), "mem <name> x" (temporary buffers)}``.
    """
    memory = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    for c in compiled.values():
        jax.block_until_ready(c(*args))
    runs = {name: lambda c=c: jax.block_until_ready(c(*args)) for name, c in compiled.items()}
    times = interleaved_rounds(runs, rounds=10**6, budget_s=budget_s)
    others = [name for name in compiled if name != "plain"]
    row = {"plain ms": 1e3 * float(np.median(times["plain"]))}
    row.update({f"{name} x": median_ratio(times, name, "plain") for name in others})
    row.update({f"mem {name} x": memory[name] / memory["plain"] for name in others})
    return row


def temp_bytes(fn, *args) -> int:
    """Temporary memory XLA allocates for one call of ``jax.jit(fn)(*args)``."""
    return compiled_temp_bytes(jax.jit(fn).lower(*args).compile())


def compiled_temp_bytes(compiled) -> int:
    """Temporary memory XLA allocates for one call of a compiled function."""
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
