"""The ``"fast"`` and ``"auto"`` backends: GradStats at about the cost of one backward pass.

For a parameter W that enters the loss once, linearly, at y = f(a, W) (a dense layer, a
convolution, an embedding lookup, a scale or a bias), the per-example gradient is
gᵢ(W) = (∂y/∂W)ᵀ δᵢ with δᵢ = ∂ℓᵢ/∂yᵢ. All δᵢ of all such layers come from ONE
reverse pass: a zero perturbation εₛ is added to every site output and the masked sum
Σᵢ mᵢ ℓᵢ is differentiated with respect to the perturbations,

    ∂(Σᵢ mᵢ ℓᵢ)/∂εₛ = (mᵢ δᵢ)ᵢ,

while the layer inputs a are recorded on the way forward. The layer rules
(`_fast_rules`) then give Σgᵢ, Σ‖gᵢ‖² and Σgᵢ⊙gᵢ without materialising every gᵢ. Dense
layers asked for coordinate sums are "tapped" instead (`_fast_tap`): their rule runs
inside the same reverse pass, when it reaches the layer, which keeps the squares of one
layer alive at a time rather than every layer's a and δ at the end of the pass.

A table read by an embedding lookup and by one dense layer (tied embeddings) gets both
sites' rules plus their cross terms through the looked-up ids (`_fast_tied`); a leaf
linear at several sites otherwise gets the per-example products of all of them, summed
example by example (`_fast_shared`); sites inside a ``lax.scan`` or
``jax.checkpoint`` body are always tapped, and a weight that every iteration of a scan
reads whole passes its site's inputs and signals out of the loop (`_fast_scan_constant`).
Leaves used any other way (weights carried through a loop, custom derivatives, unusual
primitives) fall back to exact per-example gradients. A small one gets them *in the same
pass*: it is fed in broadcast to one copy per example, and the reverse pass returns the
per-example gradients of those leaves only. A leaf of more than `_LARGEST_COPIED_LEAF`
entries gets them from a pass of its own, the ``"vmap"`` backend's with the other
leaves held fixed (`_exact_pass`).
`fast_stats_report` tells which leaf uses which rule.

The loss is traced per example (a batch of one, as the ``"vmap"`` backend does), so the
batch axis of every recorded value is the leading axis added by ``jax.vmap``; this is
what makes the analysis independent of how a model lays out its batch.

References: Dangel, Kunstner, Hennig, "BackPACK: Packing more into backprop",
https://arxiv.org/abs/1912.10985; Goodfellow, "Efficient per-example gradient
computations", https://arxiv.org/abs/1510.01799.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from adaptive_batch.stats._fast_analysis import Plan, analyze, evaluate, transpose_views
from adaptive_batch.stats._fast_rules import choose_rule
from adaptive_batch.stats._fast_scan_constant import RULE as SCAN_CONSTANT
from adaptive_batch.stats._fast_scan_constant import (
    gather_loop_values,
    scan_constant_stats,
    share_loop_values,
)
from adaptive_batch.stats._fast_shared import shared_stats
from adaptive_batch.stats._fast_tap import (
    guarded,
    guarded_stats,
    make_tap,
    stats_shapes,
    uses_tap,
    widen,
)
from adaptive_batch.stats._fast_tied import RULE as TIED_LOOKUP
from adaptive_batch.stats._fast_tied import tied_lookup_stats, uses_tied_lookup
from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._manual_axes import vary_like, varying_axes
from adaptive_batch.stats._row_sums import row_sums
from adaptive_batch.stats._vmap import accumulation_dtype, masked, vmap_sums, with_real_rows

PyTree = Any
_WARNED: set = set()
# Fallback leaves of more entries than this take an exact pass of their own
# (`_exact_pass`), smaller ones per-example copies in the fast pass. Measured by
# `benchmarks/fallback.py` (time / plain gradient's at B = 64 / 256, interleaved in one
# process, copies -> pass). A weight normalised by its column norms: 512×512, norms only
# 74 / 90x -> 33 / 72x, with coordinates 35 / 61x -> 27 / 46x, memory with coordinates
# 383x -> 256x at B = 256 (norms only 383x either way); 128×128, 3.5 / 24x -> 3.0 / 17x
# and 4.0 / 25x -> 3.8 / 20x, memory 94x -> 71x; with glibc told to keep freed memory,
# 3.5 / 9.5x -> 3.0 / 7.5x and 3.9 / 10.5x -> 3.8 / 9.7x (the copies' larger temporaries
# were also faulted in again on some calls); 32×32, the same time either way (1.9 /
# 2.4x, 2.2–2.3 / 3.1–3.2x), memory 21.5x -> 15.9x. A vector that meets the batch
# elementwise (exp(s) ⊙ h) pays for the pass: 1024 features, 1.00 / 1.00x -> 1.08 /
# 1.06x and 1.13 / 1.24x -> 1.39 / 1.51x, memory with coordinates 1.4x -> 1.7x; 4096
# features, with coordinates 1.25 / 1.29x -> 1.37 / 1.39x. A scalar: 1.01–1.04x either
# way, with coordinates 1.33 / 1.42x -> 1.35 / 1.45x. Leaves of up to 1024 entries
# therefore keep the copies; a vector above the bound pays a little.
_LARGEST_COPIED_LEAF = 1024


def _takes_exact_pass(leaf) -> bool:
    """Whether a fallback leaf gets its statistics from `_exact_pass` (else copies)."""
    return jnp.size(leaf) > _LARGEST_COPIED_LEAF


def build_plan(loss_fn, params: PyTree, batch: PyTree, *, coordinates: bool) -> Plan:
    """Trace the per-example loss and decide a rule for every parameter leaf."""
    leaves, treedef = jax.tree.flatten(params)
    batch_leaves, batch_def = jax.tree.flatten(batch)
    num_leaves = len(leaves)

    def example_loss(*flat):
        p = jax.tree.unflatten(treedef, flat[:num_leaves])
        example = jax.tree.unflatten(batch_def, flat[num_leaves:])
        return loss_fn(p, jax.tree.map(lambda x: x[None], example))[0]

    if any(varying_axes(x) for x in [*leaves, *batch_leaves]):
        # Inside shard_map: traced on the arguments themselves (one example of the
        # batch), whose types say which device axes they vary over. The jaxprs nested
        # in the trace (a custom_jvp's, a pjit's) are then typed alike; traced on bare
        # shapes, newer JAX refuses to bind them to varying values.
        args = [*leaves, *(jnp.asarray(x)[0] for x in batch_leaves)]
    else:  # shapes and dtypes (a batch sharded over a mesh axis cannot give one row)
        args = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
        args += [jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)) for x in batch_leaves]
    plan = analyze(jax.make_jaxpr(example_loss)(*args), num_leaves)
    batch_size = jnp.shape(batch_leaves[0])[0]
    plan.sites = {
        path: dataclasses.replace(site, rule=choose_rule(site, batch_size, coordinates))
        for path, site in plan.sites.items()
    }
    tied = {}
    for site in plan.sites.values():
        if site.shared:
            tied.setdefault(site.view.leaf, []).append(site)
    for sites in tied.values():
        if uses_tied_lookup(sites, batch_size, coordinates):
            plan.sites.update((s.path, dataclasses.replace(s, rule=TIED_LOOKUP)) for s in sites)
    plan.sites.update(share_loop_values(plan.jaxpr, plan.sites))
    return plan


def fast_sums(loss_fn, params, batch, mask, *, coordinates: bool, warn: bool = True, plan=None):
    """GradStats (without inner-product sums) of one chunk, by the layer rules."""
    if plan is None:
        plan = build_plan(loss_fn, params, batch, coordinates=coordinates)
    if warn and plan.fallback:
        _warn_fallback(loss_fn, plan, params)
    mesh = _explicit_mesh(batch)
    if mesh is None:
        return _sums(plan, coordinates, params, batch, mask, loss_fn=loss_fn)
    # The traced per-example jaxpr knows no mesh: re-binding its equations on arrays with
    # sharding in their types fails, so the mesh axes are made automatic (GSPMD) here.
    compute = jax.sharding.auto_axes(
        functools.partial(_sums, plan, coordinates, loss_fn=loss_fn),
        axes=mesh.explicit_axes,
        out_sharding=jax.sharding.PartitionSpec(),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return compute(params, batch, mask)


def _explicit_mesh(batch):
    for leaf in jax.tree.leaves(batch):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and getattr(mesh, "explicit_axes", ()):
            return mesh
    return None


def _sums(plan: Plan, coordinates: bool, params, batch, mask, *, loss_fn):
    leaves, treedef = jax.tree.flatten(params)
    # Padding rows become copies of a real row: every value in them is then finite and
    # their zero weight in the summed loss makes their δ and gradients exactly 0, so no
    # recorded input or signal needs masking (which would cost a copy of each).
    batch = with_real_rows(batch, mask)
    # An all-padding batch (say a late micro-batch of a small batch in a big bucket) had
    # no real row to stand in for the padding, which may hold NaN: results are zeroed
    # then (`guarded_stats`, and below for fallback leaves). A lax.cond skipping the work
    # instead made XLA:CPU run the whole pass 2x slower.
    count = jnp.sum(mask, dtype=jnp.float32)
    paths = list(plan.sites)
    tapped = [p for p in paths if uses_tap(plan.sites[p], coordinates)]
    perturbed = [p for p in paths if p not in tapped]
    exact = [i for i in sorted(plan.fallback) if _takes_exact_pass(leaves[i])]
    fallback = [i for i in sorted(plan.fallback) if i not in exact]
    reference = jax.tree.leaves(batch)[0]
    batch_size = jnp.shape(reference)[0]
    # The leaf each site's rule sees: inside a scan, one slice of it.
    avals = {p: _site_leaf_aval(plan.sites[p], leaves) for p in paths}
    taps = {p: make_tap(plan.sites[p], avals[p], coordinates) for p in tapped}
    zeros = [
        _batch_zeros(reference, aval.shape, aval.dtype)
        for aval in (plan.sites[p].eqn.outvars[0].aval for p in perturbed)
    ]
    # Zero accumulators: the reverse pass returns each tapped site's statistics as their
    # cotangents (`_fast_tap`). Typed like the batch so that, inside shard_map, they vary
    # over the same device axes as the statistics computed from it.
    accumulators = [
        jax.tree.map(
            lambda s, p=p: vary_like(
                jnp.zeros(_per_iteration(plan.sites[p], s), s.dtype), reference
            ),
            stats_shapes(plan.sites[p], batch_size, avals[p], coordinates),
        )
        for p in tapped
    ]
    copies = [
        leaves[i] + _batch_zeros(reference, jnp.shape(leaves[i]), jnp.result_type(leaves[i]))
        for i in fallback
    ]

    def example(perturbations, accs, leaf_copies, weight, example_leaves):
        args = list(leaves)
        for i, copy in zip(fallback, leaf_copies, strict=True):
            args[i] = copy
        records = {}
        site_fns = {
            p: functools.partial(_perturb, eps=eps, records=records.setdefault(p, []))
            for p, eps in zip(perturbed, perturbations, strict=True)
        }
        site_fns.update(
            (p, functools.partial(_apply_tap, taps[p], count=count, weight=weight)) for p in tapped
        )
        site_xs = dict(zip(tapped, accs, strict=True))
        loss = evaluate(plan, args + list(example_leaves), site_fns, site_xs)[0]
        return loss, [records[p] for p in perturbed]

    def masked_total(perturbations, accs, leaf_copies):
        losses, records = jax.vmap(example, in_axes=(0, None, 0, 0, 0))(
            perturbations, accs, leaf_copies, mask, jax.tree.leaves(batch)
        )
        return jnp.sum(jnp.where(mask, losses, 0)), (losses, records)

    total, backward, (losses, records) = jax.vjp(
        masked_total, zeros, accumulators, copies, has_aux=True
    )
    deltas, tap_stats, copy_grads = backward(jnp.ones_like(total))
    site_stats = {}
    passed = dict(zip(tapped, tap_stats, strict=True))
    for p, stats in passed.items():
        site = plan.sites[p]
        if site.rule == SCAN_CONSTANT:  # every iteration's operands and δ, stacked

            def rule(r, d, site=site, p=p):
                return scan_constant_stats(site, r, d, leaf_aval=avals[p], coordinates=coordinates)

            stats = guarded(rule, *gather_loop_values(site, passed), count, avals[p], coordinates)
        site_stats[p] = _unstack_scan(site, jax.typeof(leaves[site.view.leaf]), stats)
    shared = {}  # leaf -> its sites, records and δ (tied weights, `_fast_shared`)
    for path, site_records, delta in zip(perturbed, records, deltas, strict=True):
        site = plan.sites[path]
        if site.shared:
            shared.setdefault(site.view.leaf, []).append((site, site_records, delta))
        else:
            site_stats[path] = guarded_stats(
                site, site_records, delta, count, avals[path], coordinates
            )
    site_stats.update(_shared_leaf_stats(shared, count, avals, coordinates))

    grad_sum, sq_sum, sq_norm = [None] * len(leaves), [None] * len(leaves), []
    for path, (g, q, s) in site_stats.items():
        leaf = plan.sites[path].view.leaf
        grad_sum[leaf], sq_sum[leaf] = g, s
        sq_norm.append(q)
    for i, g in zip(fallback, copy_grads, strict=True):
        if coordinates:  # `row_sums`, as the vmap backend (`vmap_sums`)
            grad_sum[i], sq_sum[i] = row_sums(g)
            sq_norm.append(jnp.sum(sq_sum[i]))
        else:
            g = widen(g)
            grad_sum[i] = jnp.sum(g, 0)
            sq_norm.append(jnp.sum(jnp.square(g)))
    if exact:
        stats = _exact_pass(loss_fn, leaves, treedef, exact, batch, mask, coordinates)
        squares = stats.sq_sum if coordinates else [None] * len(exact)
        for i, g, s in zip(exact, stats.grad_sum, squares, strict=True):
            grad_sum[i], sq_sum[i] = g, s
        sq_norm.append(stats.sq_norm_sum)
    for i in plan.unused:
        grad_sum[i] = sq_sum[i] = jnp.zeros(jnp.shape(leaves[i]), _acc(leaves[i]))

    def zero_if_no_real_row(x):
        return jnp.where(count > 0, x, jnp.zeros_like(x))

    def as_tree(values):  # the sites' statistics are guarded already (`guarded`)
        values = [
            zero_if_no_real_row(x) if i in fallback or i in exact else x
            for i, x in enumerate(values)
        ]
        return jax.tree.unflatten(treedef, values)

    return GradStats(
        count=count,
        loss_sum=jnp.sum(masked(losses, mask)),
        grad_sum=as_tree(grad_sum),
        sq_norm_sum=zero_if_no_real_row(sum(sq_norm) if sq_norm else jnp.zeros((), jnp.float32)),
        sq_sum=as_tree(sq_sum) if coordinates else None,
    )


def _apply_tap(tap, y, records, acc, *, count, weight):
    return tap(y, records, acc, count, weight)


def _shared_leaf_stats(shared: dict, count, avals, coordinates: bool) -> dict:
    """Each tied leaf's statistics from all of its sites' records and δ (`_fast_shared`),
    keyed by its first site's path."""
    out = {}
    for uses in shared.values():
        sites, site_records, site_deltas = (list(x) for x in zip(*uses, strict=True))
        leaf_aval = avals[sites[0].path]

        def rule(r, d, sites=sites, leaf_aval=leaf_aval):
            stats = tied_lookup_stats if sites[0].rule == TIED_LOOKUP else shared_stats
            return stats(sites, r, d, leaf_aval=leaf_aval, coordinates=coordinates)

        out[sites[0].path] = guarded(rule, site_records, site_deltas, count, leaf_aval, coordinates)
    return out


