"""`Loader`: batches of any size each step, every example once per epoch, resumable.

The loader reads the example stream of `EpochOrder` (one fresh permutation per epoch,
epochs back to back): a batch of n is the next n examples of the stream, padded with
zero rows to the plan's ``padded_size``, so changing n every step neither drops nor
repeats an example. The position after the last batch taken is its whole state.

Batches are asked for in order. ``loader.next(plan)`` builds one now. With
``prefetch=N`` a background thread builds them ahead: ``loader.request(plan)`` queues a
plan as soon as it is known (with ``BatchSizeController(lag=1)`` that is one step
early), ``loader.next()`` takes the oldest requested batch, and at most N finished
batches wait in memory. ``loader.iterate(plans)`` does both for a known sequence.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from adaptive_batch._limits import MAX_REPRESENTABLE_BATCH
from adaptive_batch.control import BatchPlan
from adaptive_batch.control._checks import as_int, state_int
from adaptive_batch.data import _placement
from adaptive_batch.data._order import EpochOrder
from adaptive_batch.data._prefetch import Prefetcher
from adaptive_batch.data._sources import as_source, flatten

PyTree = Any


class Batch(NamedTuple):
    """One batch: stacked examples, their mask and where they came from.

    Attributes:
      data: the structure of one example of the source, each leaf with a leading axis
        of ``padded_size`` rows; rows ``batch_size:`` are zero padding. NumPy arrays, or
        ``jax.Array`` placed with the loader's ``sharding``.
      mask: ``(padded_size,)`` bool, True for the first ``batch_size`` (real) rows.
      batch_size: the number of real rows (the plan's, or fewer at the end of an epoch
        with ``span_epochs=False``).
      epoch, index: position of the first row in the stream: epoch number and index
        within that epoch's order. A batch that crosses the end of the epoch continues
        at index 0 of epoch + 1. `Loader.example_indices` gives the source indices.
      num_microbatches: the plan's number of micro-batches (1 for a plain size).

    ``batch.plan`` gives the `adaptive_batch.BatchPlan` the batch was built for, so a
    loop needs no queue of plans beside the loader's. All fields are arrays or ints,
    so a whole `Batch` can be passed to a jitted function.
    """

    data: PyTree
    mask: Any
    batch_size: int
    epoch: int
    index: int
    num_microbatches: int = 1

    @property
    def plan(self) -> BatchPlan:
        """The plan of this batch: its real rows, padded rows and micro-batches."""
        padded_size = int(np.shape(self.mask)[0])
        return BatchPlan(self.batch_size, padded_size, self.num_microbatches)


class _Builder:
    """Builds the batch at a stream position: a pure function of its arguments.

    Kept apart from `Loader` so the prefetch thread does not hold the loader alive.
    """

    def __init__(self, source, order: EpochOrder, span_epochs: bool, sharding):
        self.source, self.order, self.span_epochs, self.sharding = (
            source,
            order,
            span_epochs,
            sharding,
        )

    def advance(self, position: int, batch_size: int) -> int:
        if self.span_epochs:
            return position + batch_size
        index = position % self.order.num_examples
        return position + min(batch_size, self.order.num_examples - index)

    def __call__(self, position: int, plan: BatchPlan) -> Batch:
        padded_size = plan.padded_size
        indices = self.order.take(position, plan.batch_size, span_epochs=self.span_epochs)
        start, stop = 0, padded_size
        if self.sharding is not None:  # with several processes, only this one's rows
            start, stop = _placement.local_rows(self.sharding, padded_size)
        data = self._gather(indices[start:stop], stop - start, indices)
        mask = np.zeros((stop - start,), bool)
        mask[: max(0, len(indices) - start)] = True
        if self.sharding is not None:
            data, mask = _placement.place(data, mask, self.sharding, padded_size)
        epoch, index = divmod(position, self.order.num_examples)
        return Batch(data, mask, len(indices), epoch, index, plan.num_microbatches)

    def _gather(self, rows, size, indices):
        if len(rows) or not len(indices):
            return self.source.gather(rows, size)
        # This process holds padding only: read one example for the structure, zero it.
        data = self.source.gather(indices[:1], size)
        for leaf in flatten(data)[0]:
            leaf[:] = 0
        return data


class Loader:
    """Batches of a changing size from a data source, each example once per epoch.

    Args:
      source: a dict or tuple of NumPy arrays sharing a leading example axis (a batch
        is one ``np.take`` per array), or a random-access source: ``len(source)`` and
        ``source[i]`` returning one example (the Grain ``RandomAccessDataSource``
        protocol: ``grain.MapDataset``, ``tfds.data_source``, a list of examples).
      seed: the order of epoch e is ``np.random.default_rng((seed, e)).permutation``.
      shuffle: False reads every epoch in source order.
      span_epochs: True (training): a batch that reaches the end of an epoch continues
        into the next epoch. False (evaluation): it stops there, with fewer real rows,
        so each batch holds examples of one epoch only.
      prefetch: how many batches a background thread may build ahead (0: none; batches
        are built in `next`). See `request`.
      sharding: a ``jax.sharding.Sharding`` to ``jax.device_put`` data and mask with
        (in the prefetch thread when there is one); the padded size must then split
        evenly over the batch axis' shards. None: NumPy arrays on the host.

    Example:
      >>> import numpy as np
      >>> from adaptive_batch.data import Loader
      >>> source = {"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)}
      >>> with Loader(source, seed=0) as loader:
      ...     a = loader.next(3)
      ...     b = loader.next(4)  # 2 more from epoch 0, then 2 from epoch 1's order
      >>> sorted(np.concatenate([a.data["y"], b.data["y"][:2]]).tolist())
      [0, 1, 2, 3, 4]
      >>> b.mask.tolist(), (b.epoch, b.index), (loader.epoch, loader.index)
      ([True, True, True, True], (0, 3), (1, 2))
    """

    def __init__(
        self,
        source: Any,
        *,
        seed: int = 0,
        shuffle: bool = True,
        span_epochs: bool = True,
        prefetch: int = 0,
        sharding: Any = None,
    ):
        self.seed = as_int("seed", seed, minimum=0)
        for name, flag in (("shuffle", shuffle), ("span_epochs", span_epochs)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.shuffle, self.span_epochs = shuffle, span_epochs
        self.prefetch = as_int("prefetch", prefetch, minimum=0, hint="Use 0 for no prefetch.")
        if sharding is not None:
            _placement.check_sharding(sharding)
        self.sharding = sharding
        self._source = as_source(source)
        order = EpochOrder(len(self._source), self.seed, shuffle)
        self._build = _Builder(self._source, order, span_epochs, sharding)
        self._position = 0  # stream position after the last batch taken by `next`
        self._requests: deque[tuple[int, BatchPlan, int]] = deque()  # (start, plan, end)
        self._prefetcher: Prefetcher | None = None
        self._stop_prefetcher: weakref.finalize | None = None
        self._closed = False

    # ------------------------------------------------------------------ position

    @property
    def num_examples(self) -> int:
        """Examples in one epoch (the source's length)."""
        return len(self._source)

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._position // self.num_examples

    @property
    def index(self) -> int:
        """The index, within `epoch`'s order, of the next batch's first example."""
        return self._position % self.num_examples

    @property
    def pending(self) -> int:
        """Batches requested with `request` and not yet taken with `next`."""
        return len(self._requests)

    # ------------------------------------------------------------------ batches

    def request(self, n_or_plan: Any) -> None:
        """Ask for the batch after the ones already requested (does not wait).

        With ``prefetch > 0`` the background thread starts building it at once; take
        it with ``next()``. Requests are served in order.

        Args:
          n_or_plan: a number of examples (padded to itself), or a plan with
            ``batch_size`` and ``padded_size`` (a `adaptive_batch.BatchPlan`); see
            `next` for the sizes accepted.
        """
        self._check_open()
        plan = _as_plan(n_or_plan)
        self._check_size(plan)
        start = self._requests[-1][2] if self._requests else self._position
        end = self._build.advance(start, plan.batch_size)
        self._requests.append((start, plan, end))
        if self.prefetch:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(self._build, depth=self.prefetch)
                self._stop_prefetcher = weakref.finalize(self, self._prefetcher.close)
            self._prefetcher.submit(start, plan)

    def next(self, n_or_plan: Any = None) -> Batch:
        """The next batch: of ``n_or_plan`` if given, else the oldest requested one.

        ``next(plan)`` is ``request(plan)`` then ``next()``, and needs no requests to
        be waiting (their batches come first). After it returns, `state_dict` counts
        the batch as read.

        A batch larger than the source (``n > num_examples``) continues through the
        next epochs' orders with ``span_epochs=True``, so it holds some examples twice
        or more; with ``span_epochs=False`` it stops at the end of the epoch, with at
        most ``num_examples`` real rows and the rest padding.

        Raises:
          TypeError / ValueError: for a size that is not a whole number >= 1, a plan
            with ``batch_size > padded_size``, or a batch that cannot be built: more
            than 2**30 rows (the largest batch size of the rules and the
            `BatchSizeController`), or more bytes than the host's memory.
          RuntimeError: ``next(plan)`` while requests wait, ``next()`` with none, or
            after `close`.
        """
        self._check_open()
        if n_or_plan is not None:
            if self._requests:
                raise RuntimeError(
                    f"{len(self._requests)} requested batch(es) come before this one; take "
                    "them with next() (no argument) first, or request this one too."
                )
            self.request(n_or_plan)
        elif not self._requests:
            raise RuntimeError(
                "no batch was requested; call next(n_or_plan), or request(n_or_plan) first."
            )
        start, plan, end = self._requests[0]
        try:
            if self._prefetcher is not None:
                batch = self._prefetcher.result()
            else:
                batch = self._build(start, plan)
        except BaseException:
            self._cancel()  # later requests assumed this one; drop them all
            raise
        self._requests.popleft()
        self._position = end
        return batch

    def iterate(self, plans: Iterable[Any]) -> Iterator[Batch]:
        """Yield one batch per entry of ``plans`` (sizes or plans), requesting ahead.

        Keeps up to ``max(prefetch, 1)`` requests in flight. Stopping early (``break``)
        drops the requests not yet taken, so the position is after the last batch
        yielded.
        """
        if self._requests:
            raise RuntimeError("iterate() needs no pending requests; take them with next().")
        plans = iter(plans)
        try:
            for plan in itertools.islice(plans, max(self.prefetch, 1)):
                self.request(plan)
            while self._requests:
                batch = self.next()
                for plan in itertools.islice(plans, 1):
                    self.request(plan)
                yield batch
        finally:
            self._cancel()

    def example_indices(self, epoch: int, index: int, count: int) -> np.ndarray:
        """The source indices of ``count`` examples from position (``epoch``, ``index``)
        of the stream: e.g. of a batch, ``example_indices(b.epoch, b.index,
        b.batch_size)``, to look at the examples of a step that went wrong."""
        epoch = as_int("epoch", epoch, minimum=0)
        index = as_int("index", index, minimum=0)
        count = as_int("count", count, minimum=0)
        position = epoch * self.num_examples + index
        return self._build.order.take(position, count, span_epochs=self.span_epochs)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch taken by `next`, as plain ints.

        Requests not yet taken are not part of it: after `load_state_dict`, request
        them again (a loop that requests ``controller.plan`` first does).
        """
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict`; drops pending requests."""
        missing = {"epoch", "index", "seed", "shuffle", "num_examples"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict from state_dict().")
        for key in ("seed", "shuffle", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the state was saved with {key}={state[key]!r}, but this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same source and settings."
                )
        epoch = state_int(state, "epoch", minimum=0, owner="Loader")
        index = state_int(state, "index", minimum=0, owner="Loader")
        if index >= self.num_examples:
            raise ValueError(
                f"state['index']={index} is not below num_examples={self.num_examples}."
            )
        self._cancel()
        self._position = epoch * self.num_examples + index

    def _check_size(self, plan: BatchPlan) -> None:
        """Refuse at once a batch that could never be built.

        Two bounds, both independent of the data set's size, since a batch above it is
        normal (a cap above the training set: the batch continues into the next epoch):
        2**30 rows, what the rules and the controller can ask for at most; and the
        host's memory, which the batch's rows and its int64 stream indices must fit in.
        Without them a huge request spends minutes drawing permutations, then swaps or
        dies of memory.
        """
        rows = plan.padded_size
        if rows > MAX_REPRESENTABLE_BATCH:
            raise ValueError(
                f"a batch of {rows} rows is above {MAX_REPRESENTABLE_BATCH} (2**30), the "
                "largest batch size the rules and the BatchSizeController can ask for. Request "
                f"at most {MAX_REPRESENTABLE_BATCH} rows (this source has {self.num_examples} "
                "examples; a larger batch repeats them)."
            )
        row_bytes, memory = self._source.row_nbytes, _host_memory()
        if row_bytes is None or memory is None:
            return  # not known yet (a random-access source before its first read)
        if self.sharding is not None and not self.sharding.is_fully_addressable:
            start, stop = _placement.local_rows(self.sharding, rows)
            rows = stop - start  # several processes: this host builds its rows only
        needed = rows * row_bytes + plan.batch_size * 8
        if needed > memory:
            raise ValueError(
                f"a batch of {plan.padded_size} rows of {row_bytes} bytes needs {needed:,} "
                f"bytes of host memory, more than this host's {memory:,}. Request fewer rows: "
                "lower the controller's max_batch_size (this source has "
                f"{self.num_examples} examples; a larger batch repeats them)."
            )

    # ------------------------------------------------------------------ shutdown

    def _cancel(self) -> None:
        """Drop every pending request and stop the prefetch thread (restarted on demand)."""
        if self._stop_prefetcher is not None:
            self._stop_prefetcher()
        self._prefetcher = self._stop_prefetcher = None
        self._requests.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the loader is closed; make a new Loader to read more batches.")

    def close(self) -> None:
        """Stop the prefetch thread (waiting for the batch it builds) and drop requests."""
        self._cancel()
        self._closed = True

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader(num_examples={self.num_examples}, seed={self.seed}, shuffle="
            f"{self.shuffle}, span_epochs={self.span_epochs}, prefetch={self.prefetch}, "
            f"epoch={self.epoch}, index={self.index}, pending={self.pending})"
        )


@functools.cache
def _host_memory() -> int | None:
    """The host's physical memory in bytes; None where the OS does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _as_plan(n_or_plan: Any) -> BatchPlan:
    """The `BatchPlan` of a size (n rows, no padding) or a plan-like object, checked."""
    if hasattr(n_or_plan, "batch_size") and hasattr(n_or_plan, "padded_size"):
        batch_size = as_int("plan.batch_size", n_or_plan.batch_size, minimum=1)
        padded_size = as_int("plan.padded_size", n_or_plan.padded_size, minimum=1)
        if batch_size > padded_size:
            raise ValueError(
                f"plan.batch_size={batch_size} is above plan.padded_size={padded_size}; a "
                "plan pads the batch up, never down. Use a BatchSizeController's plans."
            )
        if isinstance(n_or_plan, BatchPlan):
            return n_or_plan
        return BatchPlan(batch_size, padded_size, getattr(n_or_plan, "num_microbatches", 1))
    n = as_int(
        "the batch size",
        n_or_plan,
        minimum=1,
        hint="Pass a number of examples >= 1, or a BatchPlan.",
    )
    return BatchPlan(n, n)
