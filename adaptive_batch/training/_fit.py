"""`fit`: the host loop driving controller → loader → train step, the package's one loop.

Per step the host dispatches the compiled step, hands the step's suggested batch size
(a device int32 scalar) to the controller, and requests the next batch from the loader.
The controller turns the suggestion into a Python int when it applies it: at once with
``lag=0`` (the host waits for the step), one step later with ``lag=1`` (the host builds
and ships the next batch while the device runs this step). The step's other metrics
come to the host as one float32 vector a step, read one step behind (or ``lag`` steps),
so the host never waits for the step it just dispatched; they complete the step's
record, count non-finite steps, and reach the callbacks every ``log_every`` steps.

Checkpoints (`adaptive_batch.training._checkpoint`) hold everything the loop's future
depends on, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adaptive_batch.control import BatchPlan, BatchSizeController
from adaptive_batch.data import Loader
from adaptive_batch.training._callbacks import Callback, FitStart, ProgressBar
from adaptive_batch.training._checkpoint import Checkpoints
from adaptive_batch.training._devices import (
    compile_buckets_ahead,
    default_prefetch,
    replicate_uncommitted,
)
from adaptive_batch.training._fit_result import FitResult, LoopCounters, NonFiniteError
from adaptive_batch.training._interrupt import InterruptFlag
from adaptive_batch.training._metrics import CompileCounter, History
from adaptive_batch.training._schedule import EvalSchedule
from adaptive_batch.training._step import TrainStep

#: Device metrics copied into each step's record at a flush: metric name -> record key.
_LOGGED = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "batch_size": "suggested_batch_size",
    "grad_norm": "grad_norm",
    "update_norm": "update_norm",
    "noise_scale": "noise_scale",
}


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
    eval_every: int | EvalSchedule | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: Any = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    max_nonfinite_steps: int | None = 10,
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
        `fit` warns once when its ``max_batch_size`` is above the data's number of
        examples, and once when a monotone controller refuses a smaller batch.
      steps, epochs, examples: the budget; give at least one, training stops at the
        first reached. ``epochs`` (may be fractional) and ``examples`` are exact: the
        last batch is cut short (same padded shape, no recompile). A resumed run
        counts the steps and examples before the checkpoint.
      eval_fn: ``eval_fn(state) -> {name: value}``, called as ``eval_every`` says and
        after the last step; its results go to ``history.evals`` and into the record
        of the step.
      eval_every: steps between evaluations, or an `EvalSchedule` (by steps, by
        examples, early powers of two). None: only after the last step.
      callbacks: `Callback` objects (progress, metrics files, plots...), called on
        process 0.
      checkpoint_dir: save checkpoints here (Orbax), every ``checkpoint_every`` steps
        and after the last step; each holds the carry (parameters and the whole
        optimizer state), the controller's and loader's positions, the counters and
        the history. ``keep_checkpoints``: how many of the newest to keep (None: all).
        A directory that holds checkpoints already is refused unless ``resume``.
      resume: continue from the newest checkpoint in ``checkpoint_dir`` (a new run if
        there is none): the same steps follow as in a run that was never stopped.
      max_nonfinite_steps: stop with `NonFiniteError` after this many non-finite
        steps in a row (None: never). The first one gives a ``RuntimeWarning`` that
        names the step and its examples.
      compile_ahead: compile the step for the next two buckets above the current one
        (and, for a controller with ``monotone=False``, the one below) on a background
        thread while training in the current one (``jit(...).lower(...).compile()``); a
        step that needs a bucket still compiling waits for it. It pays where a bucket
        lasts longer than its compile; on a small CPU the background compile takes a
        core from the steps. A bucket a rule jumps to beyond those compiles when used.
      log_every: pass the records to the callbacks every this many steps (each step's
        metrics come to the host one step behind, as one vector, either way).
      progress: show a tqdm progress bar (`ProgressBar`) with the batch size and loss.

    Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption), when `fit` runs in the
    main thread, stop the loop after the current step: a last evaluation and
    checkpoint, then the result with ``stopped="interrupted"`` (SIGINT) or
    ``"terminated"`` (SIGTERM). A second signal stops at once (``KeyboardInterrupt``,
    ``SystemExit``).

    Returns:
      A `FitResult` (trained state, history, counts).

    Raises:
      NonFiniteError: after ``max_nonfinite_steps`` non-finite steps in a row.

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
    _check_arguments(step, controller, steps, epochs, examples, compile_ahead, log_every)
    schedule = _as_schedule(eval_every)
    _positive_or_none("checkpoint_every", checkpoint_every)
    _positive_or_none("max_nonfinite_steps", max_nonfinite_steps)
    _positive_or_none("keep_checkpoints", keep_checkpoints)
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError(
            "checkpoint_every needs checkpoint_dir=: the directory to save checkpoints in."
        )
    if checkpoint_dir is not None and os.path.isfile(checkpoint_dir):
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is a file; pass a directory.")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=: the directory of the checkpoints.")
    if eval_every is not None and eval_fn is None:
        raise ValueError("eval_every needs eval_fn=: the function that evaluates the state.")
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Sequence):
        raise TypeError(f"callbacks must be a list of Callback objects, got {callbacks!r}.")

    own_loader = not isinstance(data, Loader)
    if own_loader:
        if prefetch is None:
            prefetch = default_prefetch(sharding)
        loader = Loader(data, seed=seed, prefetch=prefetch, sharding=sharding)
    else:
        loader = data
    if loader.pending:
        raise RuntimeError(
            f"the loader has {loader.pending} requested batch(es) waiting; fit requests its "
            "own. Take them with loader.next() first, or pass a fresh loader."
        )
    if controller.max_batch_size > loader.num_examples and loader.span_epochs:
        _warn_cap_above_data(controller.max_batch_size, loader.num_examples)
    max_steps = math.inf if steps is None else steps
    max_examples = math.inf if examples is None else examples
    if epochs is not None:
        if round(epochs * loader.num_examples) < 1:
            raise ValueError(
                f"epochs={epochs!r} of {loader.num_examples} examples is less than one "
                f"example; pass epochs >= {1 / loader.num_examples:.3g}, or examples=."
            )
        max_examples = min(max_examples, round(epochs * loader.num_examples))

    main_process = jax.process_index() == 0
    callbacks = list(callbacks) if main_process else []
    if progress and main_process:
        callbacks.insert(0, ProgressBar())
    checkpoints = None if checkpoint_dir is None else Checkpoints(checkpoint_dir, keep_checkpoints)
    counter = CompileCounter().start()
    history = History()
    counters = LoopCounters()
    carry = step.to_carry(state)
    if loader.sharding is not None:
        carry = replicate_uncommitted(carry, loader.sharding)
    resumed_step = 0
    if checkpoints is not None and not resume and checkpoints.latest_step() is not None:
        checkpoints.close()
        raise ValueError(
            f"checkpoint_dir {checkpoints.directory} holds checkpoints of another run (up to "
            f"step {checkpoints.latest_step()}); pass resume=True to continue it, or another "
            "(or an emptied) directory for a new run."
        )
    if resume and checkpoints.latest_step() is not None:
        carry, meta = checkpoints.restore(carry)
        controller.load_state_dict(meta["controller"])
        loader.load_state_dict(meta["loader"])
        counters = LoopCounters(**meta["counters"])
        history = History(steps=meta["history"]["steps"], evals=meta["history"]["evals"])
        _drop_unscheduled_eval(history, schedule if eval_fn is not None else None)
        resumed_step = counters.steps

    requested = counters.examples
    # Records whose metrics are still on the device: (record, metric names, the step's
    # summary vector, where its batch starts: (epoch, index, batch_size)).
    unread: list[tuple[dict, list[str], Any, tuple[int, int, int]]] = []
    unsent: list[dict] = []  # complete records not yet passed to the callbacks
    paused = 0.0  # seconds spent evaluating and checkpointing since `start`
    stopped = "budget"
    stop_steps: list[int] = []  # the step at which max_nonfinite_steps was reached
    bounds_warned = shrink_warned = False
    compiled_ahead_for = None  # the bucket whose next buckets compile_ahead started

    def request(plan: BatchPlan) -> None:
        nonlocal requested
        remaining = max_examples - requested
        if remaining < plan.batch_size:  # the budget ends inside this batch
            plan = dataclasses.replace(plan, batch_size=int(remaining))
        loader.request(plan)
        requested += plan.batch_size

    def read(upto: float) -> None:
        """Complete the records up to step ``upto`` (their values are ready): one
        transfer each; count the non-finite steps."""
        while unread and unread[0][0]["step"] <= upto:
            record, names, summary, position = unread.pop(0)
            values = dict(zip(names, np.asarray(summary).tolist(), strict=True))
            for name, key in _LOGGED.items():
                if name in values:
                    record[key] = values[name]
            if "suggested_batch_size" in record:
                record["suggested_batch_size"] = int(record["suggested_batch_size"])
            if values["finite"]:
                counters.nonfinite_run = 0
            else:
                counters.nonfinite_run += 1
                counters.skipped_steps += int(values["skipped"])
                if not counters.warned:
                    counters.warned = True
                    _warn_nonfinite(record["step"], bool(values["skipped"]), *position)
            record["skipped_steps"] = counters.skipped_steps
            limit = max_nonfinite_steps
            if limit is not None and counters.nonfinite_run >= limit and not stop_steps:
                stop_steps.append(record["step"])
            unsent.append(record)

    def flush(emit_last: bool = True) -> None:
        read(math.inf)
        emitted = unsent if emit_last else unsent[:-1]
        for record in emitted:
            for callback in callbacks:
                callback.on_step(record)
        del unsent[: len(emitted)]

    def result() -> FitResult:
        return FitResult(
            state=step.from_carry(carry, state), history=history, steps=counters.steps,
            examples=counters.examples, wall_time=counters.wall_time,
            compiles=counter.count(step.name), controller=controller,
            skipped_steps=counters.skipped_steps, stopped=stopped, resumed_step=resumed_step,
        )  # fmt: skip

    def save() -> None:
        if checkpoints is None or (counters.nonfinite_run and not step.skip_nonfinite):
            return  # never a checkpoint of the parameters of a non-finite raw step
        meta = {
            "controller": controller.state_dict(),
            "loader": loader.state_dict(),
            "counters": dataclasses.asdict(counters),
            "history": history.as_dict(),
        }
        checkpoints.save(counters.steps, carry, meta)

    for callback in callbacks:
        callback.on_start(FitStart(resumed_step, max_steps, max_examples, history))
    interrupt = InterruptFlag()
    start = time.perf_counter()
    base_wall = counters.wall_time
    final = counters.steps >= max_steps or counters.examples >= max_examples
    try:
        with interrupt:
            if not final:
                request(controller.plan)
            while not final:
                batch = loader.next()
                plan = batch.plan
                carry, metrics, summary = step.run_with_summary(
                    carry, batch.data, batch.mask, plan.num_microbatches
                )
                if compile_ahead and plan.padded_size != compiled_ahead_for:
                    # After the step is dispatched (and its own bucket compiled): two
                    # compiles at once on a small CPU slow the first step down.
                    compile_buckets_ahead(step, controller, carry, batch)
                    compiled_ahead_for = plan.padded_size
                counters.steps += 1
                before, counters.examples = counters.examples, counters.examples + batch.batch_size
                # Reads step (steps - lag)'s suggestion, the one value the next plan needs.
                next_plan = controller.next(metrics.get("batch_size"))
                if controller.outside_bounds is not None and not bounds_warned:
                    bounds_warned = True
                    _warn_bounds(controller)
                if controller.refused_shrink is not None and not shrink_warned:
                    shrink_warned = True
                    _warn_refused_shrink(controller)
                final = (
                    counters.steps >= max_steps or requested >= max_examples or interrupt.is_set()
                )
                if not final:
                    request(next_plan)
                counters.wall_time = base_wall + time.perf_counter() - start - paused
                record = {
                    "step": counters.steps,
                    "examples": counters.examples,
                    "epoch": counters.examples / loader.num_examples,
                    "batch_size": batch.batch_size,
                    "padded_size": plan.padded_size,
                    "num_microbatches": plan.num_microbatches,
                    "wall_time": counters.wall_time,
                    "compiles": counter.count(step.name),
                    "skipped_steps": counters.skipped_steps,
                }
                history.steps.append(record)
                position = (batch.epoch, batch.index, batch.batch_size)
                unread.append((record, sorted(metrics), summary, position))
                # Read a step behind (or the controller's lag): the host never waits for
                # the step it just dispatched, so the device always has one queued.
                read(counters.steps - max(controller.lag, 1))
                evaluate = eval_fn is not None and (
                    final or schedule.due(counters.steps, before, counters.examples)
                )
                checkpoint = checkpoints is not None and (
                    final or (checkpoint_every and counters.steps % checkpoint_every == 0)
                )
                if counters.steps % log_every == 0 or final or evaluate or checkpoint:
                    flush(emit_last=not evaluate)
                if stop_steps:
                    raise _Stop(stop_steps[0])
                if evaluate or checkpoint:
                    pause = time.perf_counter()
                    if evaluate:
                        _evaluate(eval_fn, step.from_carry(carry, state), record, history)
                        unsent.clear()  # flush left this step's record for after the evaluation
                        for callback in callbacks:
                            callback.on_step(record)
                            callback.on_eval(history.evals[-1])
                    if checkpoint:
                        save()
                    paused += time.perf_counter() - pause
            if interrupt.is_set() and counters.steps < max_steps and requested < max_examples:
                stopped = interrupt.stopped  # (a signal during the last step: the budget)
        jax.block_until_ready(carry)
    except _Stop as stop:
        stopped = "nonfinite"
        flush()
        error = NonFiniteError(
            f"{max_nonfinite_steps} non-finite steps in a row, the last at step "
            f"{stop.step}: the loss, gradient or update was NaN or inf. Look for the "
            "examples of the first (its warning names them), lower the learning rate, or "
            "pass max_nonfinite_steps=None to go on.",
            result(),
        )
        for callback in callbacks:
            callback.on_end(error.result)
        raise error from None
    finally:
        step.close()
        counter.stop()
        if checkpoints is not None:
            checkpoints.close()
        if own_loader:
            loader.close()
    outcome = result()
    for callback in callbacks:
        callback.on_end(outcome)
    return outcome


class _Stop(Exception):
    def __init__(self, step: int):
        self.step = step


def _drop_unscheduled_eval(history: History, schedule: EvalSchedule | None) -> None:
    """Forget the evaluation a stop added after the checkpoint's step (Ctrl-C, or the end
    of a shorter budget) when the schedule had none there: the resumed run then holds
    the evaluations of a run never stopped."""
    steps = history.steps
    if not steps or not history.evals or history.evals[-1]["step"] != steps[-1]["step"]:
        return
    before = steps[-2]["examples"] if len(steps) > 1 else 0
    last = steps[-1]
    if schedule is not None and schedule.due(last["step"], before, last["examples"]):
        return
    evaluation = history.evals.pop()
    for key in evaluation:
        if key not in ("step", "examples", "wall_time"):
            last.pop(key, None)


def _evaluate(eval_fn, state, record: dict, history: History) -> None:
    returned = eval_fn(state)
    if not isinstance(returned, Mapping):
        raise TypeError(
            f"eval_fn must return a dict of named results, e.g. {{'accuracy': 0.93}}, got "
            f"{type(returned).__name__}."
        )
    results = {k: _scalar(v) for k, v in returned.items()}
    record.update(results)
    history.evals.append(
        {"step": record["step"], "examples": record["examples"],
         "wall_time": record["wall_time"], **results}
    )  # fmt: skip


def _scalar(value):
    """A device or NumPy scalar as a Python number (JSON- and checkpoint-friendly)."""
    if isinstance(value, jax.Array | np.ndarray | np.generic) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _warn_nonfinite(step: int, skipped: bool, epoch: int, index: int, count: int) -> None:
    what = (
        "it was skipped: parameters, optimizer state and batch size are unchanged"
        if skipped
        else "its update was applied (skip_nonfinite=False)"
    )
    warnings.warn(
        f"step {step} was non-finite (NaN or inf in the loss, gradient, update or new "
        f"state); {what}. "
        f"Its {count} examples start at epoch {epoch}, index {index} of the loader's "
        f"order: loader.example_indices({epoch}, {index}, {count}) gives their indices in "
        "the source (the loader fit made: "
        "adaptive_batch.data.Loader(data, seed=seed)); evaluate loss_fn on them to find "
        "the culprits. Warned once per run; FitResult.skipped_steps counts them.",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_bounds(controller: BatchSizeController) -> None:
    lo, hi = controller.min_batch_size, controller.max_batch_size
    warnings.warn(
        f"the batch-size rule asked for {controller.outside_bounds} examples, outside the "
        f"controller's bounds [{lo}, {hi}], so the controller clamped it: the rule and the "
        "BatchSizeController have different bounds. State them once: give the rule the "
        f"controller's min_batch_size={lo} and max_batch_size={hi} (or the controller the "
        "rule's). Warned once per run.",
        UserWarning,
        stacklevel=3,
    )


def _warn_refused_shrink(controller: BatchSizeController) -> None:
    warnings.warn(
        f"the batch-size rule asked for {controller.refused_shrink} examples, below the "
        f"current batch of {controller.plan.batch_size}, but the BatchSizeController has "
        "monotone=True (the default), so the batch did not shrink and the rule's choice was "
        "overridden. For a rule that may shrink the batch, such as CABS (cabs, cabs_rule), "
        "pass BatchSizeController(..., monotone=False). Warned once per run; "
        "controller.refused_shrink holds the last such suggestion.",
        UserWarning,
        stacklevel=3,
    )


def _warn_cap_above_data(max_batch_size: int, num_examples: int) -> None:
    warnings.warn(
        f"the controller's max_batch_size={max_batch_size} is above the {num_examples} "
        f"examples of the data: a batch above {num_examples} continues into the next "
        "epoch, so it holds some examples twice. Pass max_batch_size="
        f"{num_examples} (to the BatchSizeController and to the rule) to stop at full-batch "
        "training.",
        UserWarning,
        stacklevel=3,
    )


def _as_schedule(eval_every) -> EvalSchedule:
    if eval_every is None:
        return EvalSchedule()
    if isinstance(eval_every, EvalSchedule):
        return eval_every
    _positive_or_none("eval_every", eval_every)
    return EvalSchedule(steps=eval_every)


def _positive_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be a positive int (or None).")


def _check_arguments(step, controller, steps, epochs, examples, compile_ahead, log_every):
    if not isinstance(step, TrainStep):
        raise TypeError(
            f"step must be a train step from make_train_step, make_nnx_train_step or "
            f"make_linen_train_step, got {step!r}."
        )
    if not isinstance(controller, BatchSizeController):
        raise TypeError(f"controller must be a BatchSizeController, got {controller!r}.")
    if steps is None and epochs is None and examples is None:
        raise ValueError(
            "fit needs a budget: pass steps=, epochs= or examples= (training stops at the "
            "first one reached)."
        )
    _positive_or_none("steps", steps)
    _positive_or_none("examples", examples)
    if epochs is not None and not (isinstance(epochs, int | float) and 0 < epochs < math.inf):
        raise ValueError(f"epochs={epochs!r} must be a positive number of epochs (or None).")
    if not isinstance(compile_ahead, bool):
        raise TypeError(f"compile_ahead must be True or False, got {compile_ahead!r}.")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every={log_every!r} must be a positive int.")
