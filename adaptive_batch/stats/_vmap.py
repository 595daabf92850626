"""The exact ``"vmap"`` backend: per-example gradients from ``jax.vmap(jax.grad(...))``.

Memory is (rows in the chunk) × (number of parameters): `per_example_stats` bounds it
with ``microbatch_size``. The sums are accumulated in at least float32 whatever the
parameter dtype, so bfloat16 models do not lose their statistics to round-off.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._row_sums import _WIDEST_REDUCED_ROW, on_cpu, row_sums

PyTree = Any


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype sums are kept in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Zero the rows where mask is False, in the accumulation dtype.

    ``where`` rather than a product, so a NaN or inf in a padding row cannot leak.
    """
    return jnp.where(_row_mask(mask, values), _widened(values), 0)


def with_real_rows(batch: PyTree, mask: jax.Array) -> PyTree:
    """The batch with its padding rows (mask False) replaced by its first real row.

    A padding row may hold NaN; a copy of a real row keeps every value computed from
    it finite, so its zero weight removes it exactly, also in a backward pass. Without
    any real row the padding stays: the caller zeroes its results then."""
    first_real = jnp.argmax(mask)
    return jax.tree.map(lambda x: jnp.where(_row_mask(mask, x), x, x[first_real]), batch)


def vmap_sums(loss_fn, params: PyTree, batch: PyTree, mask: jax.Array, *, coordinates: bool):
    """GradStats (without inner-product sums) of one chunk, from per-example gradients."""

    def example_loss(p, example):
        batch_of_one = jax.tree.map(lambda x: x[None], example)
        return loss_fn(p, batch_of_one)[0]

    losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0))(params, batch)
    count = jnp.sum(mask, dtype=jnp.float32)
    if not coordinates:
        grad_sum, sq_norm_sum = _norm_sums(loss_fn, params, batch, mask, grads)
        return GradStats(
            count=count,
            loss_sum=jnp.sum(masked(losses, mask)),
            grad_sum=grad_sum,
            sq_norm_sum=sq_norm_sum,
            sq_sum=None,
        )
    # Σᵢ gᵢ and Σᵢ gᵢ⊙gᵢ by `row_sums`: XLA:CPU's own sums over the batch axis of wide
    # per-example gradients took 3/4 of this backend's time (`benchmarks/row_sums.py`).
    sums = jax.tree.map(lambda g: row_sums(g, mask=mask), grads)
    grad_sum = jax.tree.map(lambda _, s: s[0], grads, sums)
    sq_sum = jax.tree.map(lambda _, s: s[1], grads, sums)
    return GradStats(
        count=count,
        loss_sum=jnp.sum(masked(losses, mask)),
        grad_sum=grad_sum,
        sq_norm_sum=sum((jnp.sum(s) for s in jax.tree.leaves(sq_sum)), jnp.zeros(())),
        sq_sum=sq_sum,
    )


def _norm_sums(loss_fn, params, batch, mask, grads):
    """(Σᵢ mᵢgᵢ, Σᵢ mᵢ‖gᵢ‖²) of the per-example gradients ``grads`` of ``batch``.

    On XLA:CPU from the masked rows: the mask, the squares and both sums fuse. There,
    when a leaf has per-example gradients of more than `_WIDEST_REDUCED_ROW`
    entries, Σᵢ mᵢgᵢ is the gradient of Σᵢ mᵢℓᵢ instead: one more backward pass, over the
    batch with real rows standing in for the padding (`with_real_rows`), as a ``where``
    does not stop a NaN of a padding row in a backward pass.
    XLA:CPU's own sum over the batch axis of such rows is slow (`row_sums`), and the
    other fast sums doubled the memory, as the per-example gradients then had two
    readers (MLP 40-512-512-10 at B = 64: 64.5 MB -> 128.5-131 MB).
    On other platforms Σᵢ mᵢgᵢ and Σᵢ mᵢgᵢ⊙gᵢ are column sums (`row_sums`), and
    Σᵢ mᵢ‖gᵢ‖² the total of the second (``by_columns``).
    """

    def of_rows(grads):
        grads = jax.tree.map(lambda g: masked(g, mask), grads)
        return jax.tree.map(lambda g: jnp.sum(g, 0), grads), _square_norms(grads)

    def by_backward(grads):
        real_rows = with_real_rows(batch, mask)

        def weighted_loss(p):
            return jnp.sum(jnp.where(mask, loss_fn(p, real_rows), 0))

        grad_sum = jax.tree.map(_widened, jax.grad(weighted_loss)(params))
        real = jnp.any(mask)  # else the padding stood in for itself, and may be NaN
        grad_sum = jax.tree.map(lambda x: jnp.where(real, x, 0), grad_sum)
        sq_norms = sum(_row_square_norms(g) for g in jax.tree.leaves(grads))
        return grad_sum, jnp.sum(jnp.where(mask, sq_norms, 0))

    def by_columns(grads):
        # Other platforms: Σᵢ gᵢ⊙gᵢ first, as with coordinates, then its total. XLA:GPU
        # fused Σᵢ gᵢ (a sum over rows) with the ‖gᵢ‖² (sums within rows) of `of_rows`
        # into kernels that took over a minute to compile for the benchmark MLP at
        # B = 256 and failed with CUDA_ERROR_MISALIGNED_ADDRESS at B = 1024 (H100, jax
        # 0.11.2). Column sums alone ran at B = 1024 (6 s to compile) but still compiled
        # for over 40 s at B = 256. The barrier keeps XLA from folding the total back
        # into the squares' reduction, which makes the program the one with coordinates
        # (2-3 s to compile at both sizes); on a GPU that is not yet measured.
        sums = lax.optimization_barrier([row_sums(g, mask=mask) for g in jax.tree.leaves(grads)])
        grad_sum = jax.tree.unflatten(jax.tree.structure(grads), [s[0] for s in sums])
        return grad_sum, sum((jnp.sum(s[1]) for s in sums), jnp.zeros(()))

    if all(math.prod(g.shape[1:]) <= _WIDEST_REDUCED_ROW for g in jax.tree.leaves(grads)):
        return on_cpu(of_rows, by_columns, grads)
    return on_cpu(by_backward, by_columns, grads)


def _row_square_norms(g):
    """‖gᵢ‖² of each row i, in at least float32."""
    return jnp.sum(jnp.square(_widened(g)).reshape(g.shape[0], -1), 1)


def _square_norms(grads):
    """Σᵢ ‖gᵢ‖² over every leaf and row."""
    return jnp.sum(sum((_row_square_norms(g) for g in jax.tree.leaves(grads)), jnp.zeros(())))


def _widened(x):
    return x.astype(accumulation_dtype(x.dtype))


def _row_mask(mask, x):
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(x) - 1))
