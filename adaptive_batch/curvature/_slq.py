"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

The spectral density of an n × n symmetric H with eigenvalues λ₁ … λ_n is
μ = (1/n) Σᵢ δ(t − λᵢ). For a random unit probe v (Rademacher entries ±1/√n),
E[vᵀ f(H) v] = tr f(H) / n = ∫ f dμ, and m Lanczos steps from q₁ = v give a Gauss
quadrature rule (nodes θₖ = Ritz values, weights wₖ = squared first components of
T's eigenvectors) with vᵀ f(H) v = Σₖ wₖ f(θₖ) exactly for polynomials of degree
≤ 2m − 1. Averaging over P probes,

    μ ≈ (1/P) Σₚ Σₖ wₚₖ δ(t − θₚₖ),

and a smooth density on a grid replaces each δ by a Gaussian kernel N(t; θ, σ²).

References:
  Ubaru, Chen, Saad, "Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature",
  SIAM J. Matrix Anal. Appl. 2017. Ghorbani, Krishnan, Xiao, arXiv:1901.10159.
  Yao, Gholami, Keutzer, Mahoney, "PyHessian", arXiv:1912.07145.
  Granziol, Zohren, Roberts, arXiv:2006.09092.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from adaptive_batch.curvature._hvp import LossFn, PyTree, flat_hvp
from adaptive_batch.curvature._lanczos import lanczos


class SpectralDensity(NamedTuple):
    """An SLQ estimate of the Hessian's spectral density: one quadrature rule per probe.

    The estimate of ∫ f dμ is ``(1/P) Σₚ Σₖ weights[p, k] · f(nodes[p, k])``.
    """

    nodes: jax.Array  # (P, m) Ritz values of each probe's Lanczos run, ascending
    weights: jax.Array  # (P, m) Gauss quadrature weights; each row sums to 1

    def moment(self, k: int) -> jax.Array:
        """∫ tᵏ dμ ≈ tr(Hᵏ)/n (exact per probe for k ≤ 2m − 1, unbiased over probes)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**k, axis=-1))

    def on_grid(
        self,
        grid: jax.Array | None = None,
        *,
        sigma: float | None = None,
        num_points: int = 512,
    ) -> tuple[jax.Array, jax.Array]:
        """The density smoothed by a Gaussian kernel, on a grid of eigenvalues.

        ρ(t) = (1/P) Σₚ Σₖ wₚₖ exp(−(t − θₚₖ)²/(2σ²)) / (σ√(2π)).

        Args:
          grid: points t; default ``num_points`` points spanning the nodes ± 5σ.
          sigma: kernel width; default 1% of the span of the nodes (at least a tiny
            positive number, so a one-point spectrum still gives a finite density).

        Returns:
          ``(grid, density)``, two arrays of the same shape.
        """
        low, high = jnp.min(self.nodes), jnp.max(self.nodes)
        if sigma is None:
            sigma = jnp.maximum(0.01 * (high - low), 1e-6 * jnp.maximum(jnp.abs(high), 1))
        elif not sigma > 0:
            raise ValueError(f"sigma={sigma!r} must be > 0 (the Gaussian kernel's width).")
        if grid is None:
            grid = jnp.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
        grid = jnp.asarray(grid)
        z = (grid[..., None, None] - self.nodes) / sigma
        kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
        density = jnp.sum(self.weights * kernel, axis=(-2, -1)) / self.nodes.shape[0]
        return grid, density


def rademacher_probes(key: jax.Array, num_probes: int, dim: int, dtype) -> jax.Array:
    """(num_probes, dim) vectors with independent ±1 entries."""
    return jax.random.rademacher(key, (num_probes, dim), dtype=dtype)


def check_count(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a Python int >= 1 ({what}).")


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters", "num_probes"))
def spectral_density(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    num_iters: int = 32,
    num_probes: int = 8,
    mask: jax.Array | None = None,
) -> SpectralDensity:
    """SLQ estimate of the spectral density of the Hessian of the mean loss.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``.
      params: the point w, a pytree of float arrays.
      batch: pytree whose leaves share the leading batch axis.
      key: PRNG key for the Rademacher probes.
      num_iters: m, Lanczos steps (Hessian-vector products) per probe.
      num_probes: P, independent probes; the density's error falls like 1/√(P·n).
      mask: optional ``(B,)``, nonzero for real examples, 0 for padding.

    Returns:
      A `SpectralDensity` with ``nodes`` and ``weights`` of shape ``(P, m)``. Probes run
      one after another (``lax.map``), so memory is one m × n Lanczos basis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adaptive_batch.curvature import spectral_density
      >>> def loss_fn(w, x):
      ...     return 0.5 * (x @ w) ** 2
      >>> density = spectral_density(loss_fn, jnp.zeros(4), jnp.eye(4),
      ...                            key=jax.random.key(0), num_iters=4, num_probes=2)
      >>> round(float(density.moment(1)), 4)  # tr(H)/n = (4 · 1/4)/4
      0.25
    """
    check_count("num_iters", num_iters, "Lanczos steps per probe")
    check_count("num_probes", num_probes, "random probe vectors")
    matvec, flat = flat_hvp(loss_fn, params, batch, mask)
    probes = rademacher_probes(key, num_probes, flat.shape[0], flat.dtype)
    results = jax.lax.map(lambda v: lanczos(matvec, v, num_iters), probes)
    return SpectralDensity(nodes=results.ritz_values, weights=results.weights)
