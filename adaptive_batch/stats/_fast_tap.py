"""Statistics inside the reverse pass: a "tap" on a site output of the ``"fast"`` backend.

A site y = f(a, W) (see `_fast_analysis`) has per-example gradient gᵢ(W) = (∂y/∂W)ᵀδᵢ with
δᵢ = ∂(Σⱼ mⱼℓⱼ)/∂yᵢ. The layer rules (`_fast_rules`) need only the site's other operands a
and δ. By default (`_fast`) every δ comes out of the reverse pass and the rules run after
it. A tapped site instead wraps its output in

    y' = tap(y, a, acc) = y,   reverse rule   δ ↦ (∂/∂y, ∂/∂a, ∂/∂acc) = (δ, 0', rule(a, δ)),

where ``acc`` is a dummy zero input shaped like the site's statistics (Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ).
The loss does not depend on ``acc``, but its "gradient" is rule(a, δ), so the reverse pass
with respect to the accumulators returns the site's statistics, computed when the pass
reaches the layer. 0' is a zero computed from those statistics (`waiting_cotangents`):
a's cotangent flows on to the layers before, so the pass cannot go on to them before the
rule has run, and XLA frees the layer's a, δ and squares first. Without that dependency
XLA scheduled the same graph as without taps, byte for byte.

The loss is traced per example under ``jax.vmap`` while the rules work on the whole batch
(Σᵢ gᵢ⊙gᵢ = (a⊙a)ᵀ(δ⊙δ) is one matrix product, not B outer products), so the tap is a
`jax.custom_batching.custom_vmap` whose batching rule calls a batched `jax.custom_vjp`:
its reverse rule sees a and δ of the whole batch. `uses_tap` says which sites are tapped;
`guarded_stats`, the rule with the all-padding guard, serves tapped and untapped sites.

References: Dangel, Kunstner, Hennig, "BackPACK: Packing more into backprop",
https://arxiv.org/abs/1912.10985 (the same idea: extensions hooked into the backward pass).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from adaptive_batch.stats._fast_analysis import Site
from adaptive_batch.stats._fast_rules import site_stats
from adaptive_batch.stats._fast_scan_constant import RULE as SCAN_CONSTANT
from adaptive_batch.stats._fast_scan_constant import passed_out
from adaptive_batch.stats._vmap import accumulation_dtype


def widen(x):
    """Floating values in the accumulation dtype (at least float32); others unchanged."""
    dtype = jnp.result_type(x)
    return x.astype(accumulation_dtype(dtype)) if jnp.issubdtype(dtype, jnp.floating) else x


def uses_tap(site: Site, coordinates: bool) -> bool:
    """Whether a site's statistics are computed in the reverse pass (a tap) rather than
    after it (a perturbation, see `_fast`): dense layers with one position per example,
    when coordinate sums are asked for.

    Their rule squares a whole batch of inputs and signals, (a⊙a)ᵀ(δ⊙δ); after the pass,
    every layer's a and δ would be alive at once, with the squares on top. Measured on
    XLA:CPU (temporary memory of MLP 40-512-512-10 with coordinates / plain gradient's,
    B = 64 / 256 / 1024): 1.53 / 1.56 / 1.65 after the pass, 1.28 / 1.31 / 1.40 tapped.
    Other sites are not tapped: there the memory was within 1.2x without taps, and on
    XLA:CPU the tighter buffer reuse of taps made small batches slower (CNN at B = 64,
    1.26x → 1.44x a plain gradient), as reused buffers serialise work that would
    otherwise run on both cores.

    Sites inside a ``lax.scan`` or ``jax.checkpoint`` body are always tapped: a
    perturbation would have to carry every iteration's a and δ out of the loop, or the
    inputs out of the rematerialised body, while the tap's accumulator, sliced by the
    scan like the weight, collects each iteration's statistics.
    """
    return site.nested or (coordinates and site.rule == "dense")


def stats_shapes(site: Site, batch_size: int, leaf_aval, coordinates: bool):
    """Shapes and dtypes of (Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None) of a site: the accumulator."""
    pos = site.weight_pos

    def spec(aval):
        dtype = widen(jnp.zeros((), aval.dtype)).dtype
        return jax.ShapeDtypeStruct((batch_size, *aval.shape), dtype)

    records = [spec(v.aval) for i, v in enumerate(site.eqn.invars) if i != pos]
    delta = spec(site.eqn.outvars[0].aval)
    if site.rule == SCAN_CONSTANT:  # the tap passes operands and δ out of the loop
        return passed_out(site, records, delta)
    return jax.eval_shape(
        lambda r, d: site_stats(site, r, d, leaf_aval=leaf_aval, coordinates=coordinates),
        records,
        delta,
    )


def make_tap(site: Site, leaf_aval, coordinates: bool):
    """``tap(y, records, acc, count, weight) -> y`` for per-example values under ``jax.vmap``.

    ``records`` are the site's other operands, ``acc`` the zero accumulator and ``count``
    the number of real rows (both unbatched), ``weight`` the example's mask entry. The
    cotangent of ``acc`` is the site's statistics of the whole batch. ``weight`` is unused
    but batched, so that the batching rule below runs even for a site whose output is the
    same for every example (``constant @ W``).
    """

    @jax.custom_vjp
    def batched_tap(y, records, acc, count):
        return y

    def forward(y, records, acc, count):
        return y, (records, count)

    def backward(residuals, delta):
        records, count = residuals
        if site.rule == SCAN_CONSTANT:  # this iteration's share, summed after the pass
            zeros = [jnp.zeros_like(r) for r in records]
            passed = jax.tree.map(widen, passed_out(site, records, delta))
            return delta, zeros, passed, None
        stats = guarded_stats(site, records, delta, count, leaf_aval, coordinates)
        return delta, waiting_cotangents(records, stats), stats, None

    batched_tap.defvjp(forward, backward)

    @custom_vmap
    def tap(y, records, acc, count, weight):
        return y

    @tap.def_vmap
    def _batched(axis_size, in_batched, y, records, acc, count, weight):
        # Unbatched operands (constants of the model) are broadcast to the batch, as the
        # rules expect one row per example.
        y_batched, records_batched, *_ = in_batched
        y = y if y_batched else jnp.broadcast_to(y, (axis_size, *jnp.shape(y)))
        records = [
            r if b else jnp.broadcast_to(r, (axis_size, *jnp.shape(r)))
            for r, b in zip(records, records_batched, strict=True)
        ]
        return batched_tap(y, records, acc, count), True

    return tap


def guarded_stats(site: Site, records, delta, count, leaf_aval, coordinates: bool):
    """The site's (Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ | None), zero when ``count`` is 0 (`guarded`)."""

    def rule(records, delta):
        return site_stats(site, records, delta, leaf_aval=leaf_aval, coordinates=coordinates)

    return guarded(rule, records, delta, count, leaf_aval, coordinates)


