"""Train steps: one jitted function per model style, compiled once per batch shape.

A step computes the `GradStats` of a padded batch (exactly accumulated over its
micro-batches, see `batch_stats`), feeds the mean gradient and the statistics to the
Optax transform (``tx.update(ḡ, opt_state, params, grad_stats=stats)``), applies the
updates and returns device-scalar metrics (mean loss, count, the suggested batch
size). Its compiled shape is ``(padded_size, num_microbatches)``: a run visits one
shape per bucket of the `BatchSizeController`, so it compiles at most once per bucket.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from adaptive_batch.stats import GradStats, per_example_stats
from adaptive_batch.stats._validation import check_mask_values
from adaptive_batch.training._accumulate import batch_stats, step_batch
from adaptive_batch.training._chain_check import refuse_misplaced_optimizer
from adaptive_batch.training._devices import replicate_uncommitted
from adaptive_batch.training._metrics import keep_if_skipped, step_metrics
from adaptive_batch.training._plain import plain_stats_fn

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

#: (coordinates, inner) settings of `per_example_stats`, cheapest first.
_STATS_OPTIONS = ((False, False), (True, False), (False, True), (True, True))


def _abstract(tree: PyTree) -> PyTree:
    """Shapes and dtypes (and, of device arrays, weak types and committed shardings:
    lowering with them gives the same executable, and cache entry, as the arrays)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            # An uncommitted array may move; naming its device would key another entry.
            sharding = x.sharding if x.committed else None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)
        return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x))

    return jax.tree.map(leaf, tree)


def needed_stats(
    tx, params, opt_state, coordinates=None, inner=None, extra=None
) -> tuple[bool, bool] | None:
    """The cheapest (coordinates, inner) statistics ``tx`` accepts, found by abstract
    evaluation of ``tx.update`` (no FLOPs): a transform that needs a sum it is not given
    raises a TypeError (the package's ``grad_stats`` contract). Explicit settings win.

    None: ``tx`` runs without ``grad_stats`` (a plain Optax transform) and neither
    setting was given, so the step needs only the mean gradient. ``extra``: the other
    extra arguments the step passes (its batch), given to every probe.
    """
    params, opt_state = _abstract(params), _abstract(opt_state)
    extra = _abstract(extra or {})
    if coordinates is None and inner is None:
        try:
            jax.eval_shape(lambda p, s, e: tx.update(p, s, p, **e), params, opt_state, extra)
        except Exception:  # any failure without grad_stats: it needs them
            pass
        else:
            return None
    scalar = jax.ShapeDtypeStruct((), np.float32)
    first_error = None
    for want_coordinates, want_inner in _STATS_OPTIONS:
        if coordinates is not None and want_coordinates != coordinates:
            continue
        if inner is not None and want_inner != inner:
            continue
        stats = GradStats(
            count=scalar,
            loss_sum=scalar,
            grad_sum=params,
            sq_norm_sum=scalar,
            sq_sum=params if want_coordinates else None,
            inner_sum=scalar if want_inner else None,
            inner_sq_sum=scalar if want_inner else None,
        )
        try:
            jax.eval_shape(
                lambda p, s, g, e: tx.update(g.grad_sum, s, p, grad_stats=g, **e),
                params, opt_state, stats, extra,
            )  # fmt: skip
        except TypeError as error:
            first_error = first_error or error
            continue
        return want_coordinates, want_inner
    raise first_error


