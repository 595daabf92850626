"""The norm test of adaptive sampling (Byrd, Chin, Nocedal, Wu 2012)."""

from __future__ import annotations

import optax

from adaptive_batch.transforms import _common
from adaptive_batch.transforms._sampling_test import check_eta, sampling_test, tolerance_sq


def norm_test(
    eta=0.1,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive batch size from the norm test; the updates pass through unchanged.

    On a batch of b examples with per-example gradients gᵢ and mean ḡ, with the unbiased
    variance S = Σᵢ‖gᵢ − ḡ‖² / (b − 1), the test

    .. math::

        \frac{S}{b} \le \eta^2 \|\bar g\|^2

    asks that the sampling error of ḡ be small relative to ḡ itself. The next batch size
    is the smallest that would pass,

    .. math::

        b' = \operatorname{clip}\big(\lceil \max(b_{\text{state}}, b,
             S / (\eta^2 \|\bar g\|^2)) \rceil, b_{\min}, b_{\max}\big),

    so the batch only grows (``monotone=False`` drops the max with the current sizes).
    b is ``grad_stats.count``; b_state the batch size the state held. The new size is in
    ``state.batch_size`` (read it with `adaptive_batch.suggested_batch_size`).

    No information, batch size unchanged: fewer than 2 examples, or ‖ḡ‖ = 0. A mean
    gradient so small that the demand overflows gives ``max_batch_size``. Non-finite
    statistics leave the state as it was and count in ``state.skipped``.

    Args:
      eta: tolerance η > 0 (official code default 0.1; its scripts use 0.1 to 0.5).
      min_batch_size: lower bound of the batch size (default 16).
      max_batch_size: the cap (default 2048).
      initial_batch_size: batch size of the first step; ``None``: ``min_batch_size``.
      every: run the test every ``every`` steps (default 1); between tests the batch
        size stays.
      monotone: let the batch only grow (default ``True``, as in the papers).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword
      argument ``grad_stats=`` (a `GradStats`, from ``per_example_stats(loss_fn)``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = optax.chain(ab.norm_test(0.2, min_batch_size=4), optax.sgd(0.1))
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> batch = {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)}
      >>> stats = stats_fn(w, batch)
      >>> updates, state = tx.update(stats.mean_grad, state, w, grad_stats=stats)
      >>> int(ab.suggested_batch_size(state)) >= 4
      True

    References:
      Byrd, Chin, Nocedal, Wu, "Sample size selection in optimization methods for
      machine learning", Math. Program. 2012.
      Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods", https://arxiv.org/abs/2402.11215
    """
    owner = "norm_test"
    check_eta(owner, eta)

    def demand(stats):
        sq_norm = stats.mean_grad_sq_norm
        ratio = _common.safe_divide(stats.variance(ddof=1), sq_norm)
        return ratio / tolerance_sq(eta, ratio.dtype), sq_norm > 0

    return sampling_test(
        owner,
        demand,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        initial_batch_size=initial_batch_size,
        every=every,
        monotone=monotone,
    )
