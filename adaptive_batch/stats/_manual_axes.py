"""Which ``shard_map`` device axes a value varies over, and making values vary alike.

Inside ``shard_map`` every array's type records the manual mesh axes it varies over
(the batch varies over the data axis, a replicated constant over none), and JAX refuses
to combine values whose axes differ. The statistics build values of their own (zeros,
per-example copies) and must type them like the arrays they meet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(x) -> set:
    """The ``shard_map`` axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    manual_axes = getattr(aval, "mat", None)  # the attribute moved across JAX versions
    if manual_axes is not None:
        return set(manual_axes.varying)
    return set(getattr(aval, "vma", ()))


def vary(x, axes: set):
    """``x`` made to vary over ``axes`` too (those it varies over already stay)."""
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(jnp.asarray(x), missing, to="varying") if missing else x


def vary_like(x, reference):
    """``x`` made to vary over the ``shard_map`` axes that ``reference`` varies over."""
    axes = varying_axes(reference)
    return vary(x, axes) if axes else x
