"""`fit`: compiles per bucket (counted with JAX's own monitoring events), exact budgets,
the history, evaluation, ahead-of-time compiles, and argument checks."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_batch as ab

FEATURES = 4


def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2


def make_source(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(1.0, FEATURES + 1)).astype(np.float32)}


class GrowState(NamedTuple):
    batch_size: jax.Array  # () int32, found by ab.suggested_batch_size


def grow_rule(factor=1.5, start=16) -> optax.GradientTransformationExtraArgs:
    """A stand-in batch-size rule: asks for ``factor`` times the current batch size."""

    def init_fn(params):
        del params
        return GrowState(jnp.asarray(start, jnp.int32))

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra):
        del params, extra
        wanted = jnp.ceil(grad_stats.count * factor).astype(jnp.int32)
        return updates, GrowState(jnp.maximum(wanted, state.batch_size))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class CompileEvents:
    """Counts JAX's backend-compile events per function, independently of the library."""

    def __init__(self):
        self.names = []

    def __call__(self, event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(kwargs.get("fun_name"))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)

    def count(self, name):
        return self.names.count(f"jit({name})")


def grow_run(buckets, *, compile_ahead=False, lag=0, max_microbatch_size=None):
    tx = optax.chain(grow_rule(), optax.sgd(1e-3))
    step = ab.make_train_step(loss_fn, tx)
    controller = ab.BatchSizeController(
        16,
        4096,
        buckets=buckets,
        lag=lag,
        max_microbatch_size=max_microbatch_size,
        fill_buckets=False,  # exact sizes: many distinct sizes share each bucket
    )
    w = jnp.zeros(FEATURES)
    with CompileEvents() as events:
        result = ab.fit(
            step,
            (w, tx.init(w)),
            make_source(6000),
            controller,
            steps=22,
            compile_ahead=compile_ahead,
            progress=False,
        )
    return result, events.count(step.name)


def test_growing_run_compiles_once_per_bucket():
    result, compiles = grow_run("pow2", max_microbatch_size=1024)
    sizes = result.history.column("batch_size")
    assert sizes[0] == 16 and sizes[-1] == 4096
    assert len(set(sizes)) >= 15  # many distinct sizes...
    padded = {(r["padded_size"], r["num_microbatches"]) for r in result.history.steps}
    assert len(padded) == 9  # ...in the 9 buckets 16, 32, ..., 4096
    assert (4096, 4) in padded  # the largest bucket ran as 4 micro-batches
    assert compiles == 9  # JAX's monitoring events: once per bucket
    assert result.compiles == 9  # the library's own counter agrees
    assert result.history.steps[-1]["compiles"] == 9


def test_exact_sizes_compile_once_per_size():
    result, compiles = grow_run(None)
    assert compiles == len(set(result.history.column("padded_size"))) > 9


def test_compile_ahead_adds_no_compiles_and_precompiles_the_next_bucket():
    result, compiles = grow_run("pow2", compile_ahead=True, lag=1)
    assert compiles == 9
    # Every bucket was compiled before the step that first used it.
    first_use = {}
    for record in result.history.steps:
        first_use.setdefault(record["padded_size"], record)
    late = [size for size, record in first_use.items() if size > 16 and record["compiles"] == 0]
    assert not late


