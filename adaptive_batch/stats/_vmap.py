"""The exact ``"vmap"`` backend: per-example gradients from ``jax.vmap(jax.grad(...))``.

Memory is (rows in the chunk) × (number of parameters): `per_example_stats` bounds it
with ``microbatch_size``. The sums are accumulated in at least float32 whatever the
parameter dtype, so bfloat16 models do not lose their statistics to round-off.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._row_sums import row_sums

PyTree = Any


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype sums are kept in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Zero the rows where mask is False, in the accumulation dtype.

    ``where`` rather than a product, so a NaN or inf in a padding row cannot leak.
    """
    values = values.astype(accumulation_dtype(values.dtype))
    row_mask = mask.reshape(mask.shape + (1,) * (values.ndim - 1))
    return jnp.where(row_mask, values, 0)


def vmap_sums(loss_fn, params: PyTree, batch: PyTree, mask: jax.Array, *, coordinates: bool):
    """GradStats (without inner-product sums) of one chunk, from per-example gradients."""

    def example_loss(p, example):
        batch_of_one = jax.tree.map(lambda x: x[None], example)
        return loss_fn(p, batch_of_one)[0]

    losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0))(params, batch)
    if not coordinates:
        # Whole reductions: they fuse the mask into the squares, where the row loop of
        # `row_sums` made XLA:CPU lay out a second copy of the per-example gradients for
        # it (MLP 40-512-512-10 at B = 64: 64.5 MB -> 131 MB of temporary memory).
        grads = jax.tree.map(lambda g: masked(g, mask), grads)
        sq_norms = [
            jnp.sum(jnp.square(g).reshape(g.shape[0], -1), 1) for g in jax.tree.leaves(grads)
        ]
        return GradStats(
            count=jnp.sum(mask, dtype=jnp.float32),
            loss_sum=jnp.sum(masked(losses, mask)),
            grad_sum=jax.tree.map(lambda g: jnp.sum(g, 0), grads),
            sq_norm_sum=jnp.sum(sum(sq_norms, jnp.zeros(()))),
            sq_sum=None,
        )
    # Σᵢ gᵢ and Σᵢ gᵢ⊙gᵢ by `row_sums`: XLA:CPU's own sums over the batch axis of wide
    # per-example gradients took 3/4 of this backend's time (`benchmarks/row_sums.py`).
    sums = jax.tree.map(lambda g: row_sums(g, mask=mask), grads)
    grad_sum = jax.tree.map(lambda _, s: s[0], grads, sums)
    sq_sum = jax.tree.map(lambda _, s: s[1], grads, sums)
    return GradStats(
        count=jnp.sum(mask, dtype=jnp.float32),
        loss_sum=jnp.sum(masked(losses, mask)),
        grad_sum=grad_sum,
        sq_norm_sum=sum((jnp.sum(s) for s in jax.tree.leaves(sq_sum)), jnp.zeros(())),
        sq_sum=sq_sum,
    )