class TrainStep:
    """A jitted train step over a padded batch; the base of the model-style adapters.

    Subclasses define ``_update(carry, data, mask, num_microbatches) -> (carry,
    metrics)``, a pure function of pytrees, and how the user's objects map to the
    ``carry`` (`to_carry`, `from_carry`). `fit` drives any of them the same way.

    Attributes:
      name: the jitted function's name; JAX reports its compiles as ``jit(name)``
        (see `CompileCounter`).
    """

    name = "train_step"

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        coordinates,
        inner,
        backend,
        stats_microbatch_size,
        donate,
        skip_nonfinite,
    ):
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a function loss_fn(params, batch) -> per-example losses of "
                f"shape (B,), got {loss_fn!r}."
            )
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}.")
        self.loss_fn = loss_fn
        self.skip_nonfinite = skip_nonfinite
        self._coordinates, self._inner = coordinates, inner
        self._options: dict[Any, tuple[bool, bool]] = {}  # per transform: (coordinates, inner)
        self._stats_fns: dict[tuple[bool, bool], Any] = {}
        self._stats_kwargs = {"backend": backend, "microbatch_size": stats_microbatch_size}
        # Validate the statistics options now rather than at the first step.
        per_example_stats(loss_fn, **self._stats_kwargs)

        def update(carry, data, mask, num_microbatches):
            new_carry, metrics = self._update(carry, data, mask, num_microbatches)
            if self.skip_nonfinite:  # a non-finite step changes nothing
                new_carry = keep_if_skipped(metrics["skipped"] != 0, carry, new_carry)
            # Every scalar metric in one float32 vector (sorted names): one transfer to
            # the host per step in `fit` instead of one per metric.
            summary = jax.numpy.stack([metrics[k].astype(np.float32) for k in sorted(metrics)])
            return new_carry, metrics, summary

        update.__name__ = update.__qualname__ = self.name
        self._jitted = jax.jit(
            update, static_argnames=("num_microbatches",), donate_argnums=(0,) if donate else ()
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[int, int], concurrent.futures.Future] = {}

    # ------------------------------------------------------------------ statistics

    def _stats_fn(self, coordinates: bool, inner: bool):
        key = (coordinates, inner)
        if key not in self._stats_fns:
            self._stats_fns[key] = per_example_stats(
                self.loss_fn, coordinates=coordinates, inner=inner, **self._stats_kwargs
            )
        return self._stats_fns[key]

    def stats(self, tx, params, opt_state, data, mask, num_microbatches, loss_fn=None) -> GradStats:
        """The batch's `GradStats`, with the sums ``tx`` needs (traced, inside the step)."""
        if tx not in self._options:
            # Plain arrays, as tx.update sees them (Flax NNX wraps them in Variables).
            pure = _as_pure((params, opt_state))
            refuse_misplaced_optimizer(pure[1])
            extra_args_tx = optax.with_extra_args_support(tx)
            extra = step_batch(data, mask, num_microbatches)
            if _inside_multisteps(opt_state):
                _refuse_rules_inside_multisteps(extra_args_tx, *pure, extra)
            self._options[tx] = needed_stats(
                extra_args_tx, *pure, self._coordinates, self._inner, extra
            )
        if self._options[tx] is None:  # a plain transform: the mean gradient is enough
            stats_fn = plain_stats_fn(self.loss_fn if loss_fn is None else loss_fn)
            return batch_stats(
                stats_fn, None, params, data, mask, num_microbatches=num_microbatches
            )
        coordinates, inner = self._options[tx]
        if loss_fn is None:
            stats_fn = self._stats_fn(coordinates, inner and num_microbatches == 1)
            loss_fn = self.loss_fn
        else:  # a loss bound to this trace (Flax NNX): build its statistics function here
            stats_fn = per_example_stats(
                loss_fn, coordinates=coordinates, inner=inner and num_microbatches == 1,
                **self._stats_kwargs,
            )  # fmt: skip
        return batch_stats(
            stats_fn, loss_fn, params, data, mask, num_microbatches=num_microbatches, inner=inner
        )

    # ------------------------------------------------------------------ running

    def _update(self, carry, data, mask, num_microbatches):
        raise NotImplementedError

    def to_carry(self, state):
        """The pytree the compiled step carries, from the user's training state."""
        return state

    def from_carry(self, carry, state):
        """The user's training state from the carry (Flax NNX: written back into it)."""
        del state
        return carry

    def run(self, carry, data, mask, num_microbatches: int = 1):
        """One step on the carry: ``(carry, metrics)``. Waits for an ahead-of-time compile
        of this shape if one is running."""
        carry, metrics, _ = self.run_with_summary(carry, data, mask, num_microbatches)
        return carry, metrics

    def run_with_summary(self, carry, data, mask, num_microbatches: int = 1):
        """`run`, plus the metrics as one float32 vector in the order of
        ``sorted(metrics)`` (what `fit` reads to the host: one transfer a step)."""
        check_mask_values(mask)
        key = (_rows(data), num_microbatches)
        future = self._ahead.get(key)
        if future is None:  # compiled by this call: nothing to compile ahead for it
            self._ahead[key] = _DONE
        else:
            future.result()
        return self._jitted(carry, data, mask, num_microbatches=num_microbatches)

    def compile(self, carry, data, mask, num_microbatches: int = 1):
        """Compile the step for this shape now (``jit(...).lower(...).compile()``); the
        arguments may be arrays or ``jax.ShapeDtypeStruct``. JAX caches the executable,
        so the next call with this shape does not compile again."""
        return self._jitted.lower(carry, data, mask, num_microbatches=num_microbatches).compile()

    def compile_ahead(
        self, carry, data, mask, num_microbatches: int = 1
    ) -> concurrent.futures.Future:
        """Start `compile` on a background thread; `run` waits for it when it needs it."""
        key = (_rows(data), num_microbatches)
        if key not in self._ahead:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, "adaptive_batch_compile")
            carry, data, mask = _abstract((carry, data, mask))
            self._ahead[key] = self._executor.submit(
                self.compile, carry, data, mask, num_microbatches
            )
        return self._ahead[key]

    def close(self) -> None:
        """Wait for the background compiles and stop their thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


_DONE: concurrent.futures.Future = concurrent.futures.Future()
_DONE.set_result(None)


def _refuse_rules_inside_multisteps(tx, params, opt_state, extra) -> None:
    """A TypeError if ``tx``, an ``optax.MultiSteps``, wraps a transform that reads
    ``grad_stats`` (a plain optimizer inside it is fine; ``extra``: the step's other
    extra arguments, its batch)."""
    try:
        jax.eval_shape(
            lambda p, s, e: tx.update(p, s, p, **e),
            _abstract(params), _abstract(opt_state), _abstract(extra),
        )  # fmt: skip
    except Exception:  # it reads statistics
        raise TypeError(
            "optax.MultiSteps hands the batch-size rules the statistics of its last "
            "micro-step only, not of the k it accumulates, so they would decide from 1/k "
            "of the batch. Use the train step's exact micro-batching instead: "
            "step(..., num_microbatches=k), or fit with "
            "BatchSizeController(max_microbatch_size=...)."
        ) from None


def _multi_device_sharding(tree):
    """The sharding of the first array of ``tree`` placed over several devices, if any."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and leaf.committed and len(leaf.sharding.device_set) > 1:
            return leaf.sharding
    return None


