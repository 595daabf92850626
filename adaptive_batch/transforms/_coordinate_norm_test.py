"""The coordinate-wise norm test of AdAdaGrad (Lau, Liu, Kolar 2024), in its natural
reading: the norm test applied to every coordinate on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.transforms._sampling_test import check_eta, sampling_test, tolerance_sq


def _coordinate_demand(stats, eta):
    """maxⱼ Vⱼ / (η² ḡⱼ²) over the coordinates with ḡⱼ ≠ 0, and whether there is one."""

    def leaf(variance, mean):
        nonzero = mean != 0
        magnitude = jnp.where(nonzero, jnp.abs(mean), 1)
        # Divide twice by |ḡⱼ| rather than once by ḡⱼ²: ḡⱼ² underflows to 0 for
        # |ḡⱼ| < 1e-23 in float32, and the demand must then overflow to +inf instead.
        ratio = jnp.where(nonzero, variance / magnitude / magnitude, 0)
        return jnp.max(ratio, initial=0), jnp.any(nonzero)

    per_leaf = [
        leaf(variance, mean)
        for variance, mean in zip(
            jax.tree.leaves(stats.coordinate_variance(ddof=1)),
            jax.tree.leaves(stats.mean_grad),
            strict=True,
        )
    ]
    ratio = jnp.max(jnp.stack([r for r, _ in per_leaf]))
    informative = jnp.any(jnp.stack([n for _, n in per_leaf]))
    return ratio / tolerance_sq(eta, ratio.dtype), informative


def coordinate_norm_test(
    eta=0.1,
    *,
    min_batch_size=16,
    max_batch_size=2048,
    initial_batch_size=None,
    every=1,
    monotone: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive batch size from the coordinate-wise norm test (AdAdaGrad's test);
    updates pass through unchanged.

    With Vⱼ = Σᵢ (gᵢⱼ − ḡⱼ)² / (b − 1) the unbiased variance of coordinate j, the
    test asks the norm test of every coordinate:

    .. math::

        \frac{V_j}{b} \le \eta^2 \bar g_j^2 \ \ \forall j \in J,\qquad
        b' = \operatorname{clip}\Big(\Big\lceil \max\big(b_{\text{state}}, b,
             \max_{j \in J} \tfrac{V_j}{\eta^2 \bar g_j^2}\big)\Big\rceil,
             b_{\min}, b_{\max}\Big),

    over J = {j : ḡⱼ ≠ 0}. The paper's exact form was not available to us; this is
    its natural reading, the norm test per coordinate (REFERENCES.md).

    Coordinates with ḡⱼ = 0 exactly are left out of J: they give no direction to
    test (the usual cause is a parameter no example of the batch touches, such as the
    weight of an always-zero input pixel, where Vⱼ = 0 too), the same "no information"
    rule as `norm_test` with ‖ḡ‖ = 0. If J is empty the batch size stays. A tiny but
    nonzero ḡⱼ demands a huge batch and gives ``max_batch_size``: this test is far
    stricter than the norm test, since the worst coordinate decides. Fewer than 2
    examples: no information. Non-finite statistics: state unchanged, ``skipped`` += 1.

    Args:
      eta: tolerance η > 0 (default 0.1, as the official AdAdaGrad code).
      min_batch_size, max_batch_size, initial_batch_size, every, monotone: as in
        `norm_test` (defaults 16, 2048, ``None`` → min, 1, ``True``).

    Needs ``per_example_stats(loss_fn, coordinates=True)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_batch as ab
      >>> loss_fn = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn, coordinates=True)
      >>> tx = ab.coordinate_norm_test(0.5, min_batch_size=4)
      >>> w = jnp.zeros(3)
      >>> stats = stats_fn(w, {"x": jnp.eye(4, 3), "y": jnp.arange(4.0)})
      >>> _, state = tx.update(stats.mean_grad, tx.init(w), w, grad_stats=stats)
      >>> int(state.batch_size) >= 4
      True

    References:
      Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
      Methods", https://arxiv.org/abs/2402.11215
    """
    owner = "coordinate_norm_test"
    check_eta(owner, eta)
    return sampling_test(
        owner,
        lambda stats: _coordinate_demand(stats, eta),
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        initial_batch_size=initial_batch_size,
        every=every,
        monotone=monotone,
        coordinates=True,
    )
