"""The gradient noise scale B_simple (McCandlish, Kaplan, Amodei et al. 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common


class GradientNoiseScaleState(NamedTuple):
    """State of `gradient_noise_scale`."""

    trace_avg: jax.Array  # () float (>= float32): running estimate of tr Σ
    sq_norm_avg: jax.Array  # () float: running estimate of ‖∇F‖² (may be <= 0 early on)
    noise_scale: jax.Array  # () float: B_simple = trace_avg / sq_norm_avg (0: not yet known)
    skipped: jax.Array  # () int32: steps with non-finite statistics


def gradient_noise_scale(decay=0.99) -> optax.GradientTransformationExtraArgs:
    r"""Monitor the simple gradient noise scale; the updates pass through unchanged.

    .. math::

        B_{\text{simple}} = \frac{\operatorname{tr}\Sigma}{\|\nabla F\|^2},\qquad
        \operatorname{tr}\Sigma \approx S = \tfrac{1}{b-1}\textstyle\sum_i \|g_i - \bar g\|^2,
        \quad \|\nabla F\|^2 \approx \|\bar g\|^2 - S / b,

    both unbiased estimates, each smoothed by a running average with ``decay``
    (starting at 0; the startup bias cancels in the ratio), then divided. B_simple is
    the batch size at which the gradient noise is about as large as the gradient; a
    batch well below it wastes steps, one well above it wastes examples.

    While the running ‖∇F‖² estimate is <= 0 (noise dominates, typical at the very
    start or near a minimum) the ratio is undefined and ``noise_scale`` keeps its
    previous value (0 before the first defined one). Fewer than 2 examples: no
    information, the state stays. Non-finite statistics: the state stays,
    ``state.skipped`` counts the step.

    Args:
      decay: running-average decay in [0, 1) (default 0.99).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = optax.chain(ab.gradient_noise_scale(0.9), optax.sgd(0.1))
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.ones((8, 3)), "y": jnp.arange(8.0)})
      >>> _, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> round(float(state[0].noise_scale), 4)  # 18 / (36.75 - 18 / 8)
      0.5217

    References:
      McCandlish, Kaplan, Amodei, OpenAI Dota Team, "An Empirical Model of
      Large-Batch Training", https://arxiv.org/abs/1812.06162
    """
    owner = "gradient_noise_scale"
    _common.check_real(
        owner, "decay", decay, low=0, low_open=False, high=1, high_open=True,
        hint="Pass a running-average decay such as decay=0.99.",
    )  # fmt: skip

    def init_fn(params):
        zero = jnp.zeros((), _common.state_dtype(params))
        return GradientNoiseScaleState(zero, zero, zero, jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        stats = _common.require_grad_stats(owner, grad_stats)
        dtype = state.trace_avg.dtype
        b = stats.count.astype(dtype)
        trace = stats.variance(ddof=1).astype(dtype)
        sq_norm = stats.mean_grad_sq_norm.astype(dtype) - _common.safe_divide(trace, b)
        mu = jnp.asarray(decay, dtype)
        trace_avg = mu * state.trace_avg + (1 - mu) * trace
        sq_norm_avg = mu * state.sq_norm_avg + (1 - mu) * sq_norm
        noise_scale = jnp.where(
            sq_norm_avg > 0, _common.safe_divide(trace_avg, sq_norm_avg), state.noise_scale
        )
        informative = b >= 2
        new_state = GradientNoiseScaleState(
            trace_avg=jnp.where(informative, trace_avg, state.trace_avg),
            sq_norm_avg=jnp.where(informative, sq_norm_avg, state.sq_norm_avg),
            noise_scale=jnp.where(informative, noise_scale, state.noise_scale),
            skipped=state.skipped,
        )
        return updates, _common.guarded(new_state, state, stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
