"""Flax NNX adapter: a train step over an ``nnx.Module`` and its ``nnx.Optimizer``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from adaptive_batch.training._accumulate import step_batch
from adaptive_batch.training._metrics import step_metrics
from adaptive_batch.training._step import LossFn, TrainStep, _ones_mask

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["state"], meta_fields=["graphdef"]
)
@dataclasses.dataclass(frozen=True)
class NnxCarry:
    """``nnx.split((model, optimizer))``: the graph definition is static (part of the
    compiled step's cache key), the state is the array leaves the step updates."""

    graphdef: Any
    state: Any


class NnxTrainStep(TrainStep):
    """`make_nnx_train_step`'s step: ``metrics = step(model, optimizer, data, mask)``.

    Compiled as a pure function of ``nnx.split((model, optimizer))``'s state (the
    carry); `fit` keeps that state between steps and writes it back into the model and
    optimizer at evaluations and at the end, so no graph traversal runs per step.
    """

    name = "nnx_train_step"

    def to_carry(self, state):
        model, optimizer = state
        return NnxCarry(*nnx.split((model, optimizer)))

    def from_carry(self, carry, state):
        nnx.update(state, carry.state)
        return state

    def _update(self, carry, data, mask, num_microbatches):
        # A copy: the update below writes into the Variables, and a skipped step keeps
        # the carry it was given.
        model, optimizer = nnx.merge(carry.graphdef, carry.state, copy=True)
        graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

        def loss_fn(p, batch):
            return self.loss_fn(nnx.merge(graphdef, p, rest), batch)

        stats = self.stats(
            optimizer.tx, params, optimizer.opt_state, data, mask, num_microbatches, loss_fn
        )
        previous_opt_state = nnx.as_pure(optimizer.opt_state)
        # Arrays, not Variables: the update below writes into the Variables.
        previous_params = nnx.as_pure(params)
        grads = stats.mean_grad_like(previous_params)
        if isinstance(optimizer.tx, optax.GradientTransformationExtraArgs):
            optimizer.update(
                model, grads, grad_stats=stats, **step_batch(data, mask, num_microbatches)
            )
        else:  # a plain Optax transform takes no extra arguments
            optimizer.update(model, grads)
        # optimizer.update applies the updates in place; their norm is the step taken.
        new_params = nnx.as_pure(nnx.state(model, optimizer.wrt))
        updates = jax.tree.map(jnp.subtract, new_params, previous_params)
        metrics = step_metrics(
            stats, nnx.as_pure(optimizer.opt_state), previous_opt_state=previous_opt_state,
            updates=updates, params=new_params, skip_nonfinite=self.skip_nonfinite,
        )  # fmt: skip
        return NnxCarry(carry.graphdef, nnx.state((model, optimizer))), metrics

    def __call__(self, model, optimizer, data, mask=None, *, num_microbatches: int = 1):
        """One step, updating ``model`` and ``optimizer`` in place; returns the metrics."""
        if mask is None:
            mask = _ones_mask(data)
        carry = self.to_carry((model, optimizer))
        carry, metrics = self.run(carry, data, mask, num_microbatches)
        self.from_carry(carry, (model, optimizer))
        return metrics


def make_nnx_train_step(
    loss_fn: LossFn,
    *,
    coordinates: bool | None = None,
    inner: bool | None = None,
    backend: str = "auto",
    stats_microbatch_size: int | None = None,
    donate: bool = False,
    skip_nonfinite: bool = True,
) -> NnxTrainStep:
    """A train step for Flax NNX: ``metrics = step(model, optimizer, data, mask)``.

    ``loss_fn(model, batch) -> (B,)`` per-example losses. The step computes the
    batch's `GradStats` with respect to the parameters the optimizer trains
    (``optimizer.wrt``, e.g. ``nnx.Param``; other variables are held fixed) and calls
    ``optimizer.update(model, ḡ, grad_stats=stats)``, which forwards the keyword to
    ``tx.update`` (flax >= 0.11). Micro-batches, metrics, one compile per shape and the
    other arguments: as in `make_train_step`.

    Example:
      >>> import numpy as np, optax
      >>> from flax import nnx
      >>> import adaptive_batch as ab
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ab.cabs(0.1, min_batch_size=4), wrt=nnx.Param)
      >>> def loss_fn(model, batch):
      ...     return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])
      >>> step = ab.training.make_nnx_train_step(loss_fn)
      >>> data = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.int32)}
      >>> metrics = step(model, optimizer, data)
      >>> int(optimizer.step[...]), int(metrics["count"])
      (1, 8)
    """
    return NnxTrainStep(
        loss_fn,
        coordinates=coordinates,
        inner=inner,
        backend=backend,
        stats_microbatch_size=stats_microbatch_size,
        donate=donate,
        skip_nonfinite=skip_nonfinite,
    )
