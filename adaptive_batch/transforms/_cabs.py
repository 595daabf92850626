"""CABS: Coupling Adaptive Batch Sizes with learning rates (Balles, Romero, Hennig 2017)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common
from adaptive_batch.transforms._complete import CompleteOptimizerState, end_mark


class CabsState(NamedTuple):
    """State of `cabs_rule`. The running averages follow the official code: they start
    at loss_avg = 1 and xi_avg = 0 and are not bias corrected."""

    batch_size: jax.Array  # () int32: the batch size CABS wants for the next step
    loss_avg: jax.Array  # () float (>= float32): running average of the batch loss F̂
    xi_avg: jax.Array  # () float: running average of the gradient variance ξ
    skipped: jax.Array  # () int32: steps ignored because of non-finite statistics


class CabsEnd(CompleteOptimizerState):
    """Ends the state of `cabs` (no arrays): marks it as a complete optimizer."""

    optimizer = "cabs"
    instead = "adaptive_batch.cabs_rule(learning_rate)"
    parts = "adaptive_batch.cabs_rule(learning_rate), optax.sgd(learning_rate)"


def _check_learning_rate(owner, learning_rate):
    if callable(learning_rate):
        raise TypeError(
            f"{owner}: learning_rate={learning_rate!r} is a schedule, but CABS couples the "
            "batch size to a constant learning rate α. Pass a float such as "
            "learning_rate=0.1; to change it during training wrap the factory: "
            "optax.inject_hyperparams(adaptive_batch.cabs)(learning_rate=0.1)."
        )
    _common.check_real(
        owner, "learning_rate", learning_rate, low=0,
        hint="Pass a positive constant learning rate such as learning_rate=0.1.",
    )  # fmt: skip


def _check_arguments(
    owner, learning_rate, min_batch_size, max_batch_size, initial_batch_size, decay, scale, eps
):
    """Shared by `cabs_rule` and `cabs`, so that errors name the function called."""
    _check_learning_rate(owner, learning_rate)
    if initial_batch_size is None:
        initial_batch_size = min_batch_size
    _common.check_batch_bounds(owner, min_batch_size, max_batch_size, initial_batch_size)
    _common.check_real(
        owner, "decay", decay, low=0, low_open=False, high=1, high_open=True,
        hint="Pass the running-average decay μ, e.g. decay=0.95.",
    )  # fmt: skip
    _common.check_real(owner, "scale", scale, low=0, hint="Pass c > 0, e.g. scale=1.0.")
    _common.check_real(
        owner, "eps", eps, low=0, low_open=False,
        hint="Pass a small nonnegative number such as eps=1e-8.",
    )  # fmt: skip


def cabs_rule(
    learning_rate,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    decay=0.95,
    scale=1.0,
    eps=1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""The CABS batch-size rule; the updates pass through unchanged.

    CABS sets the batch size to m = α tr Σ(w) / F(w), with α the constant SGD learning
    rate, Σ the per-example gradient covariance and F the loss (assumed to have its
    minimum near 0). As the official TensorFlow code, on a batch of m examples:

    .. math::

        \hat F = \tfrac1m \textstyle\sum_i \ell_i,\qquad
        \xi = \tfrac1m \textstyle\sum_i \|g_i\|^2 - \|\bar g\|^2 \quad(\text{divisor } m),

        \bar F \leftarrow \mu \bar F + (1-\mu)\hat F,\qquad
        \bar\xi \leftarrow \mu \bar\xi + (1-\mu)\xi
        \qquad(\bar F_0 = 1,\ \bar\xi_0 = 0,\ \text{no bias correction}),

        m' = \operatorname{clip}\big(\operatorname{round}(c\,\alpha\,\bar\xi /
             (\bar F + \epsilon)),\ m_{\min},\ m_{\max}\big)

    with round half to even, from the *updated* averages. A running loss F̄ + ε <= 0
    (a loss that goes negative breaks CABS's assumption) gives m_max. Fewer than 2
    examples: no information, the state stays. Non-finite loss or statistics: the state
    stays and ``state.skipped`` counts the step. Compute the statistics from the data
    term of the loss: regularisation added into the loss biases ξ.

    Args:
      learning_rate: the constant SGD learning rate α > 0 the batch size is coupled to.
      min_batch_size: m_min (default 16, as the official code).
      max_batch_size: m_max (default 2048, as the official code).
      initial_batch_size: m_0; ``None``: ``min_batch_size`` (the official examples
        start at 16).
      decay: μ in [0, 1) (default 0.95).
      scale: c > 0 (default 1).
      eps: ε >= 0 added to the running loss (default 1e-8; the official code uses 0,
        where a loss reaching 0 gives 0/0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` taking ``grad_stats=`` (a
      `GradStats` from ``per_example_stats(loss_fn)``); the state is a `CabsState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = ab.cabs_rule(0.1, min_batch_size=2, max_batch_size=64)
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> _, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> 2 <= int(state.batch_size) <= 64
      True

    References:
      Balles, Romero, Hennig, "Coupling Adaptive Batch Sizes with Learning Rates",
      UAI 2017, https://arxiv.org/abs/1612.05086
    """
    owner = "cabs_rule"
    if initial_batch_size is None:
        initial_batch_size = min_batch_size
    _check_arguments(
        owner, learning_rate, min_batch_size, max_batch_size, initial_batch_size, decay, scale, eps
    )

    def init_fn(params):
        dtype = _common.state_dtype(params)
        return CabsState(
            batch_size=jnp.asarray(initial_batch_size, jnp.int32),
            loss_avg=jnp.ones((), dtype),
            xi_avg=jnp.zeros((), dtype),
            skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        stats = _common.require_grad_stats(owner, grad_stats)
        dtype = state.loss_avg.dtype
        mu = jnp.asarray(decay, dtype)
        loss_avg = mu * state.loss_avg + (1 - mu) * stats.mean_loss.astype(dtype)
        xi_avg = mu * state.xi_avg + (1 - mu) * stats.variance(ddof=0).astype(dtype)
        denominator = loss_avg + jnp.asarray(eps, dtype)
        coupling = jnp.asarray(scale, dtype) * jnp.asarray(learning_rate, dtype) * xi_avg
        wanted = jnp.where(
            denominator > 0, coupling / jnp.where(denominator > 0, denominator, 1), jnp.inf
        )
        batch_size = _common.clip_batch_size(jnp.round(wanted), min_batch_size, max_batch_size)
        informative = stats.count >= 2
        new_state = CabsState(
            batch_size=jnp.where(informative, batch_size, state.batch_size),
            loss_avg=jnp.where(informative, loss_avg, state.loss_avg),
            xi_avg=jnp.where(informative, xi_avg, state.xi_avg),
            skipped=state.skipped,
        )
        return updates, _common.guarded(new_state, state, stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cabs(
    learning_rate,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    decay=0.95,
    scale=1.0,
    eps=1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""CABS: `cabs_rule` for the batch size and plain SGD, w ← w − α ḡ, constant α.

    ``optax.chain(cabs_rule(α, ...), optax.sgd(α))``; see `cabs_rule` for the rule and
    every argument. No momentum, no schedule: CABS replaces the learning-rate
    schedule by the growing batch.

    A complete optimizer, not a rule: use it alone (or last in a chain). To set the
    batch size with CABS for another optimizer chain the rule in front of it,
    ``optax.chain(cabs_rule(α), optax.adam(...))``; the train steps refuse a chain
    that puts anything after `cabs`. Its state ends with a `CabsEnd` mark (no arrays).
    CABS may shrink the batch: run it with ``BatchSizeController(..., monotone=False)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = ab.cabs(0.1)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> updates, state = tx.update(stats.mean_grad, state, w, grad_stats=stats)
      >>> w = optax.apply_updates(w, updates)
      >>> int(ab.suggested_batch_size(state))
      16

    References:
      Balles, Romero, Hennig, "Coupling Adaptive Batch Sizes with Learning Rates",
      UAI 2017, https://arxiv.org/abs/1612.05086
    """
    _check_arguments(
        "cabs", learning_rate, min_batch_size, max_batch_size, initial_batch_size, decay, scale, eps
    )
    return optax.chain(
        cabs_rule(
            learning_rate,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            initial_batch_size=initial_batch_size,
            decay=decay,
            scale=scale,
            eps=eps,
        ),
        optax.sgd(learning_rate),
        end_mark(CabsEnd),
    )
