"""AdaGrad-Norm (Ward, Wu, Bottou 2019) and AdAdaGradNorm (Lau, Liu, Kolar 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common
from adaptive_batch.transforms._complete import CompleteOptimizerState, end_mark
from adaptive_batch.transforms._norm_test import norm_test
from adaptive_batch.transforms._sampling_test import check_eta, check_test_arguments


class AdadagradNormEnd(CompleteOptimizerState):
    """Ends the state of `adadagrad_norm` (no arrays): marks it as a complete optimizer."""

    optimizer = "adadagrad_norm"
    instead = "adaptive_batch.norm_test(eta)"
    parts = (
        "adaptive_batch.norm_test(eta), adaptive_batch.scale_by_adagrad_norm(), "
        "optax.scale_by_learning_rate(learning_rate)"
    )


def _check_b0(owner, b0) -> None:
    _common.check_real(
        owner, "b0", b0, low=0, hint="Pass b0 > 0 (v0 = b0² must be positive), e.g. b0=0.01."
    )


class ScaleByAdaGradNormState(NamedTuple):
    """State of `scale_by_adagrad_norm`."""

    sum_sq_norm: jax.Array  # () float (>= float32): v_k = b0² + Σ_{t<=k} ‖g_t‖²


def scale_by_adagrad_norm(b0=0.01) -> optax.GradientTransformation:
    r"""Scale the updates by one scalar step size, AdaGrad-Norm's 1/√v_k.

    .. math::

        v_k = v_{k-1} + \|g_k\|^2,\quad v_0 = b_0^2 > 0,\qquad u_k = g_k / \sqrt{v_k}

    (chain with a learning rate: x ← x − α g_k/√v_k). The sum includes the current
    gradient, so the first step has length α‖g₁‖/√(b₀² + ‖g₁‖²) < α. The accumulator
    is kept in at least float32 whatever the parameter dtype.

    Args:
      b0: b₀ > 0, square root of the initial accumulator (default 0.01, our choice;
        small b₀ makes the first step nearly a normalised gradient step of length α).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> tx = optax.chain(ab.scale_by_adagrad_norm(), optax.scale_by_learning_rate(0.1))
      >>> g = jnp.array([3.0, 4.0])
      >>> updates, _ = tx.update(g, tx.init(g))
      >>> bool(jnp.allclose(updates, -0.1 * g / jnp.sqrt(0.01**2 + 25.0)))
      True

    References:
      Ward, Wu, Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
      landscapes", ICML 2019, https://arxiv.org/abs/1806.01811
    """
    _check_b0("scale_by_adagrad_norm", b0)

    def init_fn(params):
        dtype = _common.state_dtype(params)
        return ScaleByAdaGradNormState(sum_sq_norm=jnp.square(jnp.asarray(b0, dtype)))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args  # grad_stats= and other extra arguments are not needed
        dtype = state.sum_sq_norm.dtype
        sq_norm = sum(jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(updates))
        sum_sq_norm = state.sum_sq_norm + sq_norm
        step = jax.lax.rsqrt(sum_sq_norm)
        updates = jax.tree.map(lambda g: (g.astype(dtype) * step).astype(g.dtype), updates)
        return updates, ScaleByAdaGradNormState(sum_sq_norm=sum_sq_norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adadagrad_norm(
    learning_rate,
    *,
    eta=0.1,
    b0=0.01,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""AdAdaGradNorm: the norm test sets the batch size, AdaGrad-Norm takes the step.

    ``optax.chain(norm_test(eta, ...), scale_by_adagrad_norm(b0),
    optax.scale_by_learning_rate(learning_rate))``:

    .. math::

        v_k = v_{k-1} + \|\bar g_k\|^2,\ v_0 = b_0^2,\qquad
        x_{k+1} = x_k - \alpha\, \bar g_k / \sqrt{v_k},

    and the next batch size from the norm test on the same batch (see `norm_test`).

    A complete optimizer, not a rule: use it alone (or last in a chain). For the norm
    test with another optimizer chain the test in front of that one,
    ``optax.chain(norm_test(eta), optax.adam(...))``; the train steps refuse a chain
    that puts anything after `adadagrad_norm`. Its state ends with an
    `AdadagradNormEnd` mark (no arrays).

    Args:
      learning_rate: α > 0, a float or an Optax schedule.
      eta: norm-test tolerance η > 0 (default 0.1).
      b0: AdaGrad-Norm's b₀ > 0 (default 0.01).
      min_batch_size, max_batch_size, initial_batch_size, every, monotone: as in
        `norm_test` (defaults 16, 2048, ``None`` → min, 1, ``True``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = ab.adadagrad_norm(0.5, min_batch_size=4)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> updates, state = tx.update(stats.mean_grad, state, w, grad_stats=stats)
      >>> w = optax.apply_updates(w, updates)
      >>> int(ab.suggested_batch_size(state)) >= 4
      True

    References:
      Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods", https://arxiv.org/abs/2402.11215
    """
    owner = "adadagrad_norm"
    if not callable(learning_rate):
        _common.check_real(
            owner, "learning_rate", learning_rate, low=0,
            hint="Pass a positive learning rate such as learning_rate=0.1, or a schedule.",
        )  # fmt: skip
    check_eta(owner, eta)
    check_test_arguments(owner, min_batch_size, max_batch_size, initial_batch_size, every, monotone)
    _check_b0(owner, b0)
    return optax.chain(
        norm_test(
            eta,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            initial_batch_size=initial_batch_size,
            every=every,
            monotone=monotone,
        ),
        scale_by_adagrad_norm(b0),
        optax.scale_by_learning_rate(learning_rate),
        end_mark(AdadagradNormEnd),
    )
