"""`BatchSizeController`: turns the batch size a method suggests into a compile-friendly plan.

Pure Python (no JAX, no NumPy), so the host loop can use it anywhere and tests run it
without devices. The rule, applied at every call of `BatchSizeController.next`:

1. clamp:     b = clip(s, min_batch_size, max_batch_size)         (s: the suggestion)
2. bucket:    P = the smallest bucket >= b                         (the compiled shape)
3. split:     k = ceil(P / max_microbatch_size),  m = round_up(ceil(P / k), multiple_of),
              padded_size = k · m  (>= P)
4. fill:      b = min(P, max_batch_size)                           (if ``fill_buckets``)
5. monotone:  b = max(b, b_prev)                                   (if ``monotone``)

so every plan satisfies min <= batch_size <= max, batch_size <= padded_size =
num_microbatches · microbatch_size, and microbatch_size % multiple_of == 0. Because the
plan depends on b only through its bucket, a run compiles one step per bucket it visits.

Why fill by default: a padding row costs the same compute as a real one, so a padded
batch of b real rows in a bucket of P runs at b / P of a fixed-batch loop's speed (45%
padding on the norm test's growth with ``"pow2"`` buckets, `benchmarks/loop.py`).
Filling gives the method at least the batch it asked for, which the adaptive sampling
tests and AdAdaGrad ask for as a *minimum*, and for CABS is a less noisy gradient at
the same learning rate. Set ``fill_buckets=False`` to run each rule's exact sizes
(sample-efficiency studies: more examples per step than asked are not free there).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from adaptive_batch._limits import MAX_REPRESENTABLE_BATCH
from adaptive_batch.control._checks import as_int, round_up, state_int

_NEGATIVE_HINT = (
    "Sizes outside [min_batch_size, max_batch_size] are clamped, but a negative one "
    "means the rule that computed it is broken (an int32 overflow?)."
)

#: How many batch-size changes `BatchSizeController.history` keeps (the most recent).
HISTORY_LIMIT = 10_000


def _representable(name: str, size: int, low: int) -> int:
    """``size`` if the rules can represent it (they keep the batch size in an int32)."""
    if size > MAX_REPRESENTABLE_BATCH:
        raise ValueError(
            f"{name}={size} is above {MAX_REPRESENTABLE_BATCH} (2**30), the largest batch size "
            f"the batch-size rules can hold (an int32 with a margin); the allowed range is "
            f"[{low}, {MAX_REPRESENTABLE_BATCH}]. Pass a bound the data and memory can serve, "
            "at most the size of the training set (larger batches repeat examples)."
        )
    return size


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The batch to build and the shapes to compile for one training step.

    Attributes:
      batch_size: real examples in the batch (the loader fills this many rows).
      padded_size: rows of the batch after padding; the compiled batch shape. Rows
        ``batch_size:padded_size`` are padding (``mask == 0``).
      num_microbatches: k, how many micro-batches the step accumulates over (1: none).
      microbatch_size: m, rows per micro-batch; ``padded_size == k * m`` and ``m`` is a
        multiple of the controller's ``multiple_of`` (the data-parallel device count).

    For data parallelism with k > 1, take micro-batch j as the rows ``j::k`` (reshape
    the batch to ``(m, k, ...)`` and move axis 1 first): then every micro-batch is
    spread evenly over the devices that hold the batch axis, with no data movement.
    """

    batch_size: int
    padded_size: int
    num_microbatches: int = 1
    microbatch_size: int | None = None

    def __post_init__(self):
        if self.microbatch_size is None:
            object.__setattr__(self, "microbatch_size", self.padded_size // self.num_microbatches)
        if not 1 <= self.batch_size <= self.padded_size:
            raise ValueError(
                f"BatchPlan needs 1 <= batch_size <= padded_size, got batch_size="
                f"{self.batch_size}, padded_size={self.padded_size}."
            )
        if self.num_microbatches * self.microbatch_size != self.padded_size:
            raise ValueError(
                f"BatchPlan needs padded_size == num_microbatches * microbatch_size, got "
                f"{self.padded_size} != {self.num_microbatches} * {self.microbatch_size}."
            )

    @property
    def num_padding(self) -> int:
        """Padding rows, ``padded_size - batch_size``."""
        return self.padded_size - self.batch_size


class BatchSizeController:
    """Host-side batch-size policy: bounds, monotone growth, buckets and micro-batches.

    A method (CABS, the adaptive sampling tests, AdAdaGrad) suggests a batch size after
    each step; the controller turns it into a `BatchPlan` for a later step (see the
    module docstring for the exact rule). Buckets keep the number of distinct compiled
    shapes small: ``"pow2"`` from 16 to 4096 gives 9.

    Args:
      min_batch_size, max_batch_size: bounds on the real batch size, 1 <= min <= max.
      initial_batch_size: batch size of the first plan (default ``min_batch_size``).
      monotone: never shrink the batch (the adaptive sampling tests and AdAdaGrad only
        grow it; CABS may shrink, set ``monotone=False`` for it: a suggestion a monotone
        controller refuses to shrink to is kept in ``refused_shrink``, and `fit` warns).
      buckets: the padded sizes to compile.

        * ``"pow2"``: the powers of two in [min, max), plus max itself; a min that is
          not a power of two starts at the next one (min=10, max=100: 16, 32, 64, 100).
          Each is rounded up to ``multiple_of`` (duplicates merged), so padding is
          less than half the batch plus ``multiple_of``.
        * a sorted list of sizes, each a multiple of ``multiple_of``, the largest >=
          max_batch_size (entries outside the bounds' range are never used).
        * ``None``: no buckets, each size rounded up to ``multiple_of`` (one compile per
          distinct size).
      multiple_of: every micro-batch size is a multiple of this (the number of devices
        the batch axis is sharded over), so shards are equal.
      max_microbatch_size: split a padded batch larger than this into ``k`` equal
        micro-batches to accumulate over (statistics are sums, so exactly). A multiple
        of ``multiple_of``. The split may round ``padded_size`` up past the bucket by
        less than ``k * multiple_of``. ``None``: never split.
      lag: how many calls of `next` late a suggestion takes effect (see `next`).
        ``lag=1`` lets the host build the next batch while the device runs this step.
      fill_buckets: True (default): the batch takes as many real examples as its
        bucket holds (up to ``max_batch_size``), so no compute goes to padding (but the
        few rows the micro-batch split adds) and the batch size moves in bucket steps.
        False: exactly the suggested size, the rest of the bucket is masked padding.

    Example:
      >>> ctrl = BatchSizeController(16, 4096, buckets="pow2", max_microbatch_size=512)
      >>> ctrl.plan
      BatchPlan(batch_size=16, padded_size=16, num_microbatches=1, microbatch_size=16)
      >>> ctrl.next(100)  # filled to its bucket
      BatchPlan(batch_size=128, padded_size=128, num_microbatches=1, microbatch_size=128)
      >>> ctrl.next(50)  # monotone: does not shrink
      BatchPlan(batch_size=128, padded_size=128, num_microbatches=1, microbatch_size=128)
      >>> ctrl.next(3000)
      BatchPlan(batch_size=4096, padded_size=4096, num_microbatches=8, microbatch_size=512)
      >>> len(ctrl.buckets)
      9
      >>> exact = BatchSizeController(16, 4096, fill_buckets=False)
      >>> exact.next(100)  # 28 rows of masked padding
      BatchPlan(batch_size=100, padded_size=128, num_microbatches=1, microbatch_size=128)

    References:
      Balles et al., "Coupling Adaptive Batch Sizes with Learning Rates" (CABS),
      https://arxiv.org/abs/1612.05086; Bollapragada et al., "Adaptive Sampling
      Strategies for Stochastic Optimization", https://arxiv.org/abs/1710.11258.
    """

    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        *,
        initial_batch_size: int | None = None,
        monotone: bool = True,
        buckets: str | Sequence[int] | None = "pow2",
        multiple_of: int = 1,
        max_microbatch_size: int | None = None,
        lag: int = 0,
        fill_buckets: bool = True,
    ):
        self.min_batch_size = _representable(
            "min_batch_size", as_int("min_batch_size", min_batch_size, minimum=1), 1
        )
        self.max_batch_size = _representable(
            "max_batch_size",
            as_int(
                "max_batch_size",
                max_batch_size,
                minimum=self.min_batch_size,
                hint="max_batch_size may not be below min_batch_size.",
            ),
            self.min_batch_size,
        )
        if initial_batch_size is None:
            initial_batch_size = self.min_batch_size
        initial = as_int("initial_batch_size", initial_batch_size, minimum=self.min_batch_size)
        if initial > self.max_batch_size:
            raise ValueError(
                f"initial_batch_size={initial} is above max_batch_size={self.max_batch_size};"
                f" choose a value in [{self.min_batch_size}, {self.max_batch_size}]."
            )
        if not isinstance(monotone, bool):
            raise TypeError(f"monotone must be True or False, got {monotone!r}.")
        self.monotone = monotone
        if not isinstance(fill_buckets, bool):
            raise TypeError(f"fill_buckets must be True or False, got {fill_buckets!r}.")
        self.fill_buckets = fill_buckets
        self.multiple_of = as_int("multiple_of", multiple_of, minimum=1)
        self.max_microbatch_size = None
        if max_microbatch_size is not None:
            cap = as_int("max_microbatch_size", max_microbatch_size, minimum=self.multiple_of)
            if cap % self.multiple_of:
                raise ValueError(
                    f"max_microbatch_size={cap} is not a multiple of multiple_of="
                    f"{self.multiple_of}; use {cap - cap % self.multiple_of} or "
                    f"{round_up(cap, self.multiple_of)}."
                )
            self.max_microbatch_size = cap
        self.lag = as_int("lag", lag, minimum=0)
        self._buckets = self._make_buckets(buckets)
        initial = self._filled(initial)
        self._batch_size = initial
        self._step = 0
        self.outside_bounds: int | None = None  # the last suggestion outside the bounds
        # The last suggestion below the batch size that ``monotone`` kept from shrinking
        # it: a rule that shrinks (CABS) under a monotone controller, which `fit` reports.
        self.refused_shrink: int | None = None
        self._pending: deque[Any] = deque([None] * self.lag)
        self._history: deque[tuple[int, int]] = deque([(0, initial)], maxlen=HISTORY_LIMIT)

    # ------------------------------------------------------------------ buckets

    def _make_buckets(self, buckets) -> tuple[int, ...] | None:
        lo, hi, mult = self.min_batch_size, self.max_batch_size, self.multiple_of
        if buckets is None:
            return None
        if isinstance(buckets, str):
            if buckets != "pow2":
                raise ValueError(
                    f"buckets={buckets!r} is not known; use 'pow2', a sorted list of sizes, "
                    "or None (exact sizes)."
                )
            sizes = [1 << k for k in range((lo - 1).bit_length(), hi.bit_length()) if 1 << k < hi]
            return tuple(sorted({round_up(s, mult) for s in [*sizes, hi]}))
        try:
            sizes = [as_int(f"buckets[{i}]", b, minimum=1) for i, b in enumerate(buckets)]
        except TypeError as error:
            if "buckets[" in str(error):
                raise
            raise TypeError(
                f"buckets must be 'pow2', a sorted list of integer sizes, or None; got {buckets!r}."
            ) from None
        if not sizes or any(a >= b for a, b in itertools.pairwise(sizes)):
            raise ValueError(
                f"buckets must be a non-empty, strictly increasing list of sizes, got {sizes}."
            )
        if sizes[-1] < hi:
            raise ValueError(
                f"the largest bucket, {sizes[-1]}, is below max_batch_size={hi}, so larger "
                f"batches would have no shape; add a bucket >= {hi} or lower max_batch_size."
            )
        off = [s for s in sizes if s % mult]
        if off:
            raise ValueError(
                f"buckets {off} are not multiples of multiple_of={mult}; use "
                f"{[round_up(s, mult) for s in off]} instead."
            )
        # Keep the buckets that some size in [lo, hi] maps to.
        first = bisect.bisect_left(sizes, lo)
        last = bisect.bisect_left(sizes, hi)
        return tuple(sizes[first : last + 1])

    @property
    def buckets(self) -> tuple[int, ...] | None:
        """The bucket sizes in use, increasing; ``None`` for exact sizes."""
        return self._buckets

    def plan_for(self, batch_size: int) -> BatchPlan:
        """The plan for ``batch_size`` examples, min <= batch_size <= max (with
        ``fill_buckets`` its ``batch_size`` is the filled size).

        Pure (changes no state): use it to compile the step for a bucket ahead of time.
        """
        size = as_int("batch_size", batch_size, minimum=self.min_batch_size)
        if size > self.max_batch_size:
            raise ValueError(
                f"batch_size={size} is above max_batch_size={self.max_batch_size}; pass a "
                f"value in [{self.min_batch_size}, {self.max_batch_size}]."
            )
        plan = self._padded_plan(size)
        if self.fill_buckets:
            plan = dataclasses.replace(plan, batch_size=self._filled(size))
        return plan

    def _bucket(self, size: int) -> int:
        if self._buckets is None:
            return round_up(size, self.multiple_of)
        return self._buckets[bisect.bisect_left(self._buckets, size)]

    def _filled(self, size: int) -> int:
        """``size`` grown to its bucket (capped at max_batch_size): the same shape.

        Not to the padded size: a micro-batch split may round that past the bucket, and
        a batch that large would belong to the next bucket.
        """
        if not self.fill_buckets:
            return size
        return max(size, min(self._bucket(size), self.max_batch_size))

    def _padded_plan(self, size: int) -> BatchPlan:
        bucket = self._bucket(size)
        k = 1 if self.max_microbatch_size is None else math.ceil(bucket / self.max_microbatch_size)
        m = round_up(math.ceil(bucket / k), self.multiple_of)
        return BatchPlan(batch_size=size, padded_size=k * m, num_microbatches=k, microbatch_size=m)

    def bucket_plans(self) -> tuple[BatchPlan, ...]:
        """One plan per bucket (its largest batch), to compile every shape ahead of time."""
        if self._buckets is None:
            raise ValueError(
                "bucket_plans() needs buckets; with buckets=None every size is its own shape."
            )
        return tuple(self.plan_for(min(b, self.max_batch_size)) for b in self._buckets)

    # ------------------------------------------------------------------ stepping

    @property
    def plan(self) -> BatchPlan:
        """The current plan: the one last returned by `next` (the initial one before)."""
        return self.plan_for(self._batch_size)

    @property
    def step(self) -> int:
        """How many times `next` has been called: the index of the current plan."""
        return self._step

    @property
    def history(self) -> tuple[tuple[int, int], ...]:
        """``(step, batch_size)`` at each change of the batch size, starting at step 0."""
        return tuple(self._history)

    def next(self, suggested: Any = None) -> BatchPlan:
        """Record the suggested batch size and return the plan for the next step.

        Call once per training step, after dispatching the step that produced
        ``suggested``. With ``lag = L`` the plan returned by the k-th call (k = 1, 2, ...)
        applies the suggestion given to call k − L; the first L calls keep the current
        batch size. So step t's suggestion sets the batch of step t + 1 + L: with
        ``lag=0`` the plan for step t + 1 comes from step t's suggestion, with
        ``lag=1`` from step t − 1's.

        The suggestion is converted to a Python int only when it is applied, L calls
        later. With ``lag=1`` a device scalar from the step just dispatched can be
        passed without waiting for it: the int read blocks only on the previous step,
        while the device already runs this one and the host prepares the next batch.

        Args:
          suggested: the batch size the method wants: a Python, NumPy or JAX integer
            scalar (a whole-number float is accepted), >= 0; values outside the bounds
            are clamped, and the last such value is kept in ``outside_bounds`` (a sign
            that the rule has other bounds than the controller; `fit` warns). With
            ``monotone=True`` the last suggestion that would have shrunk the batch is
            kept in ``refused_shrink`` (a sign that the rule, CABS for one, wants
            ``monotone=False``; `fit` warns). ``None``: no suggestion, keep the batch
            size.

        Returns:
          The `BatchPlan` for the next step (also `plan` from now on).

        Raises:
          TypeError / ValueError: for a suggestion that is not a scalar whole number
            >= 0 or not finite. Python and NumPy values are checked at once; a JAX
            array's shape and dtype at once, its value when it is applied.
        """
        self._check_early(suggested)
        self._pending.append(suggested)
        applied = self._pending.popleft()
        if applied is not None:
            asked = as_int("suggested batch size", applied, minimum=0, hint=_NEGATIVE_HINT)
            if asked > self.max_batch_size or 0 < asked < self.min_batch_size:
                self.outside_bounds = asked
            size = self._filled(min(max(asked, self.min_batch_size), self.max_batch_size))
            if self.monotone and size < self._batch_size:
                self.refused_shrink = asked
                size = self._batch_size
            if size != self._batch_size:
                self._history.append((self._step + 1, size))
            self._batch_size = size
        self._step += 1
        return self.plan

    def _check_early(self, suggested: Any) -> None:
        if suggested is None:
            return
        # A bool passes for an integer in Python (True == 1): refuse it by name.
        dtype = getattr(suggested, "dtype", None)
        if isinstance(suggested, bool) or getattr(dtype, "kind", None) == "b":
            raise TypeError(
                f"the suggested batch size must be a scalar integer, got {suggested!r}, a "
                "boolean. Pass the size the rule computed, for example "
                "suggested_batch_size(opt_state)."
            )
        if isinstance(suggested, (int, float)) or type(suggested).__module__ == "numpy":
            as_int("suggested batch size", suggested, minimum=0, hint=_NEGATIVE_HINT)
            return
        # Device arrays: check what is known without waiting for the value.
        shape, dtype = getattr(suggested, "shape", None), getattr(suggested, "dtype", None)
        if shape != () or getattr(dtype, "kind", None) not in ("i", "u", "f"):
            raise TypeError(
                "the suggested batch size must be a scalar integer (Python, NumPy or JAX), "
                f"got {suggested!r}. Pass for example suggested_batch_size(opt_state)."
            )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The controller's position as plain ints and lists (JSON- and Orbax-friendly).

        Pending suggestions (``lag > 0``) are read to ints here, which waits for the
        steps that produced them.
        """
        pending = [
            None if s is None else as_int("suggested batch size", s, minimum=0)
            for s in self._pending
        ]
        return {
            "batch_size": self._batch_size,
            "step": self._step,
            "pending": pending,
            "history": [list(h) for h in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` (on a controller with the same lag)."""
        missing = {"batch_size", "step", "pending", "history"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from state_dict().")
        size = state_int(state, "batch_size", minimum=1, owner="BatchSizeController")
        if not self.min_batch_size <= size <= self.max_batch_size:
            raise ValueError(
                f"state['batch_size']={size} is outside this controller's bounds [min_batch_size"
                f", max_batch_size] = [{self.min_batch_size}, {self.max_batch_size}]: the state "
                "comes from a controller with other bounds. Restore it into one with the same."
            )
        pending = list(state["pending"])
        if len(pending) != self.lag:
            raise ValueError(
                f"state has {len(pending)} pending suggestions but this controller has "
                f"lag={self.lag}; restore into a controller built with lag={len(pending)}."
            )
        pending = [None if s is None else as_int("pending", s, minimum=0) for s in pending]
        self._batch_size = size
        self._step = state_int(state, "step", minimum=0, owner="BatchSizeController")
        self._pending = deque(pending)
        self._history = deque(((int(s), int(b)) for s, b in state["history"]), maxlen=HISTORY_LIMIT)

    def __repr__(self) -> str:
        return (
            f"BatchSizeController(min_batch_size={self.min_batch_size}, max_batch_size="
            f"{self.max_batch_size}, monotone={self.monotone}, buckets={self._buckets}, "
            f"multiple_of={self.multiple_of}, max_microbatch_size={self.max_microbatch_size}"
            f", lag={self.lag}, fill_buckets={self.fill_buckets}, step={self._step}, "
            f"batch_size={self._batch_size})"
        )
