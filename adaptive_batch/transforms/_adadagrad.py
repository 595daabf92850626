"""AdAdaGrad (Lau, Liu, Kolar 2024): a batch-size test with coordinate-wise AdaGrad."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms import _common
from adaptive_batch.transforms._complete import CompleteOptimizerState, end_mark
from adaptive_batch.transforms._coordinate_norm_test import coordinate_norm_test
from adaptive_batch.transforms._norm_test import norm_test
from adaptive_batch.transforms._sampling_test import check_eta, check_test_arguments

# The batch-size tests ``adadagrad(test=...)`` accepts.
_TESTS = {"norm": norm_test, "coordinate": coordinate_norm_test}


class AdadagradEnd(CompleteOptimizerState):
    """Ends the state of `adadagrad` (no arrays): marks it as a complete optimizer."""

    optimizer = "adadagrad"
    instead = "adaptive_batch.norm_test(eta)"
    parts = (
        "adaptive_batch.norm_test(eta), adaptive_batch.transforms.scale_by_adagrad_torch(), "
        "optax.scale_by_learning_rate(learning_rate)"
    )


def _check_eps(owner, eps) -> None:
    _common.check_real(
        owner, "eps", eps, low=0, low_open=False,
        hint="Pass a small nonnegative number such as eps=1e-10.",
    )  # fmt: skip


class ScaleByAdagradTorchState(NamedTuple):
    """State of AdaGrad with PyTorch's semantics."""

    sum_sq: optax.Params  # like params, float (>= float32): s_k = Σ_{t<=k} g_t ⊙ g_t


def scale_by_adagrad_torch(eps=1e-10) -> optax.GradientTransformation:
    r"""AdaGrad as ``torch.optim.Adagrad`` (the official AdAdaGrad code's optimizer).

    .. math::

        s_0 = 0,\quad s_k = s_{k-1} + g_k \odot g_k,\qquad u_k = g_k / (\sqrt{s_k} + \epsilon)

    with ε = 1e-10 outside the root. ``optax.adagrad`` differs (initial accumulator 0.1,
    ε = 1e-7 inside the root). A coordinate whose gradients have all been 0 gets a 0
    update. The accumulator is kept in at least float32.

    Args:
      eps: ε >= 0 added to the root (default 1e-10, as PyTorch).
    """
    _check_eps("scale_by_adagrad_torch", eps)

    def init_fn(params):
        dtype = _common.state_dtype(params)
        return ScaleByAdagradTorchState(
            sum_sq=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args  # grad_stats= and other extra arguments are not needed
        sum_sq = jax.tree.map(lambda s, g: s + jnp.square(g.astype(s.dtype)), state.sum_sq, updates)
        updates = jax.tree.map(
            lambda g, s: (g.astype(s.dtype) / (jnp.sqrt(s) + eps)).astype(g.dtype),
            updates,
            sum_sq,
        )
        return updates, ScaleByAdagradTorchState(sum_sq=sum_sq)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adadagrad(
    learning_rate,
    *,
    eta=0.1,
    test: str = "norm",
    eps=1e-10,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""AdAdaGrad: a batch-size test sets the batch size, coordinate-wise AdaGrad steps.

    ``optax.chain(<test>(eta, ...), scale_by_adagrad_torch(eps),
    optax.scale_by_learning_rate(learning_rate))``, with PyTorch's AdaGrad semantics as
    the official code:

    .. math::

        s_k = s_{k-1} + \bar g_k \odot \bar g_k,\ s_0 = 0,\qquad
        x_{k+1} = x_k - \alpha\, \bar g_k / (\sqrt{s_k} + 10^{-10}),

    and the next batch size from the test on the same batch. ``test`` picks it, with
    Vⱼ the unbiased (b − 1) variance of coordinate j:

    * ``"norm"`` (default): `norm_test`, b' = ⌈max(b, Σⱼ Vⱼ / (η² ‖ḡ‖²))⌉, capped.
      The official code (timlautk/AdAdaGrad) chooses its batch-size test apart from
      the optimizer and has no coordinate-wise test; its AdAdaGrad experiments run
      this norm test with coordinate-wise AdaGrad. A small η still asks for large
      batches: with η = 0.1 on MNIST-1D it reached the cap of 2048 by step 4, with
      η = 0.5 it grew over 150 steps.
    * ``"coordinate"``: `coordinate_norm_test`, Vⱼ/b ≤ η² ḡⱼ² for every j, our
      reading of the paper's coordinate-wise test. The worst coordinate decides: in
      our runs (MNIST-1D, scikit-learn digits) it asked for ``max_batch_size`` at its
      first test, turning the method into full-batch AdaGrad, which on MNIST-1D lost
      to constant-batch AdaGrad on an equal examples budget. Needs
      ``per_example_stats(loss_fn, coordinates=True)``.

    A complete optimizer, not a rule: use it alone (or last in a chain). For its
    batch-size test with another optimizer chain the test in front of that one,
    ``optax.chain(norm_test(eta), optax.adam(...))``; the train steps refuse a chain
    that puts anything after `adadagrad`. Its state ends with an `AdadagradEnd` mark
    (no arrays).

    Args:
      learning_rate: α > 0, a float or an Optax schedule (the official MNIST scripts
        use 8e-3).
      eta: test tolerance η > 0 (default 0.1).
      test: ``"norm"`` (default) or ``"coordinate"``, as above.
      eps: AdaGrad's ε outside the root (default 1e-10).
      min_batch_size, max_batch_size, initial_batch_size, every, monotone: as in
        `norm_test` (defaults 16, 2048, ``None`` → min, 1, ``True``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> tx = ab.adadagrad(0.1, min_batch_size=4)
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> updates, state = tx.update(stats.mean_grad, state, w, grad_stats=stats)
      >>> int(ab.suggested_batch_size(state)) >= 4
      True

    References:
      Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods", https://arxiv.org/abs/2402.11215 (official code:
      https://github.com/timlautk/AdAdaGrad).
      Byrd, Chin, Nocedal, Wu, "Sample size selection in optimization methods for
      machine learning", Math. Program. 2012 (the norm test).
    """
    owner = "adadagrad"
    if not callable(learning_rate):
        _common.check_real(
            owner, "learning_rate", learning_rate, low=0,
            hint="Pass a positive learning rate such as learning_rate=8e-3, or a schedule.",
        )  # fmt: skip
    if not isinstance(test, str) or test not in _TESTS:
        raise ValueError(
            f"adadagrad: test={test!r} is not one of {sorted(_TESTS)}. Pass test='norm' "
            "(the official code's experiments) or test='coordinate' (the per-coordinate "
            "test, which needs per_example_stats(loss_fn, coordinates=True))."
        )
    check_eta(owner, eta)
    check_test_arguments(owner, min_batch_size, max_batch_size, initial_batch_size, every, monotone)
    _check_eps(owner, eps)
    return optax.chain(
        _TESTS[test](
            eta,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            initial_batch_size=initial_batch_size,
            every=every,
            monotone=monotone,
        ),
        scale_by_adagrad_torch(eps),
        optax.scale_by_learning_rate(learning_rate),
        end_mark(AdadagradEnd),
    )
