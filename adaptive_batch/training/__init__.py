"""Training: train steps for plain JAX, Flax NNX and Flax Linen, and the `fit` loop.

A step computes the batch's `GradStats` (accumulated exactly over micro-batches),
calls the Optax transform with ``grad_stats=`` and returns device-scalar metrics; it
compiles once per padded shape. `fit` drives controller → loader → step, with
evaluations, callbacks, Orbax checkpoints and exact resume.
"""

from adaptive_batch.training._callbacks import (
    Callback,
    FitStart,
    MetricsWriter,
    ProgressBar,
    to_json_line,
)
from adaptive_batch.training._checkpoint import strict_json
from adaptive_batch.training._fit import fit
from adaptive_batch.training._fit_result import FitResult, NonFiniteError
from adaptive_batch.training._linen import LinenTrainStep, make_linen_train_step
from adaptive_batch.training._metrics import CompileCounter, History, step_metrics
from adaptive_batch.training._schedule import EvalSchedule
from adaptive_batch.training._step import PlainTrainStep, TrainStep, make_train_step


def __getattr__(name: str):
    # The Flax NNX adapter imports Flax (0.7 s): only for those who use it.
    if name in ("NnxTrainStep", "make_nnx_train_step"):
        from adaptive_batch.training import _nnx

        return getattr(_nnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Callback",
    "CompileCounter",
    "EvalSchedule",
    "FitResult",
    "FitStart",
    "History",
    "LinenTrainStep",
    "MetricsWriter",
    "NnxTrainStep",
    "NonFiniteError",
    "PlainTrainStep",
    "ProgressBar",
    "TrainStep",
    "fit",
    "make_linen_train_step",
    "make_nnx_train_step",
    "make_train_step",
    "step_metrics",
    "strict_json",
    "to_json_line",
]
