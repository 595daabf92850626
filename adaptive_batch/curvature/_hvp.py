"""Hessian-vector products of the mean loss over the real examples of a batch.

The objective is the masked mean F(w) = Σᵢ mᵢ ℓᵢ(w) / Σᵢ mᵢ of the per-example losses
ℓᵢ = ``loss_fn(params, batch)[i]`` (mᵢ = 1 for real examples, 0 for padding). Its
Hessian-vector product Hv = ∇²F(w) v is computed forward over reverse,

    Hv = jvp(∇F, (w,), (v,)),

which costs about one gradient evaluation more than the gradient and never forms H
(Pearlmutter 1994). `flat_hvp` linearises ∇F once and returns the linear map on
flattened parameter vectors, so the many products of a Lanczos run share the primal
(forward and backward) pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def mean_loss(loss_fn: LossFn, params: PyTree, batch: PyTree, mask: jax.Array | None = None):
    """F(w) = Σᵢ mᵢ ℓᵢ(w) / Σᵢ mᵢ, the mean per-example loss over the real examples.

    An all-padding batch gives 0 (not NaN). Padding rows must hold finite data: their
    losses are dropped with ``where``, but a NaN inside ``loss_fn`` can still reach the
    gradient through the chain rule (0 × NaN).
    """
    losses = loss_fn(params, batch)
    if jnp.ndim(losses) != 1:
        raise ValueError(
            f"loss_fn(params, batch) must return per-example losses of shape (B,), got shape "
            f"{jnp.shape(losses)}. Return the vector of losses, not their mean."
        )
    if mask is None:
        return jnp.mean(losses)
    if jnp.shape(mask) != jnp.shape(losses):
        raise ValueError(
            f"mask has shape {jnp.shape(mask)} but loss_fn returned {jnp.shape(losses)[0]} "
            f"losses: pass a mask of shape {jnp.shape(losses)} with 1 for real examples and "
            "0 for padding."
        )
    real = jnp.asarray(mask) != 0
    total = jnp.sum(jnp.where(real, losses, 0))
    return total / jnp.maximum(jnp.sum(real), 1).astype(total.dtype)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def hvp(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    vector: PyTree,
    *,
    mask: jax.Array | None = None,
) -> PyTree:
    """The Hessian-vector product ∇²F(w) v of the mean loss over real examples.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``.
      params: the point w, any pytree of float arrays.
      batch: a pytree whose leaves share the leading batch axis B.
      vector: the direction v, a pytree shaped like ``params``.
      mask: optional ``(B,)``, nonzero for real examples and 0 for padding.

    Returns:
      Hv, a pytree shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adaptive_batch.curvature import hvp
      >>> def loss_fn(w, batch):
      ...     return 0.5 * (batch @ w) ** 2
      >>> hvp(loss_fn, jnp.zeros(2), jnp.eye(2), jnp.array([1.0, 2.0]))
      Array([0.5, 1. ], dtype=float32)

    References:
      Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    if jax.tree.structure(vector) != jax.tree.structure(params):
        raise ValueError(
            "vector must be a pytree with the same structure as params; got "
            f"{jax.tree.structure(vector)}, expected {jax.tree.structure(params)}."
        )

    grad_fn = jax.grad(lambda p: mean_loss(loss_fn, p, batch, mask))

    return jax.jvp(grad_fn, (params,), (vector,))[1]


def flat_hvp(
    loss_fn: LossFn, params: PyTree, batch: PyTree, mask: jax.Array | None = None
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """The map v ↦ Hv on flattened parameter vectors, and the flattened params.

    ∇F is linearised once (``jax.linearize``), so each product costs only the
    tangent (linear) part of a forward-over-reverse pass. Vectors are kept in at least
    float32, whatever the parameter dtype, so that Lanczos does not lose its
    orthogonality to bfloat16 round-off.

    Returns:
      ``(matvec, flat_params)``: ``matvec(v)`` takes and returns vectors of shape
      ``flat_params.shape`` in the working dtype.
    """
    flat, unravel = ravel_pytree(params)
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise TypeError(
            f"params have dtype {flat.dtype}; the Hessian needs floating-point params. Move "
            "integer leaves out of params and close over them in loss_fn."
        )
    work_dtype = jnp.promote_types(flat.dtype, jnp.float32)

    grad_fn = jax.grad(lambda p: mean_loss(loss_fn, p, batch, mask))

    def flat_grad(x):
        return ravel_pytree(grad_fn(unravel(x)))[0]

    _, linear = jax.linearize(flat_grad, flat)

    def matvec(v: jax.Array) -> jax.Array:
        return linear(v.astype(flat.dtype)).astype(work_dtype)

    return matvec, flat.astype(work_dtype)
