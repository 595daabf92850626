"""The machinery shared by the adaptive sampling tests (norm, inner-product, augmented
inner-product and coordinate-wise norm test).

Each test reduces the batch's statistics to one number, the batch size it *demands*
(for the norm test S / (η²‖ḡ‖²)). It passes when the demand is at most the batch size b
that produced the statistics, and sets the next batch size from the demand:

.. math::

    b' = \\operatorname{clip}\\big(\\lceil \\max(b_{\\text{state}},\\ b,\\ d) \\rceil,\\
         b_{\\min},\\ b_{\\max}\\big)

with ``monotone=True`` (the default, as in the papers: the batch only grows), or
``clip(ceil(d), b_min, b_max)`` with ``monotone=False``. b is ``grad_stats.count``, the
number of real examples the statistics came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.stats import GradStats
from adaptive_batch.transforms import _common

# demand_fn(stats) -> (demanded batch size, float, may be +inf; has the step information?)
DemandFn = Callable[[GradStats], tuple[jax.Array, jax.Array]]


class AdaptiveSamplingState(NamedTuple):
    """State of an adaptive sampling test."""

    batch_size: jax.Array  # () int32: the batch size the test wants for the next step
    step: jax.Array  # () int32: steps with finite statistics seen so far
    passed: jax.Array  # () bool: outcome of the last test that carried information
    skipped: jax.Array  # () int32: steps ignored because of non-finite statistics


def sampling_test(
    owner: str,
    demand_fn: DemandFn,
    *,
    min_batch_size,
    max_batch_size,
    initial_batch_size,
    every,
    monotone: bool,
    coordinates: bool = False,
    inner: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """An identity transform whose state carries the batch size the test wants next."""
    if initial_batch_size is None:
        initial_batch_size = min_batch_size
    check_test_arguments(owner, min_batch_size, max_batch_size, initial_batch_size, every, monotone)

    def init_fn(params):
        del params
        return AdaptiveSamplingState(
            batch_size=jnp.asarray(initial_batch_size, jnp.int32),
            step=jnp.zeros((), jnp.int32),
            passed=jnp.asarray(True),
            skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args  # unknown extra arguments are for other transforms
        stats = _common.require_grad_stats(owner, grad_stats, coordinates=coordinates, inner=inner)
        demand, informative = demand_fn(stats)
        b = stats.count.astype(demand.dtype)
        # A variance needs two examples; fewer, or a zero mean gradient, is no
        # information: the batch size and the last outcome stay as they were.
        tested = informative & (b >= 2) & (state.step % every == 0)
        ceil_demand = jnp.ceil(demand)
        grown = jnp.maximum(jnp.maximum(ceil_demand, b), state.batch_size.astype(demand.dtype))
        proposal = _common.clip_batch_size(
            jnp.where(monotone, grown, ceil_demand), min_batch_size, max_batch_size
        )
        new_state = AdaptiveSamplingState(
            batch_size=jnp.where(tested, proposal, state.batch_size),
            step=optax.safe_int32_increment(state.step),
            passed=jnp.where(tested, demand <= b, state.passed),
            skipped=state.skipped,
        )
        return updates, _common.guarded(new_state, state, stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_test_arguments(
    owner, min_batch_size, max_batch_size, initial_batch_size, every, monotone
):
    """The arguments every test shares; also called by the optimizers built on a test,
    so that their errors name the function the user called."""
    if initial_batch_size is None:
        initial_batch_size = min_batch_size
    _common.check_batch_bounds(owner, min_batch_size, max_batch_size, initial_batch_size)
    _common.check_int(
        owner,
        "every",
        every,
        low=1,
        high=2**30,
        hint="Pass every=1 to test every step, every=k to test every k-th step.",
    )
    _common.check_bool(owner, "monotone", monotone)


def check_eta(owner, eta) -> None:
    _common.check_real(owner, "eta", eta, low=0, hint="Pass a positive tolerance such as eta=0.1.")


def tolerance_sq(value, dtype) -> jax.Array:
    """η² in the computation dtype (float32 even if injected as bfloat16)."""
    return jnp.square(jnp.asarray(value, dtype))
