"""One run of the command on `adaptive_batch.training.fit`: the method's step, its
controller, test evaluations spaced by examples, callbacks and the summary.

Adaptive methods get per-example statistics (the step finds the sums their rules
need); the constant-batch baselines are plain Optax transforms, for which
`make_train_step` takes one plain gradient, so they pay no per-example cost.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import adaptive_batch as ab
from adaptive_batch.cli._methods import Method
from adaptive_batch.control import BatchSizeController
from adaptive_batch.datasets import Dataset
from adaptive_batch.models import ModelFns
from adaptive_batch.training import EvalSchedule, MetricsWriter, NonFiniteError, ProgressBar


@dataclasses.dataclass
class RunConfig:
    """What one training run does (the resolved command-line options)."""

    method: Method
    lr: float
    min_batch_size: int
    max_batch_size: int
    batch_size: int  # constant batch of the baselines
    examples: int  # the budget: training stops after this many examples
    seed: int = 0
    devices: int = 1
    evals: int = 100  # evaluations on the test set spread over the budget
    stats_backend: str = "auto"
    tolerance: float | None = None  # the test's η / θ; None: the method's default
    # The command measures each method's own batch sizes (sample efficiency), so it
    # pads to the bucket by default instead of filling it (BatchSizeController's default).
    fill_buckets: bool = False
    checkpoint_every: int | None = None  # steps; None: no checkpoints
    resume: bool = False
    compile_ahead: bool = True  # the next buckets' steps compile on a background thread


def make_evaluate(fns: ModelFns):
    """Jitted ``(params, data) -> (mean loss, accuracy)`` over a whole split."""

    @jax.jit
    def evaluate(params, data):
        loss = jnp.mean(fns.loss_fn(params, data))
        accuracy = jnp.mean(fns.correct_fn(params, data).astype(jnp.float32))
        return loss, accuracy

    return evaluate


def make_controller(config: RunConfig) -> BatchSizeController:
    """The method's controller: pow2 buckets between the bounds for an adaptive method;
    one constant size for a baseline, with ``lag=1`` (exact there: the size never
    changes), so the host requests the next batch before the step's result is read."""
    if config.method.adaptive:
        return BatchSizeController(
            config.min_batch_size,
            config.max_batch_size,
            monotone=config.method.monotone,
            buckets="pow2",
            multiple_of=config.devices,
            fill_buckets=config.fill_buckets,
        )
    return BatchSizeController(
        config.batch_size, config.batch_size, buckets=None, multiple_of=config.devices, lag=1
    )


def _sharding(devices: int):
    if devices == 1:
        return None
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def run(
    fns: ModelFns,
    dataset: Dataset,
    config: RunConfig,
    out: Path,
    *,
    description: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Train until ``config.examples`` examples were used; return (summary, rows, params).

    ``rows`` are `fit`'s step records (test results on evaluation steps), also written
    to ``out/metrics.jsonl``; checkpoints go to ``out/checkpoints``.
    """
    method = config.method
    tolerance = method.default_tolerance if config.tolerance is None else config.tolerance
    tx = method.make(config.lr, config.min_batch_size, config.max_batch_size, tolerance)
    step = ab.make_train_step(fns.loss_fn, tx, backend=config.stats_backend, donate=True)
    evaluate = make_evaluate(fns)
    test_data = jax.tree.map(jnp.asarray, dataset.test)

    def eval_fn(state):
        # Host copies of the (replicated) parameters: each process evaluates on its own.
        params = jax.device_get(state[0])
        test_loss, test_accuracy = jax.device_get(evaluate(params, test_data))
        return {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy)}

    params = jax.tree.map(jnp.array, fns.params)  # a copy: the step donates its input
    callbacks: list[Any] = [MetricsWriter(out / "metrics.jsonl", {"learning_rate": config.lr})]
    if progress:
        callbacks.append(ProgressBar(description))
    # Evaluations every budget/evals examples, and at steps 1, 2, 4, 8, ... so that
    # steps-to-target is resolved early on for methods that take many small steps.
    schedule = EvalSchedule(
        examples=max(1, math.ceil(config.examples / max(config.evals, 1))), powers_of_two=True
    )
    checkpointing = config.checkpoint_every is not None or config.resume
    stop_reason = None
    try:
        result = ab.fit(
            step, (params, tx.init(params)), dataset.train, make_controller(config),
            examples=config.examples, seed=config.seed, sharding=_sharding(config.devices),
            eval_fn=eval_fn, eval_every=schedule, callbacks=callbacks,
            checkpoint_dir=out / "checkpoints" if checkpointing else None,
            checkpoint_every=config.checkpoint_every, resume=config.resume, progress=False,
            compile_ahead=config.compile_ahead,
        )  # fmt: skip
    except NonFiniteError as error:
        result, stop_reason = error.result, str(error)
    except Exception:
        # fit passes other errors (a full disk) on without on_end: close the bar and the
        # file here, so that the command's one-line message starts a line of its own.
        for callback in callbacks:
            callback.on_end(None)
        raise
    rows = result.history.steps
    for row in rows:  # the command's optimizers do not expose their learning rate
        row.setdefault("learning_rate", config.lr)
    params = jax.device_get(result.state[0])
    train_loss, train_accuracy = (
        float(v) for v in jax.device_get(evaluate(params, jax.tree.map(jnp.asarray, dataset.train)))
    )
    last_eval = result.history.evals[-1] if result.history.evals else {}
    test_loss = last_eval.get("test_loss", math.nan)
    if stop_reason is None and not (math.isfinite(test_loss) and math.isfinite(train_loss)):
        stop_reason = (
            f"the loss of the trained parameters is not finite (test {test_loss}, "
            f"train {train_loss})"
        )
    summary = {
        "test_accuracy": last_eval.get("test_accuracy", math.nan),
        "test_loss": test_loss,
        "final_train_loss": train_loss,
        "final_train_accuracy": train_accuracy,
        "steps": result.steps,
        "examples": result.examples,
        "wall_time_s": result.wall_time,
        "compiles": result.compiles,  # of the train step, ahead-of-time ones included
        # The batch size the method planned after its last step (the last batch may
        # have been cut short by the budget).
        "final_batch_size": result.controller.plan.batch_size,
        "skipped_steps": result.skipped_steps,
        "diverged": stop_reason is not None,
        "interrupted": result.stopped in ("interrupted", "terminated"),
        "stopped": result.stopped,
        "resumed_step": result.resumed_step,
    }
    if stop_reason is not None:
        summary["diverged_because"] = stop_reason
    return summary, rows, params
