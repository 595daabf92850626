"""Learning rate tied to the batch size: linear, square-root and AdaScale scaling."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common

RULES = ("linear", "sqrt", "adascale")


class ScaleByBatchSizeState(NamedTuple):
    """State of `scale_by_batch_size`."""

    scale: jax.Array  # () float (>= float32): the factor r applied at the last step
    progress: jax.Array  # () float: Σ r over the steps (AdaScale's scale-invariant time)
    variance_avg: jax.Array  # () float: adascale only, running tr Σ estimate (else 0)
    sq_norm_avg: jax.Array  # () float: adascale only, running ‖∇F‖² estimate (else 0)
    skipped: jax.Array  # () int32: steps with non-finite statistics


def scale_by_batch_size(
    base_batch_size,
    rule: str = "linear",
    *,
    max_scale=None,
    decay=0.9,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiply the updates by a factor r of the current batch size b.

    With the batch scale S = b / b₀:

    * ``"linear"``: r = S, the maximal stable SGD learning rate grows linearly with
      the batch (Goyal et al. 2017; Granziol et al.).
    * ``"sqrt"``: r = √S, for Adam-like adaptive methods (Granziol et al.).
    * ``"adascale"``: AdaScale's gain

      .. math::

          r = \frac{\sigma^2 + \mu^2}{\sigma^2 / S + \mu^2}
            = \frac{\operatorname{tr}\Sigma / b_0 + \mu^2}{\operatorname{tr}\Sigma / b + \mu^2},

      with tr Σ ≈ S_b = Σᵢ‖gᵢ − ḡ‖²/(b − 1) and μ² = ‖∇F‖² ≈ ‖ḡ‖² − S_b/b (clipped at
      0), each a running average with ``decay`` (starting at 0: the startup bias
      cancels in the ratio). r lies between 1 and S. Before any statistics with
      b >= 2 have been seen, or if both averages are 0, r = 1.

    Then r ← min(r, ``max_scale``) if a cap is given. The factor multiplies the updates
    (chain it before or after the learning rate). ``state.progress`` accumulates r:
    AdaScale advances its learning-rate schedule by r per step, so drive a schedule by
    ``progress`` to follow it.

    The batch size b is ``grad_stats.count``: the number of real examples the gradient
    was averaged over in this step, which is right even when the data pipeline rounds
    the rule's suggestion up to a bucket and needs no batch-size rule in the chain. A
    step with count = 0 keeps the previous factor. Non-finite statistics: the state
    stays, the previous factor is used, ``state.skipped`` counts the step.

    Args:
      base_batch_size: b₀ > 0, the batch size the learning rate was tuned for.
      rule: ``"linear"``, ``"sqrt"`` or ``"adascale"``.
      max_scale: optional cap on r (> 0), e.g. the ratio at a critical batch size above
        which the learning rate saturates.
      decay: running-average decay in [0, 1) for ``"adascale"`` (default 0.9).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = optax.chain(ab.scale_by_batch_size(2, "sqrt"), optax.sgd(0.1))
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.eye(8, 3), "y": jnp.arange(8.0)})
      >>> updates, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> float(state[0].scale)  # sqrt(8 / 2)
      2.0

    References:
      Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size",
      JMLR 2022, https://arxiv.org/abs/2006.09092
      Goyal et al., "Accurate, Large Minibatch SGD", https://arxiv.org/abs/1706.02677
      Johnson, Agrawal, Gu, Guestrin, "AdaScale SGD", ICML 2020,
      https://arxiv.org/abs/2007.05105
    """
    owner = "scale_by_batch_size"
    if rule not in RULES:
        raise ValueError(f"{owner}: rule={rule!r} is not one of {RULES}; pick one of them.")
    _common.check_real(
        owner, "base_batch_size", base_batch_size, low=0,
        hint="Pass the batch size the learning rate was tuned for, e.g. base_batch_size=32.",
    )  # fmt: skip
    if max_scale is not None:
        _common.check_real(
            owner, "max_scale", max_scale, low=0,
            hint="Pass a positive cap on the factor, or max_scale=None for no cap.",
        )  # fmt: skip
    _common.check_real(
        owner, "decay", decay, low=0, low_open=False, high=1, high_open=True,
        hint="Pass a running-average decay such as decay=0.9.",
    )  # fmt: skip

    def init_fn(params):
        dtype = _common.state_dtype(params)
        zero = jnp.zeros((), dtype)
        return ScaleByBatchSizeState(
            scale=jnp.ones((), dtype),
            progress=zero,
            variance_avg=zero,
            sq_norm_avg=zero,
            skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        stats = _common.require_grad_stats(owner, grad_stats)
        dtype = state.scale.dtype
        b = stats.count.astype(dtype)
        b0 = jnp.asarray(base_batch_size, dtype)
        variance_avg, sq_norm_avg = state.variance_avg, state.sq_norm_avg
        if rule == "linear":
            scale = b / b0
        elif rule == "sqrt":
            scale = jnp.sqrt(b / b0)
        else:
            variance = stats.variance(ddof=1).astype(dtype)
            sq_norm = jnp.maximum(
                stats.mean_grad_sq_norm.astype(dtype) - _common.safe_divide(variance, b), 0
            )
            mu = jnp.asarray(decay, dtype)
            informative = b >= 2
            variance_avg = jnp.where(
                informative, mu * variance_avg + (1 - mu) * variance, variance_avg
            )
            sq_norm_avg = jnp.where(informative, mu * sq_norm_avg + (1 - mu) * sq_norm, sq_norm_avg)
            numerator = variance_avg / b0 + sq_norm_avg
            denominator = _common.safe_divide(variance_avg, b) + sq_norm_avg
            scale = jnp.where(denominator > 0, _common.safe_divide(numerator, denominator), 1)
        if max_scale is not None:
            scale = jnp.minimum(scale, jnp.asarray(max_scale, dtype))
        scale = jnp.where(b > 0, scale, state.scale)
        new_state = ScaleByBatchSizeState(
            scale=scale,
            progress=state.progress + scale,
            variance_avg=variance_avg,
            sq_norm_avg=sq_norm_avg,
            skipped=state.skipped,
        )
        new_state = _common.guarded(new_state, state, stats)
        updates = jax.tree.map(
            lambda u: (u.astype(dtype) * new_state.scale).astype(u.dtype), updates
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
