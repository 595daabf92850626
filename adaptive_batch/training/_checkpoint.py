"""Checkpoints of a `fit` run with Orbax: the step's carry and the host-side position.

A checkpoint is one Orbax step directory holding two items:

* ``state``: the leaves of the train step's carry (parameters, the whole optimizer
  state with each rule's statistics, batch size and counters, Flax NNX RNG state),
  saved with ``StandardSave``; restored onto the shardings of a fresh carry.
* ``meta``: JSON: the `BatchSizeController` and `Loader` positions (``state_dict``), the
  budget counters, the non-finite step counts and the history so far.

``CheckpointManager`` writes each step, on a background thread, to a temporary
directory and renames it when complete, so a process killed while saving leaves the
previous checkpoints intact; it keeps the newest ``keep``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The format of ``meta``; a checkpoint of another format is refused with a message.
FORMAT = 1

# JSON has no NaN or infinity: non-finite floats in the history are saved as strings.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _replace_nonfinite(value: Any, replacement) -> Any:
    """``value`` with each non-finite float x replaced by ``replacement(x)``, NumPy
    scalars made Python numbers; dicts, lists and tuples are copied (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _replace_nonfinite(v, replacement) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_nonfinite(v, replacement) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return replacement(value)
    return value


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON, RFC 8259),
    NumPy scalars made Python numbers; dicts and lists are copied."""
    return _replace_nonfinite(value, lambda x: None)


def _encode(value: Any) -> Any:
    return _replace_nonfinite(
        value, lambda x: "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


class Checkpoints:
    """The checkpoints of one run directory (an ``orbax.checkpoint.CheckpointManager``).

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                create=True,
                # A save killed half-way leaves a temporary directory: removed on open.
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, carry: Any, meta: dict[str, Any]) -> None:
        """Start saving the carry's leaves and ``meta`` as checkpoint ``step``.

        Returns once the arrays are copied to the host; a background thread writes the
        files (a new save, `restore` and `close` wait for it).
        """
        leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in jax.tree.leaves(carry)]
        args = self._ocp.args
        self._manager.save(
            step,
            args=args.Composite(
                state=args.StandardSave(leaves),
                meta=args.JsonSave({"format": FORMAT, "num_leaves": len(leaves), **_encode(meta)}),
            ),
        )

    def restore(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint: ``(carry, meta)``, the carry shaped and placed as
        ``like`` (a carry of the same model and optimizer, e.g. the fresh one)."""
        self._manager.wait_until_finished()
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        args = self._ocp.args
        meta = self._manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"the checkpoint {self.directory / str(step)} has format "
                f"{meta.get('format')!r}, this version reads format {FORMAT}; resume it "
                "with the version that wrote it, or start a new run."
            )
        leaves, treedef = jax.tree.flatten(like)
        if meta["num_leaves"] != len(leaves):
            raise ValueError(
                f"the checkpoint in {self.directory} holds {meta['num_leaves']} arrays, this "
                f"model and optimizer have {len(leaves)}; resume with the same model and "
                "optimizer, or start a new run in another directory."
            )
        abstract = [_abstract(x) for x in leaves]
        try:
            restored = self._manager.restore(
                step, args=args.Composite(state=args.StandardRestore(abstract))
            )["state"]
        except ValueError as error:  # Orbax: shapes that do not match the checkpoint's
            raise ValueError(
                f"the arrays of the checkpoint in {self.directory} do not fit this model and "
                f"optimizer ({str(error).splitlines()[0][:200]}); resume with the same model "
                "and optimizer, or start a new run in another directory."
            ) from None
        for i, (old, new) in enumerate(zip(abstract, restored, strict=True)):
            if old.shape != new.shape:
                raise ValueError(
                    f"array {i} of the checkpoint has shape {new.shape}, the model's has "
                    f"{old.shape}; resume with the same model, or start a new run."
                )
        return jax.tree.unflatten(treedef, restored), _decode(meta)

    def close(self) -> None:
        """Wait for the save in progress, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding)
