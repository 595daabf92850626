"""What `fit` returns or raises, and the loop position it saves in checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from adaptive_batch.control import BatchSizeController
from adaptive_batch.training._metrics import History


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the trained state, in the form given to `fit` (``(params, opt_state)``, a
        Linen ``TrainState``, or ``(model, optimizer)`` updated in place for NNX).
      history: per-step and per-evaluation records (`History`).
      steps: steps taken (counting those before a resume); examples: real examples
        seen; wall_time: seconds of training (steps, data and compiles; evaluations
        and checkpoints excluded), also counting those before a resume.
      compiles: compiles of the train step in this process (``jax.monitoring``
        events, including ahead-of-time compiles on the background thread).
      controller: the controller (its ``history`` holds the batch-size changes).
      skipped_steps: steps whose loss, gradient or update was not finite, skipped
        (the state kept) by a step built with ``skip_nonfinite=True``.
      stopped: why the loop ended: ``"budget"``, ``"interrupted"`` (Ctrl-C),
        ``"terminated"`` (SIGTERM) or ``"nonfinite"`` (see `NonFiniteError`).
      resumed_step: the checkpoint step the run continued from (0: a new run).
    """

    state: Any
    history: History
    steps: int
    examples: int
    wall_time: float
    compiles: int
    controller: BatchSizeController
    skipped_steps: int = 0
    stopped: str = "budget"
    resumed_step: int = 0


class NonFiniteError(FloatingPointError):
    """`fit` stopped after ``max_nonfinite_steps`` non-finite steps in a row.

    Attributes:
      result: the `FitResult` at the stop (with a skipping step, the state of the
        last finite step, which checkpoints written during the run of non-finite
        steps hold too; without skipping, none is written during that run).
    """

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class LoopCounters:
    """The loop's position (saved in checkpoints)."""

    steps: int = 0
    examples: int = 0
    wall_time: float = 0.0
    skipped_steps: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row, up to the last one read
    warned: bool = False
