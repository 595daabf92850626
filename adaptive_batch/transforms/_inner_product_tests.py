"""The inner-product test and the augmented inner-product test (Bollapragada, Byrd,
Nocedal 2018)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common
from adaptive_batch.transforms._sampling_test import sampling_test, tolerance_sq

_INNER_HINT = "Pass a positive tolerance such as theta=0.1."


def _inner_demand(stats, theta):
    """S_ip / (θ²‖ḡ‖⁴), divided step by step so a tiny ‖ḡ‖ overflows to +inf, not 0."""
    sq_norm = stats.mean_grad_sq_norm
    ratio = _common.safe_divide(_common.safe_divide(stats.inner_variance(ddof=1), sq_norm), sq_norm)
    return ratio / tolerance_sq(theta, ratio.dtype), sq_norm > 0


def inner_product_test(
    theta=0.1,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive batch size from the inner-product test; updates pass through unchanged.

    With pᵢ = gᵢ·ḡ and S_ip = Σᵢ (pᵢ − ‖ḡ‖²)² / (b − 1), the test asks that the batch
    direction be a descent direction in expectation,

    .. math::

        \frac{S_{ip}}{b} \le \theta^2 \|\bar g\|^4,\qquad
        b' = \operatorname{clip}\big(\lceil \max(b_{\text{state}}, b,
             S_{ip} / (\theta^2 \|\bar g\|^4)) \rceil, b_{\min}, b_{\max}\big).

    It is looser than the norm test (only the spread along ḡ counts). Needs the
    statistics of ``per_example_stats(loss_fn, inner=True)`` with the default direction
    (the batch mean gradient). Fewer than 2 examples or ‖ḡ‖ = 0: no information, the
    batch size stays. Non-finite statistics: state unchanged, ``state.skipped`` += 1.
    The other arguments are those of `norm_test`.

    Args:
      theta: tolerance θ > 0 (official code default 0.1).
      min_batch_size, max_batch_size, initial_batch_size, every, monotone: as in
        `norm_test` (defaults 16, 2048, ``None`` → min, 1, ``True``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn, inner=True)
      >>> tx = ab.inner_product_test(0.5, min_batch_size=4)
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> _, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> int(state.batch_size) >= 4
      True

    References:
      Bollapragada, Byrd, Nocedal, "Adaptive Sampling Strategies for Stochastic
      Optimization", SIAM J. Optim. 2018, https://arxiv.org/abs/1710.11258
    """
    owner = "inner_product_test"
    _common.check_real(owner, "theta", theta, low=0, hint=_INNER_HINT)
    return sampling_test(
        owner,
        lambda stats: _inner_demand(stats, theta),
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        initial_batch_size=initial_batch_size,
        every=every,
        monotone=monotone,
        inner=True,
    )


def augmented_inner_product_test(
    theta=0.1,
    nu=0.1,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive batch size from the augmented inner-product test (inner-product test
    plus orthogonality test); updates pass through unchanged.

    With S_ip as in `inner_product_test` and the orthogonal spread
    S_o = Σᵢ ‖gᵢ − (pᵢ/‖ḡ‖²) ḡ‖² / (b − 1), both tests must pass:

    .. math::

        \frac{S_{ip}}{b} \le \theta^2 \|\bar g\|^4 \ \text{and}\
        \frac{S_o}{b} \le \nu^2 \|\bar g\|^2,\qquad
        b' = \operatorname{clip}\Big(\Big\lceil \max\big(b_{\text{state}}, b,
             \tfrac{S_{ip}}{\theta^2 \|\bar g\|^4}, \tfrac{S_o}{\nu^2 \|\bar g\|^2}\big)
             \Big\rceil, b_{\min}, b_{\max}\Big).

    Needs ``per_example_stats(loss_fn, inner=True)``. Edge cases as in
    `inner_product_test`.

    Args:
      theta: inner-product tolerance θ > 0 (default 0.1; the official scripts use 0.5).
      nu: orthogonality tolerance ν > 0 (default 0.1; the official scripts use 1).
      min_batch_size, max_batch_size, initial_batch_size, every, monotone: as in
        `norm_test`.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn, inner=True)
      >>> tx = ab.augmented_inner_product_test(0.5, 1.0, min_batch_size=4)
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> _, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> int(state.batch_size) >= 4
      True

    References:
      Bollapragada, Byrd, Nocedal, "Adaptive Sampling Strategies for Stochastic
      Optimization", SIAM J. Optim. 2018, https://arxiv.org/abs/1710.11258
    """
    owner = "augmented_inner_product_test"
    _common.check_real(owner, "theta", theta, low=0, hint=_INNER_HINT)
    _common.check_real(owner, "nu", nu, low=0, hint="Pass a positive tolerance such as nu=0.1.")

    def demand(stats):
        inner, informative = _inner_demand(stats, theta)
        ratio = _common.safe_divide(stats.orthogonal_variance(ddof=1), stats.mean_grad_sq_norm)
        return jnp.maximum(inner, ratio / tolerance_sq(nu, ratio.dtype)), informative

    return sampling_test(
        owner,
        demand,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        initial_batch_size=initial_batch_size,
        every=every,
        monotone=monotone,
        inner=True,
    )
