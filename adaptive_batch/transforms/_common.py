"""Machinery shared by the transforms: argument checks, the ``grad_stats`` contract,
the non-finite guard and the batch-size arithmetic of the adaptive sampling tests.

Hyperparameters may arrive as Python numbers or, under ``optax.inject_hyperparams``,
as (possibly traced) JAX arrays. The checks below validate every value that is
concrete and let traced ones through; nothing downstream branches on them in Python.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_batch._limits import MAX_REPRESENTABLE_BATCH
from adaptive_batch.stats import GradStats

PyTree = Any


# --------------------------------------------------------------------- argument checks


def _concrete(value) -> float | None:
    """The Python value of a scalar hyperparameter, or None when it is traced."""
    try:
        array = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if array.shape != ():
        raise ValueError(f"hyperparameters must be scalars, got an array of shape {array.shape}.")
    return array.item()


def check_real(
    owner: str,
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = True,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """A finite real number in the interval (or [ ) low..high; ValueError otherwise."""
    if isinstance(value, str) or callable(value):
        raise TypeError(f"{owner}: {name}={value!r} must be a number. {hint}".rstrip())
    x = _concrete(value)
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TypeError(f"{owner}: {name}={value!r} must be a real number. {hint}".rstrip())
    bad = not math.isfinite(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if bad:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        interval = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise ValueError(
            f"{owner}: {name}={value!r} is outside the allowed range {interval}. {hint}".rstrip()
        )


def check_int(owner: str, name: str, value, *, low: int, high: int, hint: str = "") -> None:
    """An integer in [low, high]; ValueError otherwise."""
    x = _concrete(value)
    if x is None:
        return
    if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, float) and x.is_integer())):
        raise ValueError(
            f"{owner}: {name}={value!r} must be an integer in [{low}, {high}]. {hint}".rstrip()
        )
    if not low <= x <= high:
        raise ValueError(
            f"{owner}: {name}={value!r} is outside the allowed range [{low}, {high}]. "
            f"{hint}".rstrip()
        )


def check_batch_bounds(owner: str, min_batch_size, max_batch_size, initial_batch_size) -> None:
    """1 <= min_batch_size <= initial_batch_size <= max_batch_size <= 2**30."""
    check_int(
        owner,
        "min_batch_size",
        min_batch_size,
        low=1,
        high=MAX_REPRESENTABLE_BATCH,
        hint="Pass the smallest batch size the rule may ask for, e.g. min_batch_size=16.",
    )
    check_int(
        owner,
        "max_batch_size",
        max_batch_size,
        low=1,
        high=MAX_REPRESENTABLE_BATCH,
        hint="Pass the largest batch size the rule may ask for (the cap), e.g. 2048.",
    )
    check_int(
        owner,
        "initial_batch_size",
        initial_batch_size,
        low=1,
        high=MAX_REPRESENTABLE_BATCH,
        hint="Pass the batch size of the first step, or None for min_batch_size.",
    )
    lo, hi, init = (_concrete(v) for v in (min_batch_size, max_batch_size, initial_batch_size))
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"{owner}: min_batch_size={min_batch_size!r} is larger than max_batch_size="
            f"{max_batch_size!r}; the allowed range is min_batch_size <= max_batch_size. "
            "Swap them or raise max_batch_size."
        )
    if init is not None and lo is not None and hi is not None and not lo <= init <= hi:
        raise ValueError(
            f"{owner}: initial_batch_size={initial_batch_size!r} is outside [min_batch_size, "
            f"max_batch_size] = [{min_batch_size}, {max_batch_size}]. Pick a starting batch "
            "size within the bounds, or None to start at min_batch_size."
        )


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{owner}: {name}={value!r} must be True or False.")


# --------------------------------------------------------------------- grad_stats contract


def require_grad_stats(
    owner: str, grad_stats, *, coordinates: bool = False, inner: bool = False
) -> GradStats:
    """The ``grad_stats=`` extra argument, or a TypeError that shows the call to make."""
    options = ", ".join(
        name for name, on in (("coordinates=True", coordinates), ("inner=True", inner)) if on
    )
    build = (
        f"stats_fn = adaptive_batch.per_example_stats(loss_fn{', ' + options if options else ''})"
    )
    call = (
        "    updates, opt_state = tx.update(grads, opt_state, params, "
        "grad_stats=stats_fn(params, batch))"
    )
    if grad_stats is None:
        raise TypeError(
            f"{owner} reads the batch's gradient statistics and needs them as the keyword "
            f"argument grad_stats=. Build {build} once, then call\n{call}\n(optax.chain and "
            "optax.inject_hyperparams pass the keyword through; optax.MultiSteps passes "
            "only its last micro-step's, so use the train step's num_microbatches instead)."
        )
    if not isinstance(grad_stats, GradStats):
        raise TypeError(
            f"{owner}: grad_stats must be an adaptive_batch.GradStats, got "
            f"{type(grad_stats).__name__}. Compute it with {build}."
        )
    if grad_stats.sq_norm_sum is None:
        raise TypeError(
            f"{owner} needs Σ‖gᵢ‖², but grad_stats holds only a plain gradient's sums "
            f"(sq_norm_sum=None). Build the statistics with {build}."
        )
    if coordinates and grad_stats.sq_sum is None:
        raise TypeError(
            f"{owner} needs the per-coordinate sums Σ gᵢ⊙gᵢ, which grad_stats does not hold. "
            f"Build the statistics with {build}."
        )
    if inner and (grad_stats.inner_sum is None or grad_stats.inner_sq_sum is None):
        raise TypeError(
            f"{owner} needs the inner-product sums Σ gᵢ·ḡ and Σ (gᵢ·ḡ)², which grad_stats "
            f"does not hold. Build the statistics with {build}."
        )
    return grad_stats


# --------------------------------------------------------------------- dtypes and guards


def state_dtype(params: PyTree) -> jnp.dtype:
    """Float dtype of running statistics: at least float32, wider if the params are."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        leaf_dtype = jnp.result_type(leaf)
        if jnp.issubdtype(leaf_dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf_dtype)
    return dtype


def stats_are_finite(stats: GradStats) -> jax.Array:
    """True when every number of the statistics is finite (one reduction per field)."""
    scalars = [stats.count, stats.loss_sum, stats.sq_norm_sum, stats.mean_grad_sq_norm]
    if stats.sq_sum is not None:
        scalars += [jnp.sum(leaf) for leaf in jax.tree.leaves(stats.sq_sum)]
    if stats.inner_sum is not None:
        scalars += [stats.inner_sum, stats.inner_sq_sum]
    return jnp.all(jnp.stack([jnp.isfinite(s) for s in scalars]))


def tree_is_finite(tree: PyTree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guarded(new_state, old_state, stats: GradStats):
    """``new_state`` if the statistics and ``new_state`` are finite, else ``old_state``
    with its ``skipped`` counter advanced: nothing non-finite ever enters the state."""
    ok = stats_are_finite(stats) & tree_is_finite(new_state)
    fallback = old_state._replace(skipped=old_state.skipped + 1)
    return jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, fallback)


def safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0 (never NaN)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def clip_batch_size(wanted, min_batch_size, max_batch_size) -> jax.Array:
    """A (possibly huge or inf) float batch size, clipped to the bounds, as int32."""
    clipped = jnp.clip(
        wanted, jnp.asarray(min_batch_size, wanted.dtype), jnp.asarray(max_batch_size, wanted.dtype)
    )
    return clipped.astype(jnp.int32)
