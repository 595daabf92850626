"""Exact gradient statistics of a batch split into micro-batches.

A `BatchPlan` with ``num_microbatches = k > 1`` asks for a padded batch of
``k · m`` rows to be processed as k micro-batches of m rows, so that only m rows of
per-example gradients are ever in memory. Micro-batch j is the rows ``j::k`` (the
batch reshaped to ``(m, k, ...)`` with axis 1 moved first): under data parallelism every
micro-batch is then spread evenly over the devices holding the batch axis, without
moving data.

`GradStats` are sums over examples, so the statistics of the whole batch are the sum
of the micro-batches' (a ``lax.scan`` inside the one compiled step). The inner-product
sums Σᵢ gᵢ·ḡ and Σᵢ (gᵢ·ḡ)² are the exception: their direction is the mean gradient ḡ
of the *whole* batch, which is known only after every micro-batch has been seen. They
are computed by a second scan over the micro-batches, one forward-mode product
(``jax.jvp``) of the per-example losses along ḡ per micro-batch. Cost: one extra
forward-mode pass over the batch (about 1.5–3 forward passes of the model, well
under one per-example gradient pass), the same extra pass ``per_example_stats(...,
inner=True)`` makes on an unsplit batch; memory stays at one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adaptive_batch.stats import GradStats

PyTree = Any


def split_microbatches(tree: PyTree, num_microbatches: int) -> PyTree:
    """``(k·m, ...)`` leaves to ``(k, m, ...)``, micro-batch j holding rows ``j::k``."""
    k = num_microbatches

    def split(x):
        x = jnp.asarray(x)
        if x.shape[0] % k:
            raise ValueError(
                f"a batch of {x.shape[0]} rows does not split into num_microbatches={k} "
                "equal micro-batches; pad the batch to the plan's padded_size "
                "(BatchPlan.padded_size == num_microbatches * microbatch_size)."
            )
        x = x.reshape((x.shape[0] // k, k, *x.shape[1:]))
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(split, tree)


def step_batch(data, mask, num_microbatches: int) -> dict:
    """The extra arguments a train step hands ``tx.update`` besides ``grad_stats``:
    ``batch=`` and ``mask=``, the step's batch, or its first micro-batch when it has
    several (``scale_by_curvature`` measures the Hessian on it; the others ignore it)."""
    if num_microbatches > 1:
        data, mask = jax.tree.map(
            lambda x: x[0], split_microbatches((data, mask), num_microbatches)
        )
    return {"batch": data, "mask": mask}


def inner_product_sums(loss_fn, params, direction, batch, mask) -> tuple[jax.Array, jax.Array]:
    """(Σᵢ pᵢ, Σᵢ pᵢ²) over real rows, pᵢ = gᵢ·d, from one ``jax.jvp`` of the losses."""
    _, products = jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))
    products = products.astype(jnp.promote_types(products.dtype, jnp.float32))
    products = jnp.where(mask, products, 0)  # where, not *, so NaN in padding cannot leak
    return jnp.sum(products), jnp.sum(jnp.square(products))


def batch_stats(
    stats_fn: Callable[..., GradStats],
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    mask: jax.Array,
    *,
    num_microbatches: int = 1,
    inner: bool = False,
) -> GradStats:
    """`GradStats` of a (padded) batch, accumulated exactly over its micro-batches.

    Args:
      stats_fn: ``per_example_stats(loss_fn, coordinates=..., inner=inner)`` (built with
        ``inner=False`` when ``num_microbatches > 1``: the inner sums are added here).
      loss_fn: the per-example loss, for the inner-product pass.
      params, data, mask: as for ``stats_fn``; ``data`` has ``k · m`` rows.
      num_microbatches: k, a Python int (static).
      inner: add the inner-product sums along the whole batch's mean gradient.
    """
    mask = jnp.asarray(mask) != 0
    if num_microbatches == 1:
        return stats_fn(params, data, mask)
    micro_data = split_microbatches(data, num_microbatches)
    micro_mask = split_microbatches(mask, num_microbatches)

    def first_pass(total, micro):
        return total + stats_fn(params, *micro), None

    first = jax.tree.map(lambda x: x[0], (micro_data, micro_mask))
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(stats_fn, params, *first))
    total, _ = jax.lax.scan(first_pass, zeros, (micro_data, micro_mask))
    if not inner:
        return total

    direction = jax.tree.map(lambda d, p: d.astype(p.dtype), total.mean_grad, params)

    def inner_sums(micro_batch, micro_mask):
        return inner_product_sums(loss_fn, params, direction, micro_batch, micro_mask)

    def second_pass(sums, micro):
        return jax.tree.map(jnp.add, sums, inner_sums(*micro)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(inner_sums, *first))
    (inner_sum, inner_sq_sum), _ = jax.lax.scan(second_pass, zeros, (micro_data, micro_mask))
    return total._replace(inner_sum=inner_sum, inner_sq_sum=inner_sq_sum)
