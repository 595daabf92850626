"""Pure functions of the parameters for an NNX classifier: per-example loss and accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PyTree = Any


class ModelFns(NamedTuple):
    """An NNX model split into a static graph and its parameters, and pure functions.

    Attributes:
      graphdef: the static structure (``nnx.split``); ``nnx.merge(graphdef, params)``
        rebuilds the module.
      params: the ``nnx.State`` of parameters, a pytree (the thing to optimise).
      loss_fn: ``loss_fn(params, batch) -> (B,)`` softmax cross-entropy of each example,
        ``batch = {"x": (B, ...), "y": (B,) int}``, the loss contract of
        `adaptive_batch.per_example_stats`.
      correct_fn: ``correct_fn(params, batch) -> (B,)`` bool, argmax prediction == label.
      logits_fn: ``logits_fn(params, x) -> (B, num_classes)``.
    """

    graphdef: Any
    params: PyTree
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    correct_fn: Callable[[PyTree, PyTree], jax.Array]
    logits_fn: Callable[[PyTree, jax.Array], jax.Array]


def functional(model: nnx.Module) -> ModelFns:
    r"""Split ``model`` and build its per-example loss and accuracy as pure functions.

    .. math:: \ell_i(w) = -\log \operatorname{softmax}(f_w(x_i))_{y_i}

    Each ℓᵢ depends on example i alone (the built-in models have no batch norm), so
    ``loss_fn`` can be fed to `adaptive_batch.per_example_stats`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adaptive_batch.models import functional, make_model
      >>> fns = functional(make_model("mlp", (40,), 10))
      >>> batch = {"x": jnp.zeros((3, 40)), "y": jnp.array([0, 1, 2])}
      >>> fns.loss_fn(fns.params, batch).shape
      (3,)
    """
    graphdef, params = nnx.split(model, nnx.Param)

    def logits_fn(params, x):
        return nnx.merge(graphdef, params)(jnp.asarray(x))

    def loss_fn(params, batch):
        logits = logits_fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def correct_fn(params, batch):
        return jnp.argmax(logits_fn(params, batch["x"]), axis=-1) == batch["y"]

    return ModelFns(graphdef, params, loss_fn, correct_fn, logits_fn)
