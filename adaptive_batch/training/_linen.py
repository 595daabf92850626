"""Flax Linen adapter: a train step over a ``flax.training.train_state.TrainState``."""

from __future__ import annotations

from typing import Any

import optax

from adaptive_batch.training._accumulate import step_batch
from adaptive_batch.training._metrics import step_metrics
from adaptive_batch.training._step import LossFn, TrainStep, _ones_mask

PyTree = Any


class LinenTrainStep(TrainStep):
    """`make_linen_train_step`'s step: ``state, metrics = step(state, data, mask)``."""

    name = "linen_train_step"

    def _update(self, state, data, mask, num_microbatches):
        # TrainState.apply_gradients does not forward extra arguments to tx.update,
        # so the update is spelled out (what apply_gradients does, plus grad_stats).
        tx = optax.with_extra_args_support(state.tx)
        stats = self.stats(tx, state.params, state.opt_state, data, mask, num_microbatches)
        updates, opt_state = tx.update(
            stats.mean_grad_like(state.params),
            state.opt_state,
            state.params,
            grad_stats=stats,
            **step_batch(data, mask, num_microbatches),
        )
        params = optax.apply_updates(state.params, updates)
        metrics = step_metrics(
            stats, opt_state, previous_opt_state=state.opt_state, updates=updates, params=params,
            skip_nonfinite=self.skip_nonfinite,
        )  # fmt: skip
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return state, metrics

    def __call__(self, state, data, mask=None, *, num_microbatches: int = 1):
        """``(state, metrics)`` after one step; see `make_train_step` for the arguments."""
        if mask is None:
            mask = _ones_mask(data)
        return self.run(state, data, mask, num_microbatches)


def make_linen_train_step(
    loss_fn: LossFn,
    *,
    coordinates: bool | None = None,
    inner: bool | None = None,
    backend: str = "auto",
    stats_microbatch_size: int | None = None,
    donate: bool = False,
    skip_nonfinite: bool = True,
) -> LinenTrainStep:
    """A train step for Flax Linen: ``state, metrics = step(state, data, mask)``.

    ``state`` is a ``flax.training.train_state.TrainState``; the step computes the
    batch's `GradStats` of ``loss_fn(state.params, batch)`` and calls
    ``state.tx.update(ḡ, state.opt_state, state.params, grad_stats=stats)`` directly
    (``TrainState.apply_gradients`` does not forward extra arguments), then advances
    ``state.step``. Everything else — micro-batches, metrics, one compile per shape, the
    arguments — is as in `make_train_step`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)``; close over the module, e.g.
        ``lambda p, b: xent(model.apply({"params": p}, b["x"]), b["y"])``.

    Example:
      >>> import flax.linen as nn, jax, numpy as np, optax
      >>> from flax.training.train_state import TrainState
      >>> import adaptive_batch as ab
      >>> model = nn.Dense(2)
      >>> def loss_fn(params, batch):
      ...     logits = model.apply({"params": params}, batch["x"])
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      >>> params = model.init(jax.random.key(0), np.zeros((1, 3), np.float32))["params"]
      >>> state = TrainState.create(apply_fn=model.apply, params=params,
      ...                           tx=ab.cabs(0.1, min_batch_size=4))
      >>> step = ab.training.make_linen_train_step(loss_fn)
      >>> data = {"x": np.ones((8, 3), np.float32), "y": np.zeros(8, np.int32)}
      >>> state, metrics = step(state, data)
      >>> int(state.step), int(metrics["count"])
      (1, 8)
    """
    return LinenTrainStep(
        loss_fn,
        coordinates=coordinates,
        inner=inner,
        backend=backend,
        stats_microbatch_size=stats_microbatch_size,
        donate=donate,
        skip_nonfinite=skip_nonfinite,
    )
