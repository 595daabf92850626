"""`fit`: the host loop driving controller → loader → train step.

Per step the host dispatches the compiled step, hands the step's suggested batch size
(a device int32 scalar) to the controller, and requests the next batch from the loader.
The controller turns the suggestion into a Python int — the one value read from the
device per step — when it applies it: at once with ``lag=0`` (the host waits for the
step), one step later with ``lag=1`` (the host builds and ships the next batch while
the device runs this step). Losses and learning rates stay on the device until the
history is flushed, every ``log_every`` steps, in one transfer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from adaptive_batch.control import BatchPlan, BatchSizeController
from adaptive_batch.data import Loader
from adaptive_batch.training._metrics import CompileCounter, History
from adaptive_batch.training._step import TrainStep

#: Metrics read to the host at each flush of the history (when the step returns them).
_LOGGED = ("loss", "learning_rate", "batch_size")


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the trained state, in the form given to `fit` (``(params, opt_state)``, a
        Linen ``TrainState``, or ``(model, optimizer)`` updated in place for NNX).
      history: per-step and per-evaluation records (`History`).
      steps: steps taken; examples: real examples seen; wall_time: seconds.
      compiles: compiles of the train step during the run (``jax.monitoring`` events,
        including ahead-of-time compiles on the background thread).
      controller: the controller (its ``history`` holds the batch-size changes).
    """

    state: Any
    history: History
    steps: int
    examples: int
    wall_time: float
    compiles: int
    controller: BatchSizeController


def fit(
    step: TrainStep,
    state: Any,
    data: Any,
    controller: BatchSizeController,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    examples: int | None = None,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    prefetch: int | None = None,
    sharding: Any = None,
    compile_ahead: bool = False,
    log_every: int = 10,
    progress: bool = True,
) -> FitResult:
    """Train with the batch size the optimizer asks for, until a budget is spent.

    Each step: take the batch the controller planned, run ``step`` on it, pass the
    step's suggested batch size to ``controller.next`` and request the batch of the
    plan it returns. Steps compile once per padded shape, so once per bucket.

    Args:
      step: a train step from `make_train_step`, `make_nnx_train_step` or
        `make_linen_train_step`.
      state: ``(params, opt_state)`` for `make_train_step`; a Flax Linen
        ``TrainState``; ``(model, optimizer)`` for Flax NNX (updated in place).
      data: an `adaptive_batch.data.Loader` (used as it is, left open), or a source
        it accepts (a dict/tuple of NumPy arrays, a random-access source); then
        ``seed``, ``prefetch`` and ``sharding`` configure the loader `fit` makes.
        ``prefetch=None``: 2 batches built ahead on a background thread when the
        batches go to an accelerator, 0 when they stay on the CPU backend (there the
        thread competes with the step for the same cores; `benchmarks/loop.py` compares
        both).
      controller: the `BatchSizeController`; its ``lag=1`` overlaps host and device.
      steps, epochs, examples: the budget; give at least one, training stops at the
        first reached. ``epochs`` (may be fractional) and ``examples`` are exact: the
        last batch is cut short (same padded shape, no recompile).
      eval_fn: ``eval_fn(state) -> {name: value}``, called every ``eval_every`` steps
        and at the end; its results go to ``history.evals``.
      eval_every: steps between evaluations (None: only at the end).
      compile_ahead: compile the step for the next bucket on a background thread
        while training in the current one (``jit(...).lower(...).compile()``).
      log_every: read the losses to the host (one transfer) and refresh the progress
        bar every this many steps.
      progress: show a tqdm progress bar with the batch size and loss.

    Returns:
      A `FitResult` (trained state, history, counts).

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> import adaptive_batch as ab
      >>> x = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
      >>> source = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
      >>> def loss_fn(w, batch):
      ...     return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
      >>> tx = ab.cabs(0.1, min_batch_size=8, max_batch_size=64)
      >>> step = ab.training.make_train_step(loss_fn, tx)
      >>> w = jnp.zeros(3)
      >>> controller = ab.BatchSizeController(8, 64, monotone=False, lag=1)
      >>> result = ab.training.fit(step, (w, tx.init(w)), source, controller,
      ...                          epochs=2, progress=False)
      >>> result.examples, result.compiles <= len(controller.buckets)
      (512, True)
    """
    if not isinstance(step, TrainStep):
        raise TypeError(
            f"step must be a train step from make_train_step, make_nnx_train_step or "
            f"make_linen_train_step, got {step!r}."
        )
    if not isinstance(controller, BatchSizeController):
        raise TypeError(f"controller must be a BatchSizeController, got {controller!r}.")
    _check_budget(steps, epochs, examples)
    if not isinstance(compile_ahead, bool):
        raise TypeError(f"compile_ahead must be True or False, got {compile_ahead!r}.")
    for name, value in (("eval_every", eval_every), ("log_every", log_every)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r} must be a positive number of steps.")

    own_loader = not isinstance(data, Loader)
    if own_loader:
        if prefetch is None:
            prefetch = _default_prefetch(sharding)
        loader = Loader(data, seed=seed, prefetch=prefetch, sharding=sharding)
    else:
        loader = data
    if loader.pending:
        raise RuntimeError(
            f"the loader has {loader.pending} requested batch(es) waiting; fit requests its "
            "own. Take them with loader.next() first, or pass a fresh loader."
        )
    max_steps = math.inf if steps is None else steps
    max_examples = math.inf if examples is None else examples
    if epochs is not None:
        max_examples = min(max_examples, round(epochs * loader.num_examples))

    counter = CompileCounter().start()
    history = History()
    plans: deque[BatchPlan] = deque()
    requested = 0

    def request(plan: BatchPlan) -> None:
        nonlocal requested
        remaining = max_examples - requested
        if remaining < plan.batch_size:  # the budget ends inside this batch
            plan = dataclasses.replace(plan, batch_size=int(remaining))
        loader.request(plan)
        plans.append(plan)
        requested += plan.batch_size

    bar = _progress_bar(progress, max_steps, max_examples)
    carry = step.to_carry(state)
    if loader.sharding is not None:
        carry = _replicate_uncommitted(carry, loader.sharding)
    pending: list[tuple[dict, dict]] = []
    done, seen = 0, 0
    start = time.perf_counter()
    try:
        request(controller.plan)
        while plans:
            plan = plans.popleft()
            batch = loader.next()
            carry, metrics = step.run(carry, batch.data, batch.mask, plan.num_microbatches)
            done += 1
            seen += batch.batch_size
            # The one device read per step (of step done - lag): inside controller.next.
            next_plan = controller.next(metrics.get("batch_size"))
            if done < max_steps and requested < max_examples:
                request(next_plan)
            if compile_ahead:
                _compile_next_bucket(step, controller, carry, batch, next_plan)
            record = {
                "step": done,
                "batch_size": batch.batch_size,
                "padded_size": plan.padded_size,
                "num_microbatches": plan.num_microbatches,
                "examples": seen,
                "epoch": seen / loader.num_examples,
                "wall_time": time.perf_counter() - start,
                "compiles": counter.count(step.name),
            }
            history.steps.append(record)
            pending.append((record, {k: metrics[k] for k in _LOGGED if k in metrics}))
            if done % log_every == 0 or not plans:
                _flush(pending)
                _show(bar, record, plan)
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or not plans):
                state = step.from_carry(carry, state)
                results = dict(eval_fn(state))
                history.evals.append(
                    {"step": done, "examples": seen, "wall_time": record["wall_time"], **results}
                )
                if bar is not None:
                    bar.write(
                        f"step {done}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results.items())
                    )
        state = step.from_carry(carry, state)
        jax.block_until_ready(carry)
    finally:
        wall_time = time.perf_counter() - start
        step.close()
        counter.stop()
        if bar is not None:
            bar.close()
        if own_loader:
            loader.close()
    return FitResult(
        state=state,
        history=history,
        steps=done,
        examples=seen,
        wall_time=wall_time,
        compiles=counter.count(step.name),
        controller=controller,
    )