def _site_leaf_aval(site, leaves):
    return site.view.scan.aval if site.view.scan else jax.typeof(leaves[site.view.leaf])


def _exact_pass(loss_fn, leaves, treedef, exact, batch, mask, coordinates: bool) -> GradStats:
    """The ``"vmap"`` backend's sums for the leaves ``exact`` alone, the others held fixed.

    For a large leaf without a rule this beats per-example copies in the fast pass: those
    make every operation that reads the leaf run once per example (a weight normalised
    by its column norms: B normalisations, then B matrix-vector products in place of
    one matrix product), where ``jax.vmap`` of the gradient computes what depends on
    the parameters alone once. The price is one more forward and backward pass over the
    batch (two backward passes on XLA:CPU for leaves of more than 16384 entries, norms
    only: `_vmap._norm_sums`), which XLA may merge with the fast pass where both compute
    the same values: for a temperature of the logits (`benchmarks/fallback.py`) the
    compiled program had the same 13 / 18 large matrix products either way (norms only /
    with coordinates).
    Measured in the note of `_LARGEST_COPIED_LEAF`.
    """

    def loss_of(exact_leaves, examples):
        full = list(leaves)
        for i, leaf in zip(exact, exact_leaves, strict=True):
            full[i] = leaf
        return loss_fn(jax.tree.unflatten(treedef, full), examples)

    return vmap_sums(loss_of, [leaves[i] for i in exact], batch, mask, coordinates=coordinates)


