"""`GradStats`: sums of per-example gradient statistics over the real examples of a batch.

Every adaptive batch-size rule in this package reads a few moments of the per-example
gradients gᵢ = ∇ℓᵢ(w) of the current batch. `GradStats` keeps them as **sums over real
examples**, never as means, because sums add: the statistics of a batch are the sum of
the statistics of any split of it into micro-batches or device shards
(``stats_a + stats_b``, or ``jax.lax.psum(stats, "data")``). Means and variance
estimates are derived from the sums where they are used, by the methods below.

Notation: b = ``count`` real examples, ḡ = (1/b) Σᵢ gᵢ, qᵢ = ‖gᵢ‖², pᵢ = gᵢ·d for a
direction d (the batch mean gradient ḡ unless another one was given).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def _safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where denominator <= 0 (no NaN, no inf)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def _tree_sq_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(jnp.square(x)) for x in leaves) if leaves else jnp.zeros(())


class GradStats(NamedTuple):
    """Sums of per-example gradient statistics over the real examples of a batch.

    Fields (all sums over the real, unmasked examples i = 1..b):

    * ``count`` — b, float32 scalar.
    * ``loss_sum`` — Σᵢ ℓᵢ, scalar.
    * ``grad_sum`` — Σᵢ gᵢ, a pytree shaped like the params.
    * ``sq_norm_sum`` — Σᵢ ‖gᵢ‖², scalar; ``None`` only in the statistics of a plain
      gradient (a train step for a transform that takes no ``grad_stats``).
    * ``sq_sum`` — Σᵢ gᵢ ⊙ gᵢ, a pytree like the params; ``None`` unless asked for
      (``coordinates=True``).
    * ``inner_sum`` — Σᵢ pᵢ with pᵢ = gᵢ·d; ``None`` unless asked for (``inner=True``).
    * ``inner_sq_sum`` — Σᵢ pᵢ²; ``None`` unless asked for.

    Two `GradStats` add field by field (``a + b``, and ``sum([a, b, c])``), which is how
    micro-batches and devices combine; being a NamedTuple it is also a pytree, so
    ``jax.lax.psum`` and ``jax.tree.map`` work on it directly.

    The derived quantities below divide by b or b − 1. They are defined NaN-free: a
    batch with too few examples for the divisor (b = 0, or b = 1 with ``ddof=1``)
    gives 0, so an all-padding batch reports zero loss, zero gradient and zero
    variance rather than NaN. Rules that need a variance should treat ``count < 2`` as
    "no information".

    Precision: variances come from Σqᵢ − b‖ḡ‖², a difference of two sums. When the
    noise is tiny relative to the mean gradient this loses relative precision in
    float32; the estimates are clipped at 0 so round-off never makes them negative.
    """

    count: jax.Array  # () float32
    loss_sum: jax.Array  # () float
    grad_sum: PyTree  # like params
    sq_norm_sum: jax.Array | None = None  # () float; None: a plain gradient's
    sq_sum: PyTree | None = None  # like params, or None
    inner_sum: jax.Array | None = None  # () float, or None
    inner_sq_sum: jax.Array | None = None  # () float, or None

    # ----------------------------------------------------------------- combining

    def __add__(self, other: GradStats) -> GradStats:  # type: ignore[override]
        if not isinstance(other, GradStats):
            return NotImplemented
        if jax.tree.structure(self) != jax.tree.structure(other):
            raise ValueError(
                "Cannot add GradStats with different fields or parameter structures: "
                f"{_describe(self)} vs {_describe(other)}. Compute both with the same "
                "per_example_stats(..., coordinates=, inner=) settings and the same params."
            )
        return jax.tree.map(jnp.add, self, other)

    def __radd__(self, other) -> GradStats:
        # Lets the builtin sum(list_of_stats) start from its default 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    # ----------------------------------------------------------------- means

    @property
    def mean_loss(self) -> jax.Array:
        """F̂ = (1/b) Σ ℓᵢ (0 for an empty batch)."""
        return _safe_divide(self.loss_sum, self.count)

    @property
    def mean_grad(self) -> PyTree:
        """ḡ = (1/b) Σ gᵢ, a pytree like the params (zeros for an empty batch)."""
        return jax.tree.map(lambda s: _safe_divide(s, self.count).astype(s.dtype), self.grad_sum)

    def mean_grad_like(self, params: PyTree) -> PyTree:
        """ḡ in the dtypes of ``params``: what to hand an optimizer.

        The sums of bfloat16 parameters are kept in float32; an optimizer whose state
        follows the parameters' dtype (``optax.adam``'s moments) would move its state to
        float32 on the first update given float32 gradients, and a jitted step would
        compile again on its second call.
        """
        # Leaf by leaf in order: ``params`` may wrap its arrays where the sums do not
        # (Flax NNX Variables).
        leaves, treedef = jax.tree.flatten(self.mean_grad)
        dtypes = [jnp.result_type(p) for p in jax.tree.leaves(params)]
        return treedef.unflatten([g.astype(d) for g, d in zip(leaves, dtypes, strict=True)])

    @property
    def mean_grad_sq_norm(self) -> jax.Array:
        """‖ḡ‖²."""
        return _tree_sq_norm(self.mean_grad)

    @property
    def mean_sq_norm(self) -> jax.Array:
        """(1/b) Σ ‖gᵢ‖²."""
        self._require_sq_norm("mean_sq_norm")
        return _safe_divide(self.sq_norm_sum, self.count)

    # ----------------------------------------------------------------- variances

    def variance(self, ddof: int = 1) -> jax.Array:
        """Trace of the per-example gradient covariance: Σᵢ‖gᵢ − ḡ‖² / (b − ddof).

        Uses Σᵢ‖gᵢ − ḡ‖² = Σᵢ‖gᵢ‖² − b‖ḡ‖². ``ddof=0`` is the biased estimate of CABS
        (its ξ); ``ddof=1`` the unbiased one of the adaptive sampling tests.
        """
        self._require_sq_norm("variance")
        deviation = self.sq_norm_sum - self.count * self.mean_grad_sq_norm
        return _safe_divide(jnp.maximum(deviation, 0), self.count - ddof)

    def noise_scale(self) -> jax.Array:
        """This batch's gradient noise scale B_simple = tr Σ / ‖∇F‖² (McCandlish et al.
        2018, https://arxiv.org/abs/1812.06162), estimated as ``variance(ddof=1) /
        ‖ḡ‖²``: about the batch size at which the noise equals the signal. 0 for a zero
        mean gradient. One batch's estimate is noisy; `gradient_noise_scale` averages.
        """
        return _safe_divide(self.variance(ddof=1), self.mean_grad_sq_norm)

    def coordinate_variance(self, ddof: int = 1) -> PyTree:
        """Per-coordinate variance (Σᵢ gᵢ⊙gᵢ − b ḡ⊙ḡ) / (b − ddof), a pytree like the params.

        Needs ``sq_sum``: compute the statistics with ``coordinates=True``.
        """
        if self.sq_sum is None:
            raise ValueError(
                "coordinate_variance needs the per-coordinate sums Σ gᵢ⊙gᵢ, which these "
                "statistics do not hold. Build the statistics function with "
                "per_example_stats(loss_fn, coordinates=True)."
            )

        def leaf(sq, mean):
            deviation = sq - self.count * jnp.square(mean)
            return _safe_divide(jnp.maximum(deviation, 0), self.count - ddof)

        return jax.tree.map(leaf, self.sq_sum, self.mean_grad)

    def inner_variance(self, ddof: int = 1) -> jax.Array:
        """Variance of the inner products pᵢ = gᵢ·d: (Σpᵢ² − (Σpᵢ)²/b) / (b − ddof).

        With d = ḡ this is Σᵢ(pᵢ − ‖ḡ‖²)²/(b − ddof), the statistic of the inner-product
        test. Needs ``inner=True``.
        """
        self._require_inner("inner_variance")
        deviation = self.inner_sq_sum - _safe_divide(jnp.square(self.inner_sum), self.count)
        return _safe_divide(jnp.maximum(deviation, 0), self.count - ddof)

    def orthogonal_variance(self, ddof: int = 1, direction_sq_norm=None) -> jax.Array:
        """Σᵢ‖gᵢ − (pᵢ/‖d‖²) d‖² / (b − ddof) = (Σqᵢ − Σpᵢ²/‖d‖²) / (b − ddof).

        The spread of the per-example gradients orthogonal to the direction d, the
        statistic of the orthogonality test. ``direction_sq_norm`` is ‖d‖²; leave it
        ``None`` when d was the batch mean gradient (the default direction). Needs
        ``inner=True``.
        """
        self._require_inner("orthogonal_variance")
        self._require_sq_norm("orthogonal_variance")
        if direction_sq_norm is None:
            direction_sq_norm = self.mean_grad_sq_norm
        deviation = self.sq_norm_sum - _safe_divide(self.inner_sq_sum, direction_sq_norm)
        return _safe_divide(jnp.maximum(deviation, 0), self.count - ddof)

    def _require_sq_norm(self, name: str) -> None:
        if self.sq_norm_sum is None:
            raise ValueError(
                f"{name} needs Σ‖gᵢ‖², which these statistics of a plain gradient do not "
                "hold. Compute them with per_example_stats(loss_fn), or build the train "
                "step with make_train_step(..., coordinates=False) to force them."
            )

    def _require_inner(self, name: str) -> None:
        if self.inner_sum is None or self.inner_sq_sum is None:
            raise ValueError(
                f"{name} needs the inner-product sums Σ gᵢ·d and Σ (gᵢ·d)², which these "
                "statistics do not hold. Build the statistics function with "
                "per_example_stats(loss_fn, inner=True)."
            )


def _describe(stats: GradStats) -> str:
    present = [name for name, value in stats._asdict().items() if value is not None]
    return f"GradStats({', '.join(present)}; {jax.tree.structure(stats.grad_sum)})"
