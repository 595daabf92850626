"""`per_example_stats`: a jit-compiled function from (params, batch, mask) to `GradStats`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from optax import microbatching

from adaptive_batch.stats import _validation
from adaptive_batch.stats._fast import auto_sums, fast_sums
from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._manual_axes import vary, varying_axes
from adaptive_batch.stats._vmap import masked, vmap_sums

PyTree = Any
StatsFn = Callable[..., GradStats]

_SUMS = {"vmap": vmap_sums, "fast": fast_sums, "auto": auto_sums}
BACKENDS = tuple(_SUMS)


def per_example_stats(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    coordinates: bool = False,
    inner: bool = False,
    backend: str = "auto",
    microbatch_size: int | None = None,
) -> StatsFn:
    r"""Build ``stats_fn(params, batch, mask=None, direction=None) -> GradStats``.

    For a batch of examples i with per-example losses ℓᵢ and gradients gᵢ = ∇_w ℓᵢ(w),
    ``stats_fn`` returns the sums over the real (unmasked) examples

    .. math::

        b = \sum_i m_i,\quad \sum_i ℓ_i,\quad \sum_i g_i,\quad \sum_i \|g_i\|^2,
        \quad [\sum_i g_i \odot g_i],\quad [\sum_i p_i,\ \sum_i p_i^2],\ p_i = g_i \cdot d,

    with d the batch mean gradient ḡ unless ``direction`` is given. The inner products
    pᵢ for all i come from one forward-mode product (``jax.jvp``) of the per-example
    loss vector along d, so no per-example gradient is kept for them.

    Args:
      loss_fn: ``loss_fn(params, batch) -> losses`` of shape ``(B,)``, one loss per
        example, each depending on its own example only (no batch norm in training
        mode). ``batch`` is any pytree whose leaves share a leading batch axis.
      coordinates: also return ``sq_sum`` = Σᵢ gᵢ⊙gᵢ (needed by coordinate-wise rules).
      inner: also return ``inner_sum`` and ``inner_sq_sum`` (inner-product tests). Costs
        one extra forward-mode pass over the batch.
      backend: ``"auto"`` (default): ``"fast"`` without the fallback warning where
        any parameter has a rule, ``"vmap"`` otherwise (or when the loss cannot be
        traced). ``"fast"``: per-layer rules from one backward pass, no per-example
        gradients in memory; parameters without a rule (tied weights, ...) get exact
        per-example gradients, with a warning (see `fast_stats_report`). ``"vmap"``:
        exact per-example gradients with ``jax.vmap`` (memory B × params).
      microbatch_size: process the batch in chunks of this many rows (with
        ``optax.microbatching``), bounding the per-example gradient memory to
        microbatch_size × params. Any batch size works; the last chunk is padded and
        masked. ``None``: the whole batch at once.

    Returns:
      A jit-compiled ``stats_fn(params, batch, mask=None, direction=None)``. ``mask``
      has shape ``(B,)``, nonzero for real examples and 0 for padding; padding rows
      change no number (even NaN in a padding row is ignored). An all-padding batch
      gives zero sums and ``count == 0``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adaptive_batch as ab
      >>> def loss_fn(w, batch):
      ...     return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
      >>> stats_fn = ab.per_example_stats(loss_fn)
      >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.arange(8.0)}
      >>> stats = stats_fn(jnp.zeros(3), batch)
      >>> int(stats.count), stats.mean_grad.shape
      (8, (3,))
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}.")
    if microbatch_size is not None and (
        isinstance(microbatch_size, bool)
        or not isinstance(microbatch_size, int)
        or microbatch_size < 1
    ):
        raise ValueError(
            f"microbatch_size={microbatch_size!r} must be a positive int (rows per chunk) "
            "or None (whole batch at once)."
        )
    sums_fn = functools.partial(_SUMS[backend], loss_fn, coordinates=coordinates)

    def inner_sums(params, direction, batch, mask):
        _, products = jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))
        products = masked(products, mask)
        return jnp.sum(products), jnp.sum(jnp.square(products))

    @jax.jit
    def stats_fn(params, batch, mask=None, direction=None) -> GradStats:
        _validation.check_params(params)
        batch_size = _validation.batch_size_of(batch)
        _validation.check_losses(loss_fn, params, batch, batch_size)
        if mask is None:
            mask = jnp.ones((batch_size,), dtype=bool)
        _validation.check_mask(mask, batch_size)
        if direction is not None:
            _validation.check_direction(direction, params)
        mask = jnp.asarray(mask) != 0
        params = _vary_like(params, (batch, mask))
        batch, mask, chunk = _pad_to_chunks(batch, mask, batch_size, microbatch_size)

        stats = _chunked(sums_fn, chunk, batch_argnums=(1, 2))(params, batch, mask)
        if not inner:
            return stats
        if direction is None:
            direction = stats.mean_grad
        direction = jax.tree.map(lambda d, p: d.astype(p.dtype), direction, params)
        inner_sum, inner_sq_sum = _chunked(inner_sums, chunk, batch_argnums=(2, 3))(
            params, direction, batch, mask
        )
        return stats._replace(inner_sum=inner_sum, inner_sq_sum=inner_sq_sum)

    return stats_fn


def _vary_like(params, batch):
    """Mark params as varying over the device axes the batch varies over (in shard_map).

    Inside ``shard_map`` the gradient with respect to a replicated (device-invariant)
    input is summed over devices automatically. The statistics must be sums over this
    device's examples only (a per-device ``psum`` of them is then exact), so params are
    cast to vary like the batch before differentiating. Outside shard_map: a no-op.
    """
    batch_axes = set().union(*(varying_axes(x) for x in jax.tree.leaves(batch)))
    if not batch_axes:
        return params

    def vary_as_batch(x):
        return vary(x, batch_axes)

    return jax.tree.map(vary_as_batch, params)


def _pad_to_chunks(batch, mask, batch_size: int, microbatch_size: int | None):
    """Pad the batch with masked rows to a multiple of the chunk size.

    Returns (batch, mask, chunk); chunk is None when the batch fits in one chunk.
    """
    if microbatch_size is None or batch_size <= microbatch_size:
        return batch, mask, None
    padding = -batch_size % microbatch_size
    if padding:

        def pad(x):
            return jnp.pad(x, [(0, padding)] + [(0, 0)] * (jnp.ndim(x) - 1))

        batch = jax.tree.map(pad, batch)
        mask = pad(mask)
    return batch, mask, microbatch_size


def _chunked(fn, chunk: int | None, *, batch_argnums):
    """fn over the whole batch, or summed over chunks of `chunk` rows in a loop."""
    if chunk is None:
        return fn
    return microbatching.microbatch(fn, argnums=batch_argnums, microbatch_size=chunk)