def _per_iteration(site, spec):
    """Inside a scan, one accumulator per iteration, stacked: the scan slices them."""
    return (site.view.scan.length, *spec.shape) if site.view.scan else spec.shape


def _unstack_scan(site, leaf_aval, stats):
    """A scanned site's statistics, stacked over the iterations, as the leaf's: Σgᵢ and
    Σgᵢ⊙gᵢ are the slices' stacked (and seen back through the views before the scan),
    Σ‖gᵢ‖² is the sum of the slices'."""
    where = site.view.scan
    if where is None:
        return stats
    grad_sum, sq_norm, sq_sum = stats
    grad_sum = transpose_views(where.outer_chain, leaf_aval, grad_sum)
    if sq_sum is not None:
        sq_sum = transpose_views(where.outer_chain, leaf_aval, sq_sum)
    return grad_sum, jnp.sum(sq_norm), sq_sum


def _perturb(y, site_records, *, eps, records):
    """A perturbed site: y + ε (whose cotangent is δ), its other operands recorded."""
    records.extend(site_records)
    return y + eps


def auto_sums(loss_fn, params, batch, mask, *, coordinates: bool):
    """``"fast"`` where at least one leaf has a layer rule, else ``"vmap"``; no warnings.

    Anything the fast path cannot trace (a primitive the interpreter cannot re-bind, a
    JAX internals change) falls back to ``"vmap"`` with a warning; both happen at trace
    time, so a compiled step never pays for the attempt.
    """
    try:
        plan = build_plan(loss_fn, params, batch, coordinates=coordinates)
        if plan.sites:
            return fast_sums(
                loss_fn, params, batch, mask, coordinates=coordinates, warn=False, plan=plan
            )
    except Exception as error:  # trace-time only; the exact backend always works
        warnings.warn(
            f"backend='auto': the fast statistics failed to trace loss_fn ({error!r}); "
            "using the exact vmap backend. Please report this with the model.",
            stacklevel=3,
        )
    return vmap_sums(loss_fn, params, batch, mask, coordinates=coordinates)


