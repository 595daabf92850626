"""Embedding rule of the ``"fast"`` backend: per-example row sums by id.

A lookup y = E[ids] of P positions per example has per-example gradient

    gᵢ = Σₚ e_{idᵢₚ} ⊗ δᵢₚ,

so row v of gᵢ is sᵢᵥ = Σ_{p : idᵢₚ = v} δᵢₚ, the signals of the positions holding id v.
Then

    Σᵢ gᵢ = Σᵢ,ₚ e_{idᵢₚ} ⊗ δᵢₚ,   Σᵢ ‖gᵢ‖² = Σᵢ,ᵥ ‖sᵢᵥ‖²,   Σᵢ gᵢ⊙gᵢ = Σᵢ,ᵥ e_v ⊗ (sᵢᵥ⊙sᵢᵥ).

The sᵢᵥ are formed per example by adding each position's signal onto the first
position with the same id (a segment sum over the P positions: B·P² comparisons and
B·P·D additions, never a B × V × D array), and the sums over examples are scatter-adds
into the V × D table.

Two forms of lookup are recognised, both gathers of whole rows of a 2-D table:

* ``E[ids]`` / ``jnp.take(E, ids, axis=0)`` (Flax ``nnx.Embed``, Linen ``nn.Embed``):
  one index per position, the row axis collapsed.
* ``E[i]`` for a scalar ``i`` under ``jax.vmap`` (Equinox ``eqx.nn.Embedding``): a
  batched dynamic slice, indices (row, 0) with the row axis kept at size 1, clamped
  into range. The column start of a full-width slice is clamped to 0 whatever it
  holds, so only the row index matters; with out-of-range slices filled instead
  (``mode="fill"``) it would matter, and that form is left to the generic rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from adaptive_batch.stats._fast_analysis import Site

_FILL = lax.GatherScatterMode.FILL_OR_DROP


def is_embedding(site: Site) -> bool:
    """Whether a ``gather`` site looks up whole rows of a 2-D parameter table."""
    eqn = site.eqn
    table, indices = (v.aval for v in eqn.invars)
    dn = eqn.params["dimension_numbers"]
    if (
        site.weight_pos != 0
        or not site.view.bijective
        or table.ndim != 2
        or dn.operand_batching_dims
        or tuple(eqn.params["slice_sizes"]) != (1, table.shape[1])
    ):
        return False
    out_ndim = eqn.outvars[0].aval.ndim
    collapsed = tuple(dn.collapsed_slice_dims)
    if collapsed == (0,):
        row_and_columns = (out_ndim - 1,)
    elif collapsed == ():
        row_and_columns = (out_ndim - 2, out_ndim - 1)
    else:
        return False
    if tuple(dn.offset_dims) != row_and_columns:
        return False
    starts = tuple(dn.start_index_map)
    if starts == (0,):
        return indices.shape[-1] == 1
    return starts == (0, 1) and indices.shape[-1] == 2 and eqn.params["mode"] != _FILL


def lookup_rows(site: Site, indices, delta):
    """The rows looked up and their signals per example, ``(B, P)`` and ``(B, P, W)``.

    An id outside the table is clipped onto it in the gather's clip mode, whose
    gradient goes to the clipped row. In the other modes its signal is zeroed: fill mode
    reads zeros there, and promise-in-bounds (plain ``table[ids]``), whose forward
    lookup XLA clamps, drops the row from the gradient, as JAX's scatter-add does."""
    vocab, width = site.eqn.invars[0].aval.shape
    batch = indices.shape[0]
    ids = indices[..., 0].reshape(batch, -1)  # the row index leads the index vector
    delta = delta.reshape(batch, -1, width)
    if site.eqn.params["mode"] != lax.GatherScatterMode.CLIP:
        delta = jnp.where(((ids >= 0) & (ids < vocab))[..., None], delta, 0)
    return jnp.clip(ids, 0, vocab - 1), delta


def embedding_stats(site: Site, indices, delta, coordinates: bool):
    """(Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None) of the table from the site's indices and signals."""
    vocab, width = site.eqn.invars[0].aval.shape
    ids, delta = lookup_rows(site, indices, delta)
    positions = ids.shape[1]
    # Per example, add each position's signal onto the first position with the same id.
    first = jnp.argmax(ids[:, :, None] == ids[:, None, :], axis=2)
    segments = jax.vmap(lambda d, f: jax.ops.segment_sum(d, f, num_segments=positions))(
        delta, first
    )
    squares = jnp.square(segments)
    flat_ids = ids.reshape(-1)
    table = (vocab, width)
    grad_sum = jnp.zeros(table, delta.dtype).at[flat_ids].add(delta.reshape(-1, width), mode="drop")
    sq_sum = None
    if coordinates:
        sq_sum = (
            unshared_zeros(table, delta).at[flat_ids].add(squares.reshape(-1, width), mode="drop")
        )
    return grad_sum, jnp.sum(squares), sq_sum


def unshared_zeros(shape, like):
    """Zeros that XLA cannot merge with another zero table of the same shape.

    Two scatter-adds into ``jnp.zeros`` of one shape share one constant table after
    XLA's common-subexpression pass, and since a scatter updates its operand in place,
    XLA:CPU then copies the table for each: one more V × D temporary (a 20000×128 table
    at B = 32, T = 64: 11.3 MB of temporaries instead of 3.2 MB). The zero here is
    computed from the data (0 × a 0/1 flag, so always finite and exactly 0), which keeps
    its table apart; a second ``jnp.zeros``, even behind ``lax.optimization_barrier``,
    was merged with the first.
    """
    zero = jnp.isnan(jnp.ravel(like)[0]).astype(like.dtype) * 0
    return jnp.broadcast_to(zero, shape)
