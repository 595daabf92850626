"""Learning rate and heavy-ball momentum set from the Hessian's extreme eigenvalues.

Every K steps the transform runs Lanczos on the Hessian of the mean loss over the
batch it is given and reads two eigenvalue estimates off the Ritz values θ₁ ≤ … ≤ θ_m:

    λ_max = θ_m,   λ_lo = min{θₖ : θₖ ≥ λ_max / κ_max}   (the positive bulk edge),
    κ = λ_max / λ_lo ∈ [1, κ_max].

On a positive definite problem with enough Lanczos steps λ_lo is λ_min; on a network,
whose spectrum has a bulk near 0 (and negative outliers), it is the smallest positive
curvature Lanczos resolves, floored at λ_max/κ_max so that κ stays bounded. Then, with
c = ``factor``, one of three rules:

* ``"lambda_max"`` (default; the recipe in REFERENCES.md): lr = c/λ_max,
  β = ((√κ − 1)/(√κ + 1))².
* ``"polyak"``: Polyak's optimal heavy ball for a quadratic with spectrum in
  [λ_lo, λ_max]: lr = c · 4/(√λ_max + √λ_lo)², the same β; the error then contracts
  like (√κ − 1)/(√κ + 1) per step. Note lr → 4/λ_max for large κ: the momentum is what
  lets the step exceed plain gradient descent's 2/λ_max.
* ``"gradient_descent"``: the optimal fixed step of plain gradient descent,
  lr = c · 2/(λ_max + λ_lo), β = 0; the error contracts like (κ − 1)/(κ + 1).

and the heavy-ball step, with u the previous update,

    u_t = −lr · g_t + β · u_{t−1},   w_{t+1} = w_t + u_t.

A rejected estimate (λ_max ≤ 0, or not finite: negative or zero curvature, or an
all-padding batch) keeps the previous learning rate and momentum, so no NaN reaches the
state. β is clipped to [0, ``max_momentum``]. The batch Hessian's top eigenvalue grows
as the batch shrinks (Granziol et al.), so estimate on a fixed-size batch
(``curvature_batch=``) when the training batch size changes.

References:
  Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size",
  arXiv:2006.09092. Polyak, "Some methods of speeding up the convergence of iteration
  methods", 1964. Goh, "Why Momentum Really Works", Distill 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.curvature._hvp import flat_hvp
from adaptive_batch.curvature._lanczos import lanczos

PyTree = Any
RULES = ("lambda_max", "polyak", "gradient_descent")


class CurvatureState(NamedTuple):
    """State of `scale_by_curvature`."""

    count: jax.Array  # () int32, updates done so far
    key: jax.Array  # (2,) uint32, raw PRNG key for the Lanczos start vectors
    learning_rate: jax.Array  # () float32, in use until the next accepted estimate
    momentum: jax.Array  # () float32, β in use
    lambda_max: jax.Array  # () float32, last accepted λ_max (0 before any)
    lambda_lo: jax.Array  # () float32, last accepted bulk edge λ_lo (0 before any)
    velocity: PyTree  # like params: the previous update u_{t−1}


def _check_number(name: str, value, low, high, *, low_open=False, high_open=False, why=""):
    # Arrays (e.g. from optax.inject_hyperparams) are checked by their user.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must lie in {interval}. {why}".strip())


def _check_count(name: str, value, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a Python int >= 1 ({why}).")


def scale_by_curvature(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    estimate_every: int = 10,
    num_iters: int = 20,
    factor: float = 1.0,
    rule: str = "lambda_max",
    max_condition: float = 1e3,
    max_momentum: float = 0.95,
    init_learning_rate: float = 1e-3,
    init_momentum: float = 0.0,
    seed: int = 0,
    flip_sign: bool = True,
    curvature_batch: PyTree | None = None,
    curvature_mask: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Heavy-ball steps whose learning rate and momentum come from Lanczos eigenvalues.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``; the curvature is
        that of their mean over the real examples.
      estimate_every: K; eigenvalues are re-estimated at steps 0, K, 2K, … (a
        ``lax.cond`` inside the update, so one compiled step serves every step).
      num_iters: Lanczos steps (Hessian-vector products) per estimate.
      factor: c in (0, 2]; multiplies the rule's learning rate.
      rule: ``"lambda_max"``, ``"polyak"`` or ``"gradient_descent"`` (module docstring).
      max_condition: κ_max ≥ 1, the largest condition number used for the momentum.
      max_momentum: upper clip for β, in [0, 1).
      init_learning_rate: learning rate until the first accepted estimate (≥ 0).
      init_momentum: β until the first accepted estimate, in [0, 1).
      seed: seed of the Lanczos start vectors.
      flip_sign: return −lr·g (a descent update, like ``optax.scale_by_learning_rate``).
      curvature_batch, curvature_mask: a fixed batch (and its mask) to estimate on at
        every estimate, instead of the step's batch: the batch Hessian's λ_max grows as
        the batch shrinks, so with a growing batch a fixed one keeps the estimates
        comparable. Held as constants of the compiled step.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update(grads, state, params, *,
      batch, mask=None, curvature_batch=None, curvature_mask=None, **ignored)``:
      ``params`` and a batch are required. The estimate uses, first found:
      ``curvature_batch=`` of the call, ``curvature_batch`` of the factory, ``batch=``
      of the call (the train steps of `adaptive_batch.training`, and so `fit`, pass
      their batch and mask). Unknown extra arguments are ignored, so it sits in
      ``optax.chain`` with the batch-size rules.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from adaptive_batch.curvature import scale_by_curvature
      >>> def loss_fn(w, x):
      ...     return 0.5 * (x @ w) ** 2
      >>> x = jnp.diag(jnp.array([1.0, 2.0])) * jnp.sqrt(2.0)  # H = diag(1, 4)
      >>> tx = scale_by_curvature(loss_fn, rule="gradient_descent", num_iters=2)
      >>> w = jnp.ones(2)
      >>> state = tx.init(w)
      >>> g = jax.grad(lambda w: loss_fn(w, x).mean())(w)
      >>> updates, state = tx.update(g, state, w, batch=x)
      >>> round(float(state.learning_rate), 4)  # 2 / (4 + 1)
      0.4
    """
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(params, batch) -> per-example losses, "
            f"got {type(loss_fn).__name__}."
        )
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not known; choose one of {RULES}.")
    _check_count("estimate_every", estimate_every, "steps between eigenvalue estimates")
    _check_count("num_iters", num_iters, "Lanczos steps per estimate")
    _check_number("factor", factor, 0, 2, low_open=True, why="Above 2/λ_max plain steps diverge.")
    _check_number("max_condition", max_condition, 1, float("inf"), high_open=True)
    _check_number("max_momentum", max_momentum, 0, 1, high_open=True)
    _check_number("init_learning_rate", init_learning_rate, 0, float("inf"), high_open=True)
    _check_number("init_momentum", init_momentum, 0, 1, high_open=True)

    # The factory's fixed batch (update's own curvature_batch= takes precedence).
    fixed_batch, fixed_mask = curvature_batch, curvature_mask

    def init_fn(params):
        return CurvatureState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            learning_rate=jnp.asarray(init_learning_rate, jnp.float32),
            momentum=jnp.asarray(init_momentum, jnp.float32),
            lambda_max=jnp.zeros((), jnp.float32),
            lambda_lo=jnp.zeros((), jnp.float32),
            velocity=jax.tree.map(jnp.zeros_like, params),
        )

    def rates(lambda_max, lambda_lo):
        kappa = lambda_max / lambda_lo
        root = jnp.sqrt(kappa)
        momentum = jnp.square((root - 1) / (root + 1))
        if rule == "lambda_max":
            lr = factor / lambda_max
        elif rule == "polyak":
            lr = factor * 4 / jnp.square(jnp.sqrt(lambda_max) + jnp.sqrt(lambda_lo))
        else:
            lr, momentum = factor * 2 / (lambda_max + lambda_lo), jnp.zeros_like(kappa)
        return lr, jnp.clip(momentum, 0, max_momentum)

    def estimate(state, params, batch, mask):
        matvec, flat = flat_hvp(loss_fn, params, batch, mask)
        key = jax.random.fold_in(state.key, state.count)
        start = jax.random.normal(key, flat.shape, flat.dtype)
        ritz = lanczos(matvec, start, num_iters).ritz_values.astype(jnp.float32)
        lambda_max = ritz[-1]
        accept = jnp.isfinite(lambda_max) & (lambda_max > 0)
        # λ_max itself passes the floor, so the minimum is finite whenever accepted.
        floor = lambda_max / max_condition
        lambda_lo = jnp.min(jnp.where(ritz >= floor, ritz, lambda_max))
        safe_max = jnp.where(accept, lambda_max, 1.0)
        safe_lo = jnp.where(accept, jnp.clip(lambda_lo, floor, lambda_max), 1.0)
        lr, momentum = rates(safe_max, safe_lo)
        keep = (state.learning_rate, state.momentum, state.lambda_max, state.lambda_lo)
        new = (lr, momentum, lambda_max, lambda_lo)
        return tuple(
            jnp.where(accept, n, k).astype(jnp.float32) for n, k in zip(new, keep, strict=True)
        )

    def keep(state, params, batch, mask):
        return state.learning_rate, state.momentum, state.lambda_max, state.lambda_lo

    def update_fn(
        updates,
        state,
        params=None,
        *,
        batch=None,
        mask=None,
        curvature_batch=None,
        curvature_mask=None,
        **extra_args,
    ):
        del extra_args
        if params is None:
            raise TypeError(
                "scale_by_curvature needs the current params to measure the Hessian: call "
                "tx.update(grads, state, params, batch=batch, mask=mask)."
            )
        if curvature_batch is not None:
            batch, mask = curvature_batch, curvature_mask
        elif fixed_batch is not None:
            batch, mask = fixed_batch, fixed_mask
        if batch is None:
            raise TypeError(
                "scale_by_curvature needs a batch to measure the Hessian on: call "
                "tx.update(grads, state, params, batch=batch, mask=mask) (the train steps "
                "and fit do), or build it with a fixed one: scale_by_curvature(loss_fn, "
                "curvature_batch=batch, curvature_mask=mask)."
            )
        due = state.count % estimate_every == 0
        lr, momentum, lambda_max, lambda_lo = jax.lax.cond(
            due, estimate, keep, state, params, batch, mask
        )
        sign = -1 if flip_sign else 1

        def step(g, u):
            return (sign * lr * g + momentum * u).astype(u.dtype)

        velocity = jax.tree.map(step, updates, state.velocity)
        new_state = CurvatureState(
            count=optax.safe_int32_increment(state.count),
            key=state.key,
            learning_rate=lr,
            momentum=momentum,
            lambda_max=lambda_max,
            lambda_lo=lambda_lo,
            velocity=velocity,
        )
        return velocity, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
