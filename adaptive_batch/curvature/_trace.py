"""Hutchinson's estimator of the Hessian trace.

For z with independent Rademacher entries, E[zᵀHz] = tr H, and
Var[zᵀHz] = 2 Σ_{i≠j} H_ij² (the smallest variance of any i.i.d. probe distribution).
The estimate averages P independent probes, each one Hessian-vector product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adaptive_batch.curvature._hvp import LossFn, PyTree, flat_hvp
from adaptive_batch.curvature._slq import check_count, rademacher_probes


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes"))
def hutchinson_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 32,
    mask: jax.Array | None = None,
) -> jax.Array:
    """tr ∇²F(w) ≈ (1/P) Σₚ zₚᵀ H zₚ, Rademacher zₚ (a scalar).

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``.
      params: the point w, a pytree of float arrays.
      batch: pytree whose leaves share the leading batch axis.
      key: PRNG key for the probes.
      num_probes: P; the standard error is √(2 Σ_{i≠j} H_ij² / P).
      mask: optional ``(B,)``, nonzero for real examples, 0 for padding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adaptive_batch.curvature import hutchinson_trace
      >>> def loss_fn(w, x):
      ...     return 0.5 * (x @ w) ** 2
      >>> x = jnp.diag(jnp.array([1.0, 2.0, 3.0]))  # H = diag(1, 4, 9)/3: no off-diagonal
      >>> round(float(hutchinson_trace(loss_fn, jnp.zeros(3), x, key=jax.random.key(0),
      ...                              num_probes=2)), 4)
      4.6667

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix for
      Laplacian smoothing splines", 1990. Avron & Toledo, J. ACM 2011.
    """
    check_count("num_probes", num_probes, "random probe vectors")
    matvec, flat = flat_hvp(loss_fn, params, batch, mask)
    probes = rademacher_probes(key, num_probes, flat.shape[0], flat.dtype)
    return jnp.mean(jax.lax.map(lambda z: z @ matvec(z), probes))