def _default_prefetch(sharding) -> int:
    """2 when batches go to an accelerator; 0 on the CPU backend (no separate device to
    overlap with: the prefetch thread only takes cores from the step)."""
    devices = jax.devices() if sharding is None else list(sharding.device_set)
    return 0 if all(d.platform == "cpu" for d in devices) else 2


def _check_budget(steps, epochs, examples) -> None:
    if steps is None and epochs is None and examples is None:
        raise ValueError(
            "fit needs a budget: pass steps=, epochs= or examples= (training stops at the "
            "first one reached)."
        )
    for name, value in (("steps", steps), ("examples", examples)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r} must be a positive int (or None).")
    if epochs is not None and not (isinstance(epochs, int | float) and 0 < epochs < math.inf):
        raise ValueError(f"epochs={epochs!r} must be a positive number of epochs (or None).")


def _replicate_uncommitted(tree, sharding):
    """Replicate the arrays the user did not place over the devices the batches go to.

    A step's outputs are committed to those devices; replicating its inputs up front
    gives the first step the same compiled shape (and cache entry) as all later ones.
    """
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh):
        devices = sorted(sharding.device_set, key=lambda d: d.id)
        mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not x.committed:
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, tree)


def _flush(pending: list[tuple[dict, dict]]) -> None:
    """Read the pending metrics to the host in one transfer and fill their records."""
    values = jax.device_get([metrics for _, metrics in pending])
    for (record, _), metrics in zip(pending, values, strict=True):
        for key, value in metrics.items():
            record["suggested" if key == "batch_size" else key] = np.asarray(value).item()
    pending.clear()


def _compile_next_bucket(step, controller, carry, batch, plan: BatchPlan) -> None:
    """Start compiling the step for the bucket above ``plan``'s (if any) in the background."""
    buckets = controller.buckets
    if buckets is None:
        return
    larger = [b for b in buckets if b > plan.padded_size]
    if not larger:
        return
    target = controller.plan_for(min(larger[0], controller.max_batch_size))
    rows = target.padded_size

    def like(x):
        shape = (rows, *tuple(np.shape(x))[1:])
        committed = isinstance(x, jax.Array) and x.committed
        sharding = x.sharding if committed else None
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

    data, mask = jax.tree.map(like, (batch.data, batch.mask))
    step.compile_ahead(carry, data, mask, target.num_microbatches)


def _progress_bar(progress: bool, max_steps, max_examples):
    if not progress:
        return None
    from tqdm.auto import tqdm

    if max_examples < math.inf:
        return tqdm(total=int(max_examples), unit="ex", unit_scale=True, dynamic_ncols=True)
    return tqdm(total=int(max_steps), unit="step", dynamic_ncols=True)


def _show(bar, record: dict, plan: BatchPlan) -> None:
    if bar is None:
        return
    if bar.unit == "ex":
        bar.update(record["examples"] - bar.n)
    else:
        bar.update(record["step"] - bar.n)
    postfix = {"batch": f"{record['batch_size']}/{plan.padded_size}"}
    if "loss" in record:
        postfix["loss"] = _fmt(record["loss"])
    bar.set_postfix(postfix, refresh=False)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
