"""Step metrics, the training history, and counting compiles with ``jax.monitoring``."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaptive_batch.stats import GradStats
from adaptive_batch.transforms import suggested_batch_size

#: The ``jax.monitoring`` event JAX records once per XLA compilation (jax >= 0.4.3x),
#: with the keyword ``fun_name="jit(<function name>)"``.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ---------------------------------------------------------------------- step metrics


def _find_learning_rate(opt_state) -> jax.Array | None:
    """The ``learning_rate`` of an ``optax.inject_hyperparams`` state, if there is one."""
    nodes = jax.tree.leaves(
        opt_state, is_leaf=lambda n: isinstance(getattr(n, "hyperparams", None), dict)
    )
    for node in nodes:
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, dict) and "learning_rate" in hyperparams:
            return jnp.asarray(hyperparams["learning_rate"], jnp.float32)
    return None


def _all_finite(tree) -> jax.Array:
    """True when every floating-point entry of ``tree`` is finite (other leaves: ignored)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.ones((), bool)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def step_metrics(
    stats: GradStats,
    opt_state,
    *,
    previous_opt_state=None,
    updates=None,
    params=None,
    skip_nonfinite: bool = False,
) -> dict[str, jax.Array]:
    """The metrics a train step returns (device scalars; nothing is read to the host).

    * ``loss``: mean loss over the real examples of the batch, F̂ = Σℓᵢ / b.
    * ``count``: b, the number of real examples (float32).
    * ``grad_norm``: ‖ḡ‖ of the mean gradient; ``update_norm``: ‖u‖ of the update
      (when ``updates`` is given), so ‖u‖ / ‖ḡ‖ is the step's effective learning rate.
    * ``finite``: the loss and every entry of the new parameters (when given) and the
      new optimizer state are finite. A NaN or inf in the gradient or the update
      reaches one of them (or was masked by the optimizer, doing no harm); a finite but
      overflowing update too.
    * ``skipped``: 1 when the step was skipped (``skip_nonfinite`` and not ``finite``:
      the train step then keeps its parameters and optimizer state), else 0 (int32).
    * ``batch_size``: the batch size the optimizer's rules want next (int32), when the
      state holds one (`adaptive_batch.suggested_batch_size`); a skipped step keeps
      the one of ``previous_opt_state``.
    * ``learning_rate``: when the optimizer was built with ``optax.inject_hyperparams``.
    * ``noise_scale``: when the statistics hold Σ‖gᵢ‖², this batch's gradient noise
      scale `GradStats.noise_scale` (tr Σ̂ / ‖ḡ‖²).
    """
    metrics = {
        "loss": stats.mean_loss,
        "count": stats.count,
        "grad_norm": optax.tree.norm(stats.mean_grad),
    }
    if updates is not None:
        metrics["update_norm"] = optax.tree.norm(updates)
    # A NaN or inf in the gradient or the update reaches the new parameters or the
    # optimizer state (or was masked by the optimizer, and then did no harm): checking
    # the new state finds it, and a finite but overflowing update too.
    finite = jnp.isfinite(stats.loss_sum) & _all_finite(opt_state)
    if params is not None:
        finite &= _all_finite(params)
    skipped = jnp.logical_not(finite) if skip_nonfinite else jnp.zeros((), bool)
    metrics["finite"] = finite
    metrics["skipped"] = skipped.astype(jnp.int32)
    with contextlib.suppress(ValueError):  # no batch-size rule: a fixed batch size
        batch_size = suggested_batch_size(opt_state)
        if previous_opt_state is not None:
            batch_size = jnp.where(skipped, suggested_batch_size(previous_opt_state), batch_size)
        metrics["batch_size"] = batch_size
    if stats.sq_norm_sum is not None:
        metrics["noise_scale"] = stats.noise_scale()
    learning_rate = _find_learning_rate(opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    return metrics


def keep_if_skipped(skipped: jax.Array, before, after):
    """``before`` where the step was skipped, else ``after`` (leaf by leaf, in the step)."""
    return jax.tree.map(lambda old, new: jnp.where(skipped, old, new), before, after)


# ---------------------------------------------------------------------- compiles


class CompileCounter:
    """Counts XLA compilations, per jitted function name, from ``jax.monitoring`` events.

    JAX records the event ``/jax/core/compile/backend_compile_duration`` with
    ``fun_name="jit(name)"`` each time it compiles; a hit in JAX's in-memory cache
    records nothing. The counter listens while it is open (a context manager, or
    `start` / `stop`). Listeners are process-wide: compiles from other threads count
    too, which is what ahead-of-time compiles in a background thread need.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def double(x):
      ...     return 2 * x
      >>> f = jax.jit(double)
      >>> with CompileCounter() as compiles:
      ...     _ = f(jnp.ones(3)); _ = f(jnp.ones(3)); _ = f(jnp.ones(4))
      >>> compiles.count("double")
      2
    """

    def __init__(self):
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._active = False

    def _listen(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self._counts[str(kwargs.get("fun_name", ""))] += 1

    def start(self) -> CompileCounter:
        if not self._active:
            jax.monitoring.register_event_duration_secs_listener(self._listen)
            self._active = True
        return self

    def stop(self) -> None:
        if self._active:
            jax.monitoring.unregister_event_duration_listener(self._listen)
            self._active = False

    def __enter__(self) -> CompileCounter:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def count(self, name: str | None = None) -> int:
        """Compiles of the jitted function ``name`` (``fun_name == f"jit({name})"``), or
        of everything when ``name`` is None."""
        with self._lock:
            if name is None:
                return sum(self._counts.values())
            return self._counts.get(f"jit({name})", 0)

    @property
    def counts(self) -> dict[str, int]:
        """Compiles per ``fun_name`` seen so far."""
        with self._lock:
            return dict(self._counts)


# ---------------------------------------------------------------------- history


@dataclasses.dataclass
class History:
    """What `fit` recorded: one dict per step, and one per evaluation.

    ``steps[i]`` holds ``step`` (1-based count of steps done), ``examples`` (real
    examples seen so far), ``epoch`` (fractional epochs), ``batch_size`` (real rows of
    the batch), ``padded_size``, ``num_microbatches``, ``suggested_batch_size`` (what
    the method asked for next, when it has a batch-size rule), ``learning_rate`` (when
    the optimizer exposes it), ``loss`` (mean over the batch), ``grad_norm`` and
    ``update_norm``, ``wall_time`` (seconds of training so far: evaluations and
    checkpoints excluded), ``skipped_steps`` (non-finite steps skipped so far) and
    ``compiles`` (train-step compiles so far); on an evaluation step also the
    evaluation's results. ``evals[j]`` holds ``step``, ``examples``, ``wall_time`` and
    what ``eval_fn`` returned.
    """

    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def column(self, name: str) -> list[Any]:
        """``[record.get(name) for record in steps]``, e.g. ``history.column("loss")``."""
        return [record.get(name) for record in self.steps]

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Plain lists and dicts (JSON-friendly)."""
        return {"steps": list(self.steps), "evals": list(self.evals)}

    def __len__(self) -> int:
        return len(self.steps)
