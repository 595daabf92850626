"""Lanczos tridiagonalisation with full reorthogonalisation, in a `lax` loop.

For a symmetric linear map H (given only through v ↦ Hv) and a start vector q₁,
m steps of Lanczos build an orthonormal basis Q = [q₁ … q_m] of the Krylov space
span{q₁, Hq₁, …, H^{m−1}q₁} in which H is tridiagonal:

    T = Qᵀ H Q,   T = tridiag(β, α, β),   αⱼ = qⱼᵀ H qⱼ,   βⱼ = ‖rⱼ‖,
    rⱼ = (I − QQᵀ) H qⱼ,   q_{j+1} = rⱼ / βⱼ.

Projecting rⱼ on the *whole* basis (twice: "twice is enough", classical Gram–Schmidt
with one reorthogonalisation) keeps Q orthonormal in floating point, so no spurious
copies ("ghosts") of the converged eigenvalues appear. The eigenvalues θₖ of T, the
Ritz values, interlace the spectrum of H: every θₖ lies in [λ_min, λ_max] and the
extreme ones converge to the extreme eigenvalues first. The squared first components
wₖ = (e₁ᵀ sₖ)² of T's eigenvectors are the Gauss quadrature weights with which
Σₖ wₖ f(θₖ) = q₁ᵀ f(H) q₁ exactly for polynomials f of degree ≤ 2m − 1.

Breakdown: when βⱼ is at round-off level the Krylov space is invariant (for example
m exceeds the dimension, or H = 0) and T's eigenvalues are exact eigenvalues of H.
The loop then stops extending the basis; the remaining diagonal entries are filled
with α₁ and the off-diagonal with 0. T becomes block diagonal, so the filled entries
add Ritz values equal to α₁ (a Rayleigh quotient, inside the range of the exact Ritz
values, so the extremes are unchanged) with quadrature weight exactly 0. No NaN.

Memory: the basis is m × n in the working dtype (n the number of parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LanczosResult(NamedTuple):
    """The tridiagonal T = QᵀHQ of a Lanczos run and its eigendecomposition.

    After a breakdown at step k < m, ``alphas[k:]`` hold α₁, ``betas[k-1:]`` hold 0,
    and the corresponding Ritz values (copies of α₁) have weight 0.
    """

    alphas: jax.Array  # (m,) diagonal of T
    betas: jax.Array  # (m - 1,) off-diagonal of T
    ritz_values: jax.Array  # (m,) eigenvalues of T, ascending
    weights: jax.Array  # (m,) squared first components of T's eigenvectors; sum to 1
    num_steps: jax.Array  # () int32, steps taken before a breakdown (m if none)

    @property
    def tridiagonal(self) -> jax.Array:
        """T as a dense (m, m) matrix."""
        return jnp.diag(self.alphas) + jnp.diag(self.betas, k=1) + jnp.diag(self.betas, k=-1)


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    num_iters: int,
    *,
    breakdown_tol: float | None = None,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos steps with full reorthogonalisation.

    Args:
      matvec: v ↦ Hv for a symmetric H, on vectors shaped like ``start``.
      start: the start vector q₁ (normalised here), shape (n,), floating point. A zero
        vector gives T = 0.
      num_iters: m, the number of steps (matrix-vector products), a Python int ≥ 1.
      breakdown_tol: a step breaks down when βⱼ ≤ breakdown_tol · max‖Hqᵢ‖. Default
        100 × the dtype's machine epsilon.

    Returns:
      A `LanczosResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adaptive_batch.curvature import lanczos
      >>> h = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> result = lanczos(lambda v: h @ v, jnp.ones(3), 3)
      >>> [round(float(x), 4) for x in result.ritz_values]
      [1.0, 2.0, 3.0]

    References:
      Lanczos 1950; Golub & Van Loan, "Matrix Computations", §10.1 (full
      reorthogonalisation); Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net
      Optimization via Hessian Eigenvalue Density", arXiv:1901.10159.
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(
            f"num_iters={num_iters!r} must be a Python int >= 1 (the number of Lanczos "
            "steps, each one matrix-vector product)."
        )
    if jnp.ndim(start) != 1 or not jnp.issubdtype(jnp.result_type(start), jnp.floating):
        raise ValueError(
            f"start must be a 1-D floating-point vector, got shape {jnp.shape(start)} and "
            f"dtype {jnp.result_type(start)}; flatten pytrees with "
            "jax.flatten_util.ravel_pytree."
        )
    m, (n,) = num_iters, start.shape
    dtype = start.dtype
    if breakdown_tol is None:
        breakdown_tol = 100 * float(jnp.finfo(dtype).eps)

    start_norm = jnp.linalg.norm(start)
    nonzero = start_norm > 0
    q = jnp.where(nonzero, start / jnp.where(nonzero, start_norm, 1), 0)

    def step(j, carry):
        basis, alphas, betas, q, active, scale = carry
        basis = basis.at[j].set(q)
        w = matvec(q)
        alpha = q @ w
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        # Rows after j are still zero, so projecting on the whole basis is exact.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        extend = active & (beta > breakdown_tol * scale)
        q = jnp.where(extend, w / jnp.where(extend, beta, 1), 0)
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(jnp.where(extend, beta, 0))
        return basis, alphas, betas, q, extend, scale

    init = (
        jnp.zeros((m, n), dtype),
        jnp.zeros((m,), dtype),
        jnp.zeros((m,), dtype),
        q,
        nonzero,
        jnp.zeros((), dtype),
    )
    _, alphas, betas, _, _, _ = jax.lax.fori_loop(0, m, step, init)

    # Step j ran with a real vector iff no earlier β was cut to 0 (and q₁ was nonzero).
    ran = jnp.concatenate([nonzero[None], betas[:-1] > 0])
    ran = jnp.cumprod(ran.astype(jnp.int32)).astype(bool)
    num_steps = jnp.sum(ran, dtype=jnp.int32)
    alphas = jnp.where(ran, alphas, alphas[0])
    betas = betas[:-1]
    result = LanczosResult(alphas, betas, alphas, alphas, num_steps)
    ritz_values, vectors = jnp.linalg.eigh(result.tridiagonal)
    return result._replace(ritz_values=ritz_values, weights=jnp.square(vectors[0]))
