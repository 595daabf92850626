"""The ``shared-products`` rule: a leaf that enters the loss linearly at several sites.

A language model's tied embedding table, read by the lookup of the input tokens and
multiplying the last hidden states into the logits, has a cheaper rule of its own
(`_fast_tied`); this one covers the rest (a weight applied twice, say). The per-example
gradient is the sum over the sites s (see `_fast_analysis`),

    gᵢ(E) = Σₛ gᵢˢ(E),   gᵢˢ(E) = Vₛᵀ (∂yₛ/∂Eₛ)ᵀ δᵢˢ,

and its squared norm has cross terms, ‖gᵢ‖² = Σₛ‖gᵢˢ‖² + 2 Σₛ<ₜ gᵢˢ·gᵢᵗ, that no single
site's rule sees. So gᵢ is formed from every site's records and signals (one ``jax.vjp``
of each site equation), a chunk of examples at a time, and reduced to Σgᵢ, Σ‖gᵢ‖²,
Σgᵢ⊙gᵢ before the next chunk: memory chunk × |E|, where the exact fallback held all
B × |E| per-example gradients at once. The chunk is the largest divisor of B whose
per-example gradients fit in the larger of |E| and the sites' signals.
"""

from __future__ import annotations

import math

import jax

from adaptive_batch.stats._fast_analysis import Site
from adaptive_batch.stats._fast_rules import chunked_sums, per_example_grad


def shared_stats(sites: list[Site], records, deltas, *, leaf_aval, coordinates: bool):
    """(Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None) of one leaf from all of its sites' records and δ."""
    grads = [jax.vmap(per_example_grad(site, leaf_aval)) for site in sites]

    def per_example(site_records, site_deltas):
        terms = zip(grads, site_records, site_deltas, strict=True)
        return sum(grad(r, d) for grad, r, d in terms)

    budget = max(sum(d.size for d in deltas), math.prod(leaf_aval.shape))
    return chunked_sums(per_example, (records, deltas), budget, coordinates)
