"""The largest Hessian eigenvalue λ_max of the mean loss, by Lanczos.

Lanczos' largest Ritz value θ_m ≤ λ_max converges to λ_max fast: its error shrinks
like a Chebyshev polynomial in the gap ratio, much faster than power iteration's
(λ₂/λ₁)^m (Kuczyński & Woźniakowski 1992). A random Gaussian start vector has a
nonzero component on the top eigenvector with probability 1.
"""

from __future__ import annotations

import functools

import jax

from adaptive_batch.curvature._hvp import LossFn, PyTree, flat_hvp
from adaptive_batch.curvature._lanczos import lanczos
from adaptive_batch.curvature._slq import check_count


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters"))
def top_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    num_iters: int = 20,
    mask: jax.Array | None = None,
) -> jax.Array:
    """λ_max of the Hessian of the mean loss over the real examples (a scalar).

    The largest algebraic eigenvalue, estimated from below by the largest Ritz value of
    ``num_iters`` Lanczos steps with full reorthogonalisation from a random start.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``.
      params: the point w, a pytree of float arrays.
      batch: pytree whose leaves share the leading batch axis.
      key: PRNG key for the start vector.
      num_iters: Lanczos steps (Hessian-vector products).
      mask: optional ``(B,)``, nonzero for real examples, 0 for padding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adaptive_batch.curvature import top_eigenvalue
      >>> def loss_fn(w, x):
      ...     return 0.5 * (x @ w) ** 2
      >>> x = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> round(float(top_eigenvalue(loss_fn, jnp.zeros(3), x, key=jax.random.key(0),
      ...                            num_iters=3)), 4)  # (1/3) · 3²
      3.0

    References:
      Yao, Gholami, Keutzer, Mahoney, "PyHessian", arXiv:1912.07145.
    """
    check_count("num_iters", num_iters, "Lanczos steps")
    matvec, flat = flat_hvp(loss_fn, params, batch, mask)
    start = jax.random.normal(key, flat.shape, flat.dtype)
    return lanczos(matvec, start, num_iters).ritz_values[-1]
