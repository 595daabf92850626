"""The ``scan-constant`` rule: a weight that every iteration of a ``lax.scan`` reads whole.

A recurrent weight (a constant of the loop, as Flax's ``nn.RNN`` and hand-written RNN
cells pass it) is shared over the T iterations as a dense weight is shared over
positions: example i's gradient is the sum over the iterations,

    gᵢ(W) = Σₜ gᵢᵗ(W),   gᵢᵗ(W) = (∂yₜ/∂W)ᵀ δᵢₜ.

The site inside the loop body is tapped (`_fast_tap`); its accumulator, stacked along
the iterations and sliced by the scan like an ``xs``, receives the site's other
operands and its signal δₜ at every iteration. After the pass, from those (T, B, ...)
arrays:

* a dense layer counts the iterations as positions, T·P of them, and takes the rule of
  a dense weight shared over positions (`dense_rule`): the Gram form
  Σₛ,ₜ (aₛ·aₜ)(δₛ·δₜ) when it is the cheaper, else per-example products aᵢᵀδᵢ in chunks;
* any other site sums its per-example gradients over the iterations, a chunk of
  examples at a time.

Memory: every iteration's inputs and signals, T·B·(K + N) for a dense layer, about what
the plain gradient keeps for its reverse pass; the exact fallback held B per-example
gradients of the weight and ran the loop once per example.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from adaptive_batch.stats._fast_analysis import Site
from adaptive_batch.stats._fast_rules import (
    chain_transpose,
    chunked_sums,
    dense_canonical,
    dense_rule,
    dense_stats,
    per_example_grad,
)

RULE = "scan-constant"


def scan_constant_stats(site: Site, records, delta, *, leaf_aval, coordinates: bool):
    """(Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None) of the leaf seen in the body (``leaf_aval``), from
    the site's other operands and signals of every iteration, each (T, B, ...)."""
    length, batch = delta.shape[:2]
    records = [jnp.moveaxis(r, 0, 1) for r in records]  # (B, T, ...)
    delta = jnp.moveaxis(delta, 0, 1)
    if site.eqn.primitive.name == "dot_general" and site.view.bijective:
        merged = [x.reshape(batch * length, *x.shape[2:]) for x in (records[0], delta)]
        a, d = (_iterations_as_positions(x, batch) for x in dense_canonical(site, *merged))
        rule = dense_rule(a.shape[2], a.shape[3], d.shape[3], coordinates)
        out = dense_stats(site, rule, a, d, coordinates)
        return tuple(
            chain_transpose(site, leaf_aval, x) if x is not None and x.ndim else x for x in out
        )
    grad = per_example_grad(site, leaf_aval)

    def per_example(recs, d):  # (chunk, T, ...) -> (chunk, *leaf)
        return jax.vmap(lambda r, e: jnp.sum(jax.vmap(grad)(r, e), 0))(recs, d)

    leaf_size = math.prod(leaf_aval.shape)
    budget = max(delta.size + sum(r.size for r in records), length * leaf_size)
    return chunked_sums(
        per_example, (records, delta), budget, coordinates, extra_per_row=length * leaf_size
    )


def _iterations_as_positions(x, batch: int):
    """(B·T, H, P, F) -> (B, H, T·P, F): the iterations of one example as positions."""
    _, heads, positions, features = x.shape
    x = x.reshape(batch, -1, heads, positions, features).transpose(0, 2, 1, 3, 4)
    return x.reshape(batch, heads, -1, features)
