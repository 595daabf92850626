"""Input checks for `per_example_stats`, with errors that say what to do.

All checks use static information only (shapes, dtypes, tree structures), so they run
at trace time and cost nothing inside a compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def check_params(params: PyTree) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(
            "params has no array leaves, so there is nothing to differentiate. Pass the "
            "trainable parameters (for Flax NNX: `nnx.split(model, nnx.Param, ...)`)."
        )
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {dtype}, but every params "
                "leaf is differentiated and must be floating point. Cast it to a float "
                "dtype, or move it out of params and close over it in loss_fn."
            )


def batch_size_of(batch: PyTree) -> int:
    """The common leading size of the batch leaves, with an error naming any mismatch."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(
            "batch has no array leaves. Pass a pytree of arrays whose leading axis is the "
            "batch axis, for example {'x': x, 'y': y} with x.shape[0] == y.shape[0]."
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} is a scalar, but every batch leaf needs a "
                "leading batch axis. Close over constants in loss_fn instead of passing "
                "them in the batch."
            )
        sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"batch{path}: {size}" for path, size in sizes.items())
        raise ValueError(
            f"batch leaves have different leading (batch) sizes: {listing}. Every leaf "
            "must hold one row per example."
        )
    size = next(iter(sizes.values()))
    if size == 0:
        raise ValueError(
            "batch has 0 rows. Pass at least one row; to contribute nothing, pass "
            "padding rows with mask=0."
        )
    return size


def check_mask(mask, batch_size: int) -> None:
    if jnp.shape(mask) != (batch_size,):
        raise ValueError(
            f"mask has shape {jnp.shape(mask)}, but the batch has {batch_size} rows: pass a "
            f"mask of shape ({batch_size},) with 1 for real examples and 0 for padding."
        )


def check_mask_values(mask) -> None:
    """On the host, before a jitted step: a mask that is not boolean must hold only 0
    and 1 (inside a step ``mask != 0`` would read 0.5 as a real example). Boolean
    masks, and arrays already inside a trace, are not looked at."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    dtype = getattr(mask, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) == jnp.bool_:
        return
    values = np.unique(np.asarray(mask))
    odd = [v for v in values.tolist() if v not in (0, 1)]
    if odd:
        raise ValueError(
            f"mask holds {odd[:5]}: a mask marks each row as real (1) or padding (0), "
            "nothing in between. To weight examples, scale their losses in loss_fn."
        )


def check_direction(direction: PyTree, params: PyTree) -> None:
    params_struct = jax.tree.structure(params)
    if jax.tree.structure(direction) != params_struct:
        raise ValueError(
            "direction must be a pytree with the same structure as params (it is the d in "
            f"pᵢ = gᵢ·d); got {jax.tree.structure(direction)}, expected {params_struct}."
        )
    for path, d, p in zip(
        (kp for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
        jax.tree.leaves(direction),
        jax.tree.leaves(params),
        strict=True,
    ):
        if jnp.shape(d) != jnp.shape(p):
            raise ValueError(
                f"direction{jax.tree_util.keystr(path)} has shape {jnp.shape(d)}, but the "
                f"params leaf has shape {jnp.shape(p)}; direction must match params."
            )


def check_losses(loss_fn, params: PyTree, batch: PyTree, batch_size: int) -> None:
    out = jax.eval_shape(loss_fn, params, batch)
    shape = getattr(out, "shape", None)
    if shape != (batch_size,):
        got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
        hint = (
            " It looks like the mean loss: return the per-example losses instead (drop the "
            "final .mean() / .sum())."
            if shape == ()
            else ""
        )
        raise ValueError(
            f"loss_fn(params, batch) must return per-example losses of shape (B,) = "
            f"({batch_size},), got {got}.{hint}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"loss_fn returned losses of dtype {out.dtype}; per-example losses must be "
            "floating point."
        )
