"""The ``tied-lookup`` rule: a table read by an embedding lookup and by one dense layer.

A language model with tied embeddings looks its table E (V × W) up for the input tokens
and multiplies hidden states by it into the logits (``h @ E.T``, ``nnx.Embed.attend``).
Example i's gradient is the sum of the two sites' (`_fast_shared` has the general case),

    gᵢ = Lᵢ + Oᵢ,   Lᵢ = Σₚ e(idᵢₚ) ⊗ εᵢₚ,

with εᵢₚ the lookup's signal at position p and Oᵢ the dense layer's per-example
gradient. Each site's own rule gives Σ‖Lᵢ‖², ΣLᵢ⊙Lᵢ and Σ‖Oᵢ‖², ΣOᵢ⊙Oᵢ. The cross
terms need only the rows of Oᵢ that Lᵢ touches:

    ⟨Lᵢ, Oᵢ⟩ = Σₚ εᵢₚ · Oᵢ[idᵢₚ],      Σᵢ Lᵢ⊙Oᵢ = Σᵢ,ₚ e(idᵢₚ) ⊗ (εᵢₚ ⊙ Oᵢ[idᵢₚ])

(a repeated id adds its signals onto one row, which both sums do by themselves), and
with the layer's inputs a and signals δ at its positions q,

    Oᵢ[v] = Σ_q δᵢq[v] aᵢq   when the table's rows are the layer's outputs (h Eᵀ),
    Oᵢ[v] = Σ_q aᵢq[v] δᵢq   when they are its inputs (one-hot rows times E).

So ‖gᵢ‖² = ‖Lᵢ‖² + ‖Oᵢ‖² + 2⟨Lᵢ, Oᵢ⟩ costs two rules and B·P·Q·(W + 1) more, with no
per-example table: ``shared-products`` formed B tables of V × W, a chunk at a time.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from adaptive_batch.stats._fast_analysis import Site
from adaptive_batch.stats._fast_embedding import is_embedding, lookup_rows, unshared_zeros
from adaptive_batch.stats._fast_rules import (
    choose_rule,
    dense_canonical,
    dense_dims,
    site_stats,
)

RULE = "tied-lookup"


def tied_lookup_pair(sites: list[Site]) -> tuple[Site, Site] | None:
    """(lookup, dense) when a tied leaf is read by exactly one embedding lookup of the
    table as it is and one dense layer whose weight is the 2-D table or its transpose."""
    if len(sites) != 2:
        return None
    lookup, dense = sorted(sites, key=lambda s: s.eqn.primitive.name != "gather")
    if not (
        lookup.eqn.primitive.name == "gather"
        and is_embedding(lookup)
        and _transposed(lookup) is False
        and dense.eqn.primitive.name == "dot_general"
        and dense.eqn.invars[dense.weight_pos].aval.ndim == 2
        and _transposed(dense) is not None
    ):
        return None
    _, weight_contracted, _, weight_batch = dense_dims(dense)
    return (lookup, dense) if not weight_batch and len(weight_contracted) == 1 else None


def uses_tied_lookup(sites: list[Site], batch_size: int, coordinates: bool) -> bool:
    """Whether a tied leaf's sites take this rule: they form a `tied_lookup_pair`, and
    the rule saves work. With coordinate sums, an output layer over positions needs its
    per-example products (``dense-products``) anyway, and ``shared-products`` forms them
    once for both sites, with one table fewer. Measured (``benchmarks/embedding.py``,
    20000×128 table tied to logits at T = 64, B = 32, time / temporary memory of a plain
    gradient): 3.74x / 1.53x here, 3.66x / 1.50x shared; norms only, 1.05x / 1.00x here
    and 2.33x / 1.50x shared."""
    pair = tied_lookup_pair(sites)
    if pair is None:
        return False
    return not coordinates or _alone(pair[1], batch_size, coordinates).rule != "dense-products"


def tied_lookup_stats(sites: list[Site], records, deltas, *, leaf_aval, coordinates: bool):
    """(Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None) of a tied leaf from its two sites (`tied_lookup_pair`)."""
    lookup, dense = tied_lookup_pair(sites)
    by_site = {s.path: (r, d) for s, r, d in zip(sites, records, deltas, strict=True)}
    batch_size = deltas[0].shape[0]
    own = [
        site_stats(
            _alone(site, batch_size, coordinates),
            *by_site[site.path],
            leaf_aval=leaf_aval,
            coordinates=coordinates,
        )
        for site in (lookup, dense)
    ]
    (indices,), epsilon = by_site[lookup.path]
    ids, epsilon = lookup_rows(lookup, indices, epsilon)  # (B, P), (B, P, W)
    (inputs,), delta = by_site[dense.path]
    a, d = (x[:, 0] for x in dense_canonical(dense, inputs, delta))  # (B, Q, K), (B, Q, N)
    # The table's rows are the viewed weight's axis 0, or 1 behind a transpose; they are
    # the layer's outputs (N) unless that axis is the contracted one.
    row_axis = 1 if _transposed(dense) else 0
    (contracted,) = dense_dims(dense)[1]
    along_rows, along_columns = (a, d) if contracted == row_axis else (d, a)
    picked = jnp.take_along_axis(along_rows, ids[:, None, :], axis=2)  # (B, Q, P)
    cross = epsilon * jnp.einsum("bqp,bqc->bpc", picked, along_columns)  # εᵢₚ ⊙ Oᵢ[idᵢₚ]
    grad_sum = own[0][0] + own[1][0]
    sq_norm = own[0][1] + own[1][1] + 2 * jnp.sum(cross)
    sq_sum = None
    if coordinates:
        cross_sum = unshared_zeros(leaf_aval.shape, cross)
        cross_sum = cross_sum.at[ids.reshape(-1)].add(cross.reshape(-1, cross.shape[-1]))
        sq_sum = own[0][2] + own[1][2] + 2 * cross_sum
    return grad_sum, sq_norm, sq_sum


def _alone(site: Site, batch_size: int, coordinates: bool) -> Site:
    """The site with the rule it would have as the leaf's only use."""
    alone = dataclasses.replace(site, shared=False)
    return dataclasses.replace(alone, rule=choose_rule(alone, batch_size, coordinates))


def _transposed(site: Site) -> bool | None:
    """Whether the site sees the 2-D leaf transposed (dtype casts aside); None when its
    views do anything else."""
    moves = [e for e in site.view.chain if e.primitive.name != "convert_element_type"]
    if not moves:
        return False
    if len(moves) == 1 and moves[0].primitive.name == "transpose":
        return tuple(moves[0].params["permutation"]) == (1, 0)
    return None