def schedule_rule(sizes) -> optax.GradientTransformationExtraArgs:
    """A stand-in rule that asks for ``sizes[k]`` after its k-th step (then the last)."""
    table = jnp.asarray(sizes, jnp.int32)

    def init_fn(params):
        del params
        return GrowState(table[0]), jnp.zeros((), jnp.int32)

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra):
        del params, grad_stats, extra
        k = jnp.minimum(state[1] + 1, len(sizes) - 1)
        return updates, (GrowState(table[k]), state[1] + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_compile_ahead_compiles_each_bucket_once_as_the_batch_grows_and_shrinks():
    # Up through the buckets 16..128, down to 16 and up again: a controller that may
    # shrink compiles the bucket below ahead too, and never one a step compiled itself.
    sizes = [16] * 3 + [30] * 3 + [60] * 3 + [120] * 3 + [16] * 3 + [100] * 3
    tx = optax.chain(schedule_rule(sizes), optax.sgd(1e-3))
    step = ab.make_train_step(loss_fn, tx)
    controller = ab.BatchSizeController(16, 128, buckets="pow2", monotone=False)
    w = jnp.zeros(FEATURES)
    with CompileEvents() as events:
        result = ab.fit(
            step, (w, tx.init(w)), make_source(3000), controller, steps=len(sizes),
            compile_ahead=True, progress=False,
        )  # fmt: skip
    padded = [r["padded_size"] for r in result.history.steps]
    assert padded == [16] * 3 + [32] * 3 + [64] * 3 + [128] * 3 + [16] * 3 + [128] * 3
    assert events.count(step.name) == 4  # 16, 32, 64, 128: once each
    first_use = {}
    for record in result.history.steps:
        first_use.setdefault(record["padded_size"], record["compiles"])
    # 32 and 64 were started after step 1, 128 when 32 came into use: each was compiled
    # (counted) by the time the step that first needed it ran.
    assert first_use[32] >= 2 and first_use[64] >= 3 and first_use[128] == 4


def test_aot_compile_is_reused_by_the_step():
    tx = optax.sgd(0.1)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    state = tx.init(w)
    source = make_source(64)
    mask = np.ones(64, bool)
    with CompileEvents() as events:
        step.compile_ahead((w, state), source, mask).result()
        assert events.count(step.name) == 1
        step(w, state, source, mask)
        step(w, state, source, mask)
    assert events.count(step.name) == 1
    step.close()


@pytest.mark.parametrize("lag", [0, 1])
def test_epoch_budget_is_exact_and_history_is_complete(lag):
    tx = ab.cabs(0.05, min_batch_size=8, max_batch_size=64)
    step = ab.make_train_step(loss_fn, tx)
    controller = ab.BatchSizeController(8, 64, monotone=False, lag=lag)
    w = jnp.zeros(FEATURES)
    evals = []

    def eval_fn(state):
        params, _ = state
        evals.append(params)
        return {"w0": float(params[0])}

    result = ab.fit(
        step, (w, tx.init(w)), make_source(300), controller,
        epochs=1.5, eval_fn=eval_fn, eval_every=5, log_every=3, progress=False,
    )  # fmt: skip
    steps = result.history.steps
    assert result.examples == 450 == steps[-1]["examples"] == sum(r["batch_size"] for r in steps)
    assert result.steps == len(steps) == steps[-1]["step"]
    assert steps[-1]["epoch"] == pytest.approx(1.5)
    for record in steps:
        keys = {"loss", "suggested_batch_size", "wall_time", "compiles", "padded_size"}
        assert keys <= set(record)
        assert math.isfinite(record["loss"])
        assert record["batch_size"] <= record["padded_size"]
    # The batch of step t + 1 + lag is the controller's plan for the suggestion of step t.
    for earlier, later in zip(steps, steps[1 + lag :], strict=False):
        if later is not steps[-1]:  # the last batch may be cut to the budget
            assert later["batch_size"] == min(max(earlier["suggested_batch_size"], 8), 64)
    # Evaluations every 5 steps and at the end, with the state of that step.
    assert [e["step"] for e in result.history.evals] == [
        *range(5, result.steps + 1, 5),
        *([result.steps] if result.steps % 5 else []),
    ]
    np.testing.assert_allclose(evals[-1], result.state[0])
    assert result.history.evals[-1]["w0"] == pytest.approx(float(result.state[0][0]))
    assert float(jnp.mean(loss_fn(result.state[0], make_source(300)))) < float(
        jnp.mean(loss_fn(w, make_source(300)))
    )


def test_step_and_example_budgets():
    tx = optax.sgd(0.01)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    controller = ab.BatchSizeController(10, 10)
    result = ab.fit(step, (w, tx.init(w)), make_source(100), controller, steps=7, progress=False)
    assert (result.steps, result.examples) == (7, 70)
    result = ab.fit(
        step, (w, tx.init(w)), make_source(100), controller, examples=25, steps=100, progress=False
    )
    assert (result.steps, result.examples) == (3, 25)
    assert result.history.column("batch_size") == [10, 10, 5]
    assert result.history.column("padded_size") == [10, 10, 10]  # same shape, no recompile
    assert "suggested_batch_size" not in result.history.steps[0]  # sgd has no batch-size rule


def test_fit_rejects_bad_arguments():
    tx = optax.sgd(0.01)
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    state = (w, tx.init(w))
    controller = ab.BatchSizeController(10, 10)
    source = make_source(50)
    with pytest.raises(ValueError, match="budget"):
        ab.fit(step, state, source, controller)
    with pytest.raises(ValueError, match="steps=0"):
        ab.fit(step, state, source, controller, steps=0)
    with pytest.raises(ValueError, match="epochs"):
        ab.fit(step, state, source, controller, epochs=-1)
    with pytest.raises(TypeError, match="train step"):
        ab.fit(loss_fn, state, source, controller, steps=1)
    with pytest.raises(TypeError, match="BatchSizeController"):
        ab.fit(step, state, source, 16, steps=1)
    with ab.data.Loader(source) as loader:
        loader.request(5)
        with pytest.raises(RuntimeError, match="requested"):
            ab.fit(step, state, loader, controller, steps=1)


@pytest.mark.devices(8)
def test_data_parallel_fit_matches_single_device_fit():
    devices = jax.device_count()  # 8 simulated CPU devices (tests/conftest.py)
    mesh = jax.make_mesh((devices,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tx = optax.chain(grow_rule(factor=1.3, start=8), optax.sgd(0.05))
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    results = []
    for placement in (None, sharding):
        controller = ab.BatchSizeController(
            8, 64, multiple_of=devices, max_microbatch_size=32, lag=1
        )
        with CompileEvents() as events:
            results.append(
                ab.fit(
                    ab.make_train_step(loss_fn, tx), (w, tx.init(w)), make_source(400), controller,
                    steps=14, sharding=placement, compile_ahead=True, progress=False,
                )
            )  # fmt: skip
        assert events.count(step.name) <= len(controller.buckets)
    single, parallel = results
    assert parallel.history.column("batch_size") == single.history.column("batch_size")
    assert max(parallel.history.column("num_microbatches")) == 2
    np.testing.assert_allclose(parallel.state[0], single.state[0], rtol=1e-5, atol=1e-6)
    assert parallel.state[0].sharding.is_fully_replicated


def test_default_controller_fills_the_padding_rows_with_real_examples():
    tx = optax.chain(grow_rule(factor=1.3, start=10), optax.sgd(0.01))
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    controller = ab.BatchSizeController(10, 100, buckets="pow2")  # buckets 16, 32, 64, 100
    result = ab.fit(
        step, (w, tx.init(w)), make_source(500), controller, examples=700, progress=False
    )
    steps = result.history.steps
    # 16 real rows -> asks 21 -> bucket 32, filled -> asks 42 -> 64 -> asks 84 -> 100.
    assert [r["padded_size"] for r in steps[:4]] == [16, 32, 64, 100]
    for record in steps[:-1]:
        assert record["batch_size"] == record["padded_size"]
    assert result.examples == 700 and steps[-1]["batch_size"] <= steps[-1]["padded_size"]
    # The rule sees the filled batches: it asks for 1.3 times what it got.
    assert steps[0]["suggested_batch_size"] == math.ceil(16 * 1.3)


def test_progress_bar_shows_the_batch_size(capsys):
    tx = optax.chain(grow_rule(factor=2.0, start=8), optax.sgd(0.01))
    step = ab.make_train_step(loss_fn, tx)
    w = jnp.zeros(FEATURES)
    controller = ab.BatchSizeController(8, 32)
    ab.fit(step, (w, tx.init(w)), make_source(100), controller, steps=6, log_every=2)
    shown = capsys.readouterr().err
    assert "6/6" in shown and "step" in shown
    assert "batch=32/32" in shown and "loss=" in shown


@pytest.mark.devices(2)
def test_default_prefetch_is_off_on_the_cpu_backend_and_on_for_accelerators():
    from types import SimpleNamespace

    from adaptive_batch.training._devices import default_prefetch as _default_prefetch

    assert _default_prefetch(None) == 0  # the test machine's CPU devices
    cpu = jax.sharding.NamedSharding(jax.make_mesh((2,), ("data",)), jax.sharding.PartitionSpec())
    assert _default_prefetch(cpu) == 0
    accelerator = SimpleNamespace(device_set=[SimpleNamespace(platform="gpu")])
    assert _default_prefetch(accelerator) == 2
