"""`EvalSchedule`: when `fit` evaluates, by steps, by examples, and early powers of two."""

from __future__ import annotations

import dataclasses

from adaptive_batch.control._checks import as_int


@dataclasses.dataclass(frozen=True)
class EvalSchedule:
    """When to evaluate: every ``steps`` steps, each time the examples seen cross a
    multiple of ``examples``, at steps 1, 2, 4, 8, ... (``powers_of_two``), and always
    after the last step.

    Evaluations spaced by examples compare runs whose batch sizes differ on one axis
    (a method taking many small steps and one taking few large ones see the test set
    at the same points of the data). The powers of two resolve the early steps, where
    accuracy moves fastest, for steps-to-target figures.

    Args:
      steps: evaluate after every ``steps``-th step (None: not by steps).
      examples: evaluate after the step during which the examples seen reach or pass
        a multiple of ``examples`` (None: not by examples).
      powers_of_two: also evaluate after steps 1, 2, 4, 8, ...

    Example:
      >>> schedule = EvalSchedule(examples=100, powers_of_two=True)
      >>> [s for s, seen in [(1, 30), (3, 90), (4, 120), (5, 150), (6, 210)]
      ...  if schedule.due(s, seen - 30, seen)]
      [1, 4, 6]
    """

    steps: int | None = None
    examples: int | None = None
    powers_of_two: bool = False

    def __post_init__(self):
        for name in ("steps", "examples"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_int(name, getattr(self, name), minimum=1))
        if not isinstance(self.powers_of_two, bool):
            raise TypeError(f"powers_of_two must be True or False, got {self.powers_of_two!r}.")

    def due(self, step: int, examples_before: int, examples_after: int) -> bool:
        """Whether to evaluate after ``step``, which took the examples seen from
        ``examples_before`` to ``examples_after`` (a pure function: resuming needs no
        state of the schedule)."""
        if self.steps is not None and step % self.steps == 0:
            return True
        if self.powers_of_two and step & (step - 1) == 0:
            return True
        return (
            self.examples is not None
            and examples_after // self.examples > examples_before // self.examples
        )
