"""Statistics of a plain gradient, for transforms that take no ``grad_stats``.

``optax.adam`` and the other plain Optax transforms need only the mean gradient, so a
train step built for them computes

    b = Σᵢ mᵢ,   Σᵢ mᵢ ℓᵢ,   Σᵢ mᵢ ∇ℓᵢ = ∇(Σᵢ mᵢ ℓᵢ)

with one ``jax.value_and_grad`` of the masked summed loss: the cost of a plain
training step, no per-example work. The result is a `GradStats` without
``sq_norm_sum`` (None), so any variance read from it fails loudly instead of being
wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adaptive_batch.stats import GradStats

PyTree = Any


def plain_stats_fn(loss_fn: Callable[[PyTree, PyTree], jax.Array]):
    """``stats_fn(params, batch, mask) -> GradStats`` from one gradient of Σ mᵢ ℓᵢ."""

    def stats_fn(params, batch, mask):
        mask = jnp.asarray(mask) != 0
        # Padding rows become copies of a real row: every value in them is finite, and
        # their zero weight then gives them exactly zero gradient (a NaN in a padding
        # row would otherwise reach the gradient as 0 × NaN in the backward pass).
        first_real = jnp.argmax(mask)
        batch = jax.tree.map(lambda x: jnp.where(_rows(mask, x), x, x[first_real]), batch)

        def masked_total(p):
            losses = loss_fn(p, batch)
            weights = mask.astype(jnp.promote_types(losses.dtype, jnp.float32))
            return jnp.sum(weights * losses)

        loss_sum, grad_sum = jax.value_and_grad(masked_total)(params)
        count = jnp.sum(mask, dtype=jnp.float32)
        # An all-padding chunk has no real row to stand in: its sums are zero by definition.
        real = count > 0
        loss_sum = jnp.where(real, loss_sum, 0)
        grad_sum = jax.tree.map(lambda g: jnp.where(real, g, 0), grad_sum)
        return GradStats(count=count, loss_sum=loss_sum, grad_sum=grad_sum, sq_norm_sum=None)

    return stats_fn


def _rows(mask, x):
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(x) - 1))