def _as_pure(tree):
    """Flax NNX Variables as their plain arrays, as ``tx.update`` sees them. Flax is not
    imported here: a tree can only hold Variables if the caller imported it already."""
    nnx = sys.modules.get("flax.nnx")
    return tree if nnx is None else nnx.as_pure(tree)


def _inside_multisteps(opt_state) -> bool:
    def is_multisteps(x):
        return isinstance(x, optax.MultiStepsState)

    leaves = jax.tree.leaves(_as_pure(opt_state), is_leaf=is_multisteps)
    return any(is_multisteps(leaf) for leaf in leaves)


def _rows(data) -> int:
    leaves = jax.tree.leaves(data)
    return int(np.shape(leaves[0])[0]) if leaves else 0


def _ones_mask(data):
    return np.ones((_rows(data),), bool)


class PlainTrainStep(TrainStep):
    """`make_train_step`'s step: ``step(params, opt_state, data, mask)``."""

    def __init__(self, loss_fn, tx, **kwargs):
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(
                f"tx must be an optax.GradientTransformation (with init and update), got "
                f"{tx!r}. Pass for example adaptive_batch.cabs(0.1) or optax.adam(1e-3)."
            )
        self.tx = optax.with_extra_args_support(tx)
        super().__init__(loss_fn, **kwargs)

    def _update(self, carry, data, mask, num_microbatches):
        params, opt_state = carry
        stats = self.stats(self.tx, params, opt_state, data, mask, num_microbatches)
        updates, new_opt_state = self.tx.update(
            stats.mean_grad_like(params), opt_state, params, grad_stats=stats,
            **step_batch(data, mask, num_microbatches),
        )  # fmt: skip
        params = optax.apply_updates(params, updates)
        metrics = step_metrics(
            stats, new_opt_state, previous_opt_state=opt_state, updates=updates, params=params,
            skip_nonfinite=self.skip_nonfinite,
        )  # fmt: skip
        return (params, new_opt_state), metrics

    def to_carry(self, state):
        if not (isinstance(state, tuple | list) and len(state) == 2):
            raise TypeError(
                f"a make_train_step step trains state=(params, opt_state), got "
                f"{type(state).__name__}. For a Flax Linen TrainState use "
                "make_linen_train_step, for (model, optimizer) of Flax NNX "
                "make_nnx_train_step."
            )
        params, opt_state = state
        nnx = sys.modules.get("flax.nnx")  # imported by the caller if it holds NNX objects
        if nnx and (isinstance(params, nnx.Module) or isinstance(opt_state, nnx.Optimizer)):
            raise TypeError(
                "state=(model, optimizer) of Flax NNX needs make_nnx_train_step(loss_fn), "
                "not make_train_step (which trains a pytree of parameters)."
            )
        return params, opt_state

    def __call__(self, params, opt_state, data, mask=None, *, num_microbatches: int = 1):
        """``(params, opt_state, metrics)`` after one step on the batch ``data``.

        ``mask``: ``(rows,)``, 1 for real examples and 0 for padding (None: all real).
        ``num_microbatches``: k, accumulate over k micro-batches (rows ``j::k``)."""
        if mask is None:
            mask = _ones_mask(data)
        carry = self.to_carry((params, opt_state))
        sharding = _multi_device_sharding((carry, data))
        if sharding is not None:
            # Optimizer states start with uncommitted scalars (a step count) that the
            # step returns replicated over the mesh: placed so now, the second call
            # has the first one's input types and does not compile again.
            carry = replicate_uncommitted(carry, sharding)
        (params, opt_state), metrics = self.run(carry, data, mask, num_microbatches)
        return params, opt_state, metrics


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    coordinates: bool | None = None,
    inner: bool | None = None,
    backend: str = "auto",
    stats_microbatch_size: int | None = None,
    donate: bool = False,
    skip_nonfinite: bool = True,
) -> PlainTrainStep:
    r"""Build ``step(params, opt_state, data, mask, *, num_microbatches=1)``.

    One step on a padded batch of P = k·m rows (mask 1 for the b real ones):

    .. math::

        S = \sum_{j<k} \mathrm{stats}(w, \text{rows } j::k),\qquad
        \bar g = S.\mathrm{grad\_sum} / b,

        (u, s') = \mathrm{tx.update}(\bar g, s, w, \mathrm{grad\_stats}=S),\qquad
        w' = w + u.

    The statistics `GradStats` are sums, so accumulating over micro-batches is exact.
    The inner-product sums (``inner=True``) use the whole batch's ḡ as direction: with
    k > 1 they take a second scan over the micro-batches, one ``jax.jvp`` of the
    per-example losses each — one extra forward-mode pass over the batch, the same
    extra pass as on an unsplit batch (see `adaptive_batch.training._accumulate`).

    The returned step is jitted with ``num_microbatches`` static: it compiles once per
    ``(padded rows, num_microbatches)``, i.e. once per bucket of a
    `BatchSizeController`. Its metrics (device scalars, nothing is read to the host) are
    ``loss`` (mean over real rows), ``count``, ``batch_size`` (the next batch size the
    rules in ``tx`` want, int32, when ``tx`` has a rule), ``learning_rate`` (under
    ``optax.inject_hyperparams``), ``grad_norm`` and ``update_norm``, ``finite`` and
    ``skipped`` (see `step_metrics`).

    A step whose loss, mean gradient or update has a non-finite entry (a NaN or inf
    example, an overflow) changes nothing with ``skip_nonfinite=True`` (the default):
    parameters, optimizer state and the suggested batch size stay as they were, and
    ``metrics["skipped"]`` is 1. `fit` counts these steps, warns at the first and stops
    after a run of them. NaN or inf in *padding* rows never reaches any number.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses, each depending on
        its own example only.
      tx: any Optax transform. A plain one (``optax.adam``: it runs without
        ``grad_stats``) gets only the mean gradient, from one ``jax.value_and_grad``:
        no per-example work (`GradStats` with ``sq_norm_sum=None``).
      coordinates, inner: which optional sums to compute (`per_example_stats`). None:
        the cheapest set ``tx`` accepts, found once by abstract evaluation. Give
        either to compute per-example statistics even for a plain transform.
      backend, stats_microbatch_size: `per_example_stats`'s ``backend`` and
        ``microbatch_size`` (memory chunks inside one micro-batch).
      donate: donate params and optimizer state buffers to the step (saves memory;
        the inputs may not be used after the call).
      skip_nonfinite: keep the state unchanged on a non-finite step (True), or apply
        whatever the update is, NaN included (False: the raw behaviour).

    Returns:
      A `PlainTrainStep`, callable as ``params, opt_state, metrics = step(params,
      opt_state, data, mask, num_microbatches=k)``, and usable by `fit` with
      ``state=(params, opt_state)``.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> import adaptive_batch as ab
      >>> def loss_fn(w, batch):
      ...     return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
      >>> tx = ab.norm_test(0.5, min_batch_size=4)
      >>> step = ab.training.make_train_step(loss_fn, tx)
      >>> w = jnp.zeros(3)
      >>> data = {"x": np.ones((8, 3), np.float32), "y": np.arange(8, dtype=np.float32)}
      >>> mask = np.arange(8) < 6  # 6 real rows padded to 8
      >>> w, state, metrics = step(w, tx.init(w), data, mask)
      >>> int(metrics["count"]), metrics["batch_size"].dtype
      (6, dtype('int32'))
    """
    return PlainTrainStep(
        loss_fn,
        tx,
        coordinates=coordinates,
        inner=inner,
        backend=backend,
        stats_microbatch_size=stats_microbatch_size,
        donate=donate,
        skip_nonfinite=skip_nonfinite,
    )
