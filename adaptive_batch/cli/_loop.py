"""The command's training loop: controller → loader → one jitted step → metrics.

A small host loop on top of `BatchSizeController`, `Loader`, `per_example_stats` and the
transforms. Each step: the controller's plan says how many examples to read and which
padded (bucketed) shape to compile; the step computes the per-example statistics (for
an adaptive method) or a plain gradient (for a constant-batch baseline), updates the
parameters, and returns the batch size the method wants next. Wall time counts the
steps (compilation included, as a user waits for it) and not the evaluations.

Why not `adaptive_batch.training.fit`: a comparison on one examples budget needs
test evaluations spaced by examples (``fit`` spaces them by steps, and prints a line
for each), wall time without the evaluations, and constant-batch baselines that take
a plain gradient (``make_train_step`` computes per-example statistics for every
optimizer, which would charge the baselines the adaptive methods' cost).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptive_batch as ab
from adaptive_batch.cli._methods import Method
from adaptive_batch.control import BatchPlan, BatchSizeController
from adaptive_batch.data import Loader
from adaptive_batch.datasets import Dataset
from adaptive_batch.models import ModelFns


@dataclasses.dataclass
class LoopConfig:
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


def _masked_mean(values, mask):
    count = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(jnp.where(mask, values, 0)) / count


def make_step(fns: ModelFns, tx, method: Method, stats_backend: str):
    """The jitted step ``(params, opt_state, data, mask) -> (params, opt_state, metrics)``."""
    stats_fn = None
    if method.adaptive:
        stats_fn = ab.per_example_stats(
            fns.loss_fn, coordinates=method.coordinates, inner=method.inner, backend=stats_backend
        )

    def step(params, opt_state, data, mask):
        if stats_fn is not None:
            stats = stats_fn(params, data, mask)
            loss, grad = stats.mean_loss, stats.mean_grad
            updates, opt_state = tx.update(grad, opt_state, params, grad_stats=stats)
            suggested = ab.suggested_batch_size(opt_state)
        else:
            loss, grad = jax.value_and_grad(lambda p: _masked_mean(fns.loss_fn(p, data), mask))(
                params
            )
            updates, opt_state = tx.update(grad, opt_state, params)
            suggested = jnp.asarray(-1, jnp.int32)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "suggested_batch_size": suggested,
            "grad_norm": optax.tree.norm(grad),
            "update_norm": optax.tree.norm(updates),
        }
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_evaluate(fns: ModelFns):
    """Jitted ``(params, data) -> (mean loss, accuracy)`` over a whole split."""

    @jax.jit
    def evaluate(params, data):
        loss = jnp.mean(fns.loss_fn(params, data))
        accuracy = jnp.mean(fns.correct_fn(params, data).astype(jnp.float32))
        return loss, accuracy

    return evaluate


def _sharding(devices: int):
    if devices == 1:
        return None
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def run(
    fns: ModelFns,
    dataset: Dataset,
    config: LoopConfig,
    *,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
    progress: Any = None,
) -> tuple[dict[str, Any], Any]:
    """Train until ``config.examples`` examples were used; return (summary, params).

    ``on_row`` gets one dict per step (``step``, ``batch_size``, ``loss``, ``examples``,
    ``wall_time``, ``lr``, ``effective_lr``, and ``test_loss`` / ``test_accuracy`` on
    evaluation steps). ``progress`` is a tqdm-like bar advanced by examples.
    """
    method = config.method
    tolerance = method.default_tolerance if config.tolerance is None else config.tolerance
    tx = method.make(config.lr, config.min_batch_size, config.max_batch_size, tolerance)
    step_fn = make_step(fns, tx, method, config.stats_backend)
    evaluate = make_evaluate(fns)
    if method.adaptive:
        controller = BatchSizeController(
            config.min_batch_size,
            config.max_batch_size,
            monotone=method.monotone,
            buckets="pow2",
            multiple_of=config.devices,
            fill_buckets=config.fill_buckets,
        )
    else:
        controller = BatchSizeController(
            config.batch_size, config.batch_size, buckets=None, multiple_of=config.devices
        )
    sharding = _sharding(config.devices)
    test_data = jax.tree.map(jnp.asarray, dataset.test)
    params = jax.tree.map(jnp.array, fns.params)  # a copy: the step donates its input
    opt_state = tx.init(params)
    eval_every = max(1, math.ceil(config.examples / max(config.evals, 1)))
    next_eval = eval_every
    examples = steps = 0
    wall = 0.0
    row: dict[str, Any] = {}
    with Loader(dataset.train, seed=config.seed, sharding=sharding) as loader:
        while examples < config.examples:
            plan = controller.plan
            # The last batch is cut to the budget, so every method sees exactly as many.
            take = min(plan.batch_size, config.examples - examples)
            start = time.perf_counter()
            batch = loader.next(BatchPlan(take, plan.padded_size))
            params, opt_state, metrics = step_fn(params, opt_state, batch.data, batch.mask)
            metrics = jax.device_get(metrics)
            wall += time.perf_counter() - start
            steps += 1
            examples += batch.batch_size
            grad_norm = float(metrics["grad_norm"])
            row = {
                "step": steps,
                "batch_size": int(batch.batch_size),
                "padded_size": int(plan.padded_size),
                "loss": float(metrics["loss"]),
                "examples": examples,
                "wall_time": wall,
                "lr": config.lr,
                "effective_lr": float(metrics["update_norm"]) / grad_norm if grad_norm else 0.0,
                "grad_norm": grad_norm,
            }
            if method.adaptive:
                suggested = int(metrics["suggested_batch_size"])
                row["suggested_batch_size"] = suggested
                controller.next(suggested)
            # Evaluations every budget/evals examples, and at steps 1, 2, 4, 8, ... so that
            # steps-to-target is resolved early on for methods that take many small steps.
            power_of_two = steps & (steps - 1) == 0
            if examples >= next_eval or examples >= config.examples or power_of_two:
                test_loss, test_accuracy = jax.device_get(evaluate(params, test_data))
                row["test_loss"], row["test_accuracy"] = float(test_loss), float(test_accuracy)
                while next_eval <= examples:
                    next_eval += eval_every
            on_row(row)
            if progress is not None:
                progress.update(batch.batch_size)
                # tqdm's own rate counts evaluation pauses; this is examples / training time.
                progress.set_postfix(
                    {"batch": row["batch_size"], "loss": f"{row['loss']:.3f}",
                     "ex/s": f"{examples / max(wall, 1e-9):.0f}"}, refresh=False,
                )  # fmt: skip
            if not math.isfinite(row["loss"]):
                break
    train_loss, train_accuracy = jax.device_get(
        evaluate(params, jax.tree.map(jnp.asarray, dataset.train))
    )
    summary = {
        "test_accuracy": row.get("test_accuracy", float("nan")),
        "test_loss": row.get("test_loss", float("nan")),
        "final_train_loss": float(train_loss),
        "final_train_accuracy": float(train_accuracy),
        "steps": steps,
        "examples": examples,
        "wall_time_s": wall,
        # The batch size the method ran at, not the last batch cut short by the budget.
        "final_batch_size": plan.batch_size if steps else 0,
        "diverged": not math.isfinite(row.get("loss", 0.0)),
    }
    return summary, params
