"""Convolution rule of the ``"fast"`` backend: per-example products on unfolded patches.

A convolution y = conv(a, W) with G feature groups is, per example i and group g, a
dense layer shared over the P output positions: yᵢₚ = Wᵍᵀ uᵢₚ with uᵢₚ the input patch
(Cᵍ channels × window) under output position p, so

    gᵢ(Wᵍ) = Σₚ uᵢₚ ⊗ δᵢₚ.

The patches are strided slices of the padded (and, for transposed convolutions,
dilated) input, one per window offset, so unfolding moves data but does no arithmetic
(``lax.conv_general_dilated_patches`` would cost a convolution with (C·window)² weights).
They are laid out (example, group, K = window·Cᵍ, P) with the positions last, so that
gᵢ = Uᵢ Δᵢ is a plain (K×P)·(P×Oᵍ) matrix product per example: XLA:CPU runs that
batched product about as fast as the summed weight gradient of a plain backward pass,
while the earlier (P, K) layout cost a transposed copy of the patches and 1.5-2x the
time. Σᵢgᵢ is the sum of the per-example products (no second contraction), and

    Σᵢ ‖gᵢ‖² = Σᵢ,ₖ,ₙ (Uᵢ Δᵢ)ₖₙ²,   Σᵢ gᵢ⊙gᵢ = Σᵢ (Uᵢ Δᵢ)⊙(Uᵢ Δᵢ).

The Gram form Σₚ,q (uᵢₚ·uᵢq)(δᵢₚ·δᵢq) is not used: it needs the patches as well, and
on the benchmark CNN its extra products cost more than the per-example ones. The
products are computed a chunk of examples at a time (chunks sliced in place from the
records, a ``fori_loop``), so that the unfolded patches (window × the input) never exist
for the whole batch.

Reference: Rochette, Manoel, Tramel, "Efficient per-example gradient computations in
convolutional neural networks", https://arxiv.org/abs/1912.06015.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from adaptive_batch.stats._fast_analysis import Site


def is_plain_conv(site: Site) -> bool:
    """A convolution whose weight is the right-hand side, without batch groups."""
    params = site.eqn.params
    return (
        site.weight_pos == 1
        and site.view.bijective
        and params["batch_group_count"] == 1
        and site.eqn.invars[0].aval.shape[params["dimension_numbers"].lhs_spec[0]] == 1
    )


def conv_unfold(site: Site):
    """``unfold(a, delta) -> (patches (b, G, P, K), delta (b, G, P, N))`` and ``to_weight``
    mapping (G, K, N) arrays back to the kernel layout."""
    params = site.eqn.params
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn
    w_shape = site.eqn.invars[1].aval.shape
    window = tuple(w_shape[d] for d in rhs_spec[2:])
    groups = params["feature_group_count"]
    out_channels, group_channels = w_shape[rhs_spec[0]], w_shape[rhs_spec[1]]

    def rows_as_batch(x, batch_dim):
        # Records carry the vmapped example axis in front of the conv's own batch axis
        # of size 1: put the examples in the conv's batch axis.
        return jnp.moveaxis(jnp.squeeze(x, 1 + batch_dim), 0, batch_dim)

    strides, dilations = params["window_strides"], params["rhs_dilation"]
    padding, lhs_dilation = params["padding"], params["lhs_dilation"]
    out_spatial = [site.eqn.outvars[0].aval.shape[d] for d in out_spec[2:]]

    def patches_of(a):
        """(b, G, K, P) input patches: K = (window offset, channel in group), P output
        positions last, so the per-example products are plain (K×P)·(P×N) matrix
        products that need no transposed copy."""
        x = jnp.transpose(a, (lhs_spec[0], lhs_spec[1], *lhs_spec[2:]))  # (b, C, *S)
        x = lax.pad(
            x,
            jnp.zeros((), x.dtype),
            [(0, 0, 0)] * 2
            + [(lo, hi, dil - 1) for (lo, hi), dil in zip(padding, lhs_dilation, strict=True)],
        )
        slices = []
        for offset in itertools.product(*(range(k) for k in window)):
            start = [0, 0] + [k * d for k, d in zip(offset, dilations, strict=True)]
            limit = list(x.shape[:2]) + [
                s + (n - 1) * st + 1
                for s, n, st in zip(start[2:], out_spatial, strides, strict=True)
            ]
            slices.append(lax.slice(x, start, limit, [1, 1, *strides]))
        # Joined along the channel axis rather than stacked on a new one: XLA:CPU then
        # fuses the padding into each slice and does not copy the slices once more
        # (benchmark CNN, norms, interleaved in one process, B = 64 / 256: 1.17 / 1.08x
        # -> 1.13 / 1.02x a plain gradient).
        x = jnp.concatenate(slices, axis=1)  # (b, window·C, *out)
        x = x.reshape(x.shape[0], len(slices), groups, group_channels, -1)
        return jnp.swapaxes(x, 1, 2).reshape(x.shape[0], groups, -1, x.shape[-1])

    def unfold(a, delta):
        patches = patches_of(rows_as_batch(a, lhs_spec[0]))
        delta = rows_as_batch(delta, out_spec[0])
        delta = jnp.transpose(delta, (out_spec[0], *out_spec[2:], out_spec[1]))
        delta = delta.reshape(delta.shape[0], -1, groups, out_channels // groups)
        return patches, jnp.swapaxes(delta, 1, 2)  # (b, G, K, P), (b, G, P, Oᵍ)

    def to_weight(x):
        # (G, window·Cᵍ, Oᵍ) -> logical (O, Cᵍ, *window) -> the kernel's own layout.
        x = x.reshape(groups, *window, group_channels, out_channels // groups)
        x = jnp.moveaxis(x, -1, 1)  # (G, Oᵍ, *window, Cᵍ)
        x = jnp.moveaxis(x, -1, 2).reshape(out_channels, group_channels, *window)
        return jnp.transpose(x, np.argsort(rhs_spec))

    per_row = (
        math.prod(site.eqn.outvars[0].aval.shape)
        // out_channels
        * (group_channels * groups * math.prod(window))
    )
    return unfold, to_weight, per_row