def fast_stats_report(loss_fn, params: PyTree, batch: PyTree, *, coordinates: bool = False):
    """Which rule the ``"fast"`` backend uses for each parameter leaf.

    Returns a dict from the leaf's key path (``jax.tree_util.keystr``) to one of
    ``"dense"`` (one position per example), ``"dense-gram"`` / ``"dense-products"``
    (weights shared over positions), ``"conv"`` / ``"conv-products"``, ``"embedding"``,
    ``"elementwise"`` (scales, biases), ``"products"``, ``"scan-constant"`` (a weight
    that every iteration of a ``lax.scan`` reads whole: RNNs), ``"tied-lookup"`` (a table
    read by a lookup and by one dense layer: tied embeddings), ``"shared-products"`` (a
    leaf linear at several sites otherwise), ``"unused"``, or
    ``"fallback: <reason>"`` (exact per-example gradients for that leaf, from per-example
    copies of it in the fast pass), ``"fallback: <reason> (exact pass)"`` for a leaf of
    more than `_LARGEST_COPIED_LEAF` entries (from a pass of its own, `_exact_pass`).

    Example:
      >>> import jax.numpy as jnp
      >>> from adaptive_batch.stats import fast_stats_report
      >>> def loss_fn(p, batch):
      ...     return jnp.sum((batch @ p["w"] + p["b"]) ** 2, axis=-1)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> fast_stats_report(loss_fn, params, jnp.ones((4, 3)))
      {"['b']": 'elementwise', "['w']": 'dense'}
    """
    plan = build_plan(loss_fn, params, batch, coordinates=coordinates)
    rules = {site.view.leaf: site.rule for site in plan.sites.values()}
    leaves = jax.tree.leaves(params)
    for i, why in plan.fallback.items():
        rules[i] = f"fallback: {why}" + (" (exact pass)" if _takes_exact_pass(leaves[i]) else "")
    rules.update({i: "unused" for i in plan.unused})
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {path: rules[i] for i, path in enumerate(paths)}


def _batch_zeros(reference, shape, dtype):
    """Zeros of shape (B, *shape), laid out over devices like the batch's leading axis."""
    rows = jnp.zeros_like(reference.reshape(reference.shape[0], -1)[:, 0], dtype)
    return jnp.broadcast_to(rows.reshape(rows.shape + (1,) * len(shape)), rows.shape + shape)


def _acc(x):
    return accumulation_dtype(jnp.result_type(x))


def _warn_fallback(loss_fn, plan: Plan, params) -> None:
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    key = (id(loss_fn), tuple(sorted(plan.fallback)))
    if key in _WARNED:
        return
    _WARNED.add(key)
    listing = "; ".join(f"params{paths[i]}: {why}" for i, why in sorted(plan.fallback.items()))
    warnings.warn(
        "backend='fast': no layer rule for some parameters, so their statistics use exact "
        f"per-example gradients (memory batch × leaf size): {listing}. "
        "See adaptive_batch.stats.fast_stats_report(loss_fn, params, batch).",
        stacklevel=3,
    )