def guarded(rule, records, delta, count, leaf_aval, coordinates: bool):
    """``rule(records, delta)`` on widened inputs (any pytrees), zero when ``count`` is 0.

    Padding rows are copies of a real row with zero loss weight (see `_fast`), so their δ
    is 0 and needs no masking. A batch without real rows may hold NaN: the smaller side of
    the rule, its inputs or its outputs, is zeroed then (a select after a matrix product
    keeps the product's result as one more parameter-sized temporary).
    """
    records, delta = jax.tree.map(widen, (records, delta))
    real = count > 0

    def zero_if_no_real_row(x):
        return jnp.where(real, x, jnp.zeros_like(x))

    leaf_size = math.prod(leaf_aval.shape)
    inputs_size = sum(x.size for x in jax.tree.leaves((records, delta)))
    guard_inputs = inputs_size < leaf_size * (1 + coordinates)
    if guard_inputs:
        records, delta = jax.tree.map(zero_if_no_real_row, (records, delta))
    stats = rule(records, delta)
    if not guard_inputs:
        stats = jax.tree.map(zero_if_no_real_row, stats)
    return stats


def waiting_cotangents(records, stats):
    """Cotangents of the site's other operands: zeros computed from the squared sums
    (Σ‖gᵢ‖², Σgᵢ⊙gᵢ) of ``stats`` (``None`` for integer operands).

    The loss does not depend on a through the tap, so the true cotangent is 0. But a is
    the output of the layers before, and the reverse pass adds this zero to a's cotangent
    from the layer itself (δWᵀ for a dense layer) before going on to them: XLA must finish
    the site's statistics first and can free its a, δ and squares before the next
    layer's, rather than keep every layer's a and δ alive until the end of the pass.
    Measured on XLA:CPU (MLP 40-512-512-10 with coordinates, temporary memory / plain
    gradient's): 1.53 / 1.56 / 1.65 at B = 64 / 256 / 1024 without a dependency, 1.28 /
    1.31 / 1.40 with it. ``lax.optimization_barrier`` on (δ, stats) did not hold at
    B = 1024: XLA:CPU lowers barriers to control dependencies, which later passes dropped.

    The zero is a broadcast scalar, which XLA fuses into the addition. Added to δ instead
    (δ + 0, the same dependency), it cost a pass over δ of its own and kept δWᵀ from
    running beside the statistics (MLP with coordinates, interleaved in one process, time
    / plain gradient's at B = 64 / 256 / 1024: 1.50 / 1.50 / 1.48x with the zero on δ,
    1.43 / 1.44 / 1.45x on a; memory the same).

    Σgᵢ is left out: it needs no squared copies, and with every site tapped, depending on
    it too raised the MLP's norms-only memory at B = 256 from 1.02x to 1.27x.

    The zero is 0·s for s the sum of every entry of the squared sums, or 0 where s is not
    finite: statistics that overflow must not turn a cotangent into NaN. The sum of one
    entry of each array was the same dependency on paper, but XLA:CPU then kept more
    alive at B = 1024: 1.40x a plain gradient's temporary memory against 1.28x (same
    MLP; also with JAX 0.11.2). The sum costs a pass over the squared sums: time /
    plain gradient's, interleaved in one process, three runs, one entry -> all: B = 64
    1.37, 1.38, 1.42 -> 1.40, 1.40, 1.44x; B = 256 1.42 -> 1.42x; B = 1024 1.43, 1.45,
    1.42 -> 1.42, 1.43, 1.41x.
    """
    total = sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(stats[1:]))
    zero = jnp.where(jnp.isfinite(total), 0 * total, 0)
    return [
        jnp.broadcast_to(zero.astype(r.dtype), jnp.shape(r))
        if jnp.issubdtype(r.dtype, jnp.inexact)
        else None
        for r in records
    ]
