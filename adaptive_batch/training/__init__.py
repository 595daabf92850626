"""Training: train steps for plain JAX, Flax NNX and Flax Linen, and the `fit` loop.

A step computes the batch's `GradStats` (accumulated exactly over micro-batches),
calls the Optax transform with ``grad_stats=`` and returns device-scalar metrics; it
compiles once per padded shape. `fit` drives controller → loader → step.
"""

from adaptive_batch.training._fit import FitResult, fit
from adaptive_batch.training._linen import LinenTrainStep, make_linen_train_step
from adaptive_batch.training._metrics import CompileCounter, History, step_metrics
from adaptive_batch.training._nnx import NnxTrainStep, make_nnx_train_step
from adaptive_batch.training._step import PlainTrainStep, TrainStep, make_train_step

__all__ = [
    "CompileCounter",
    "FitResult",
    "History",
    "LinenTrainStep",
    "NnxTrainStep",
    "PlainTrainStep",
    "TrainStep",
    "fit",
    "make_linen_train_step",
    "make_nnx_train_step",
    "make_train_step",
    "step_metrics",
]
