"""Jaxpr analysis for the ``"fast"`` backend: where does each parameter enter the loss?

The per-example loss ``ℓ(w, x)`` is traced to a jaxpr with the parameter leaves as
inputs. Each leaf is followed through *views* (reshape, transpose, dtype casts,
broadcasts, squeezes) to the equations that consume it. A leaf whose only consumer is
one equation that is linear in it — a *site*: ``dot_general``, ``conv_general_dilated``,
``gather``, elementwise ``mul``/``add``/``sub``/``div`` — has per-example gradient

    gᵢ(W) = Vᵀ (∂y/∂Wv)ᵀ δᵢ,   δᵢ = ∂ℓᵢ/∂y,

with y the site output, Wv the viewed leaf and V the view chain. A leaf linear at each
of several sites (tied embeddings) has gᵢ(W) = Σₛ gᵢˢ(W), one term per site. Every
other leaf (used through another primitive, or shared by the iterations of a loop, or
inside a custom derivative) falls back to exact per-example gradients.

Layers stacked along a leading axis and run by ``lax.scan`` (Flax ``nn.scan``,
``nnx.scan``, a hand-written loop over layers) are sites too: a leaf that the scan slices
(one of its ``xs``) gives iteration t the parameter Wₜ = W[t], a weight of its own, so

    gᵢ(W)[t] = gᵢ(Wₜ),   Σᵢ‖gᵢ(W)‖² = Σₜ Σᵢ‖gᵢ(Wₜ)‖²,

and the statistics of W are those of each slice, stacked (`ScanSlice`). A leaf that every
iteration reads whole as a scan constant (a recurrent weight) is one weight shared over
the iterations, like a weight shared over positions: gᵢ(W) = Σₜ gᵢᵗ(W), whose site is
tapped for its inputs and signals at every iteration (`ScanSlice.shared`, rule
``scan-constant``). A leaf in a scan's carry falls back.

``jit`` / ``closed_call`` / ``core_call`` / ``checkpoint`` sub-jaxprs that receive a
parameter are inlined, because Flax layers and ``jax.numpy`` functions (``jnp.take``)
wrap their work in them. A ``jax.checkpoint`` body (primitive ``remat2``) is followed
the same way and re-run under ``jax.checkpoint``, so it is still rematerialised.
Custom-derivative calls are never inlined: their rule would be lost.

Sites are keyed by their *path*, the tuple of equation indices from the top jaxpr down
through inlined calls, because the same inner jaxpr object can be called twice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from adaptive_batch.stats._manual_axes import vary, vary_like, varying_axes

Path = tuple[int, ...]

# Linear, shape-only operations: a parameter seen through them is still "the parameter".
VIEW_PRIMITIVES = frozenset(
    {"reshape", "transpose", "convert_element_type", "squeeze", "broadcast_in_dim", "copy"}
)
# Call primitives whose body is inlined when a parameter flows in.
INLINE_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat2"})
# Bodies that run again in the reverse pass (``jax.checkpoint``, whose primitive is
# ``remat2``) or once per iteration (``scan``): their sites' statistics come from taps.
REMAT_PRIMITIVE = "remat2"
# Primitives linear (or affine) in the operand at these positions.
LINEAR_POSITIONS = {
    "dot_general": (0, 1),
    "conv_general_dilated": (0, 1),
    "mul": (0, 1),
    "add": (0, 1),
    "add_any": (0, 1),
    "sub": (0, 1),
    "div": (0,),
    "gather": (0,),
}


@dataclasses.dataclass(frozen=True)
class ScanSlice:
    """How a leaf reaches the body of the ``lax.scan`` at ``path``: through the views
    ``outer_chain``, then sliced along the leading axis (``length`` slices of ``aval``);
    or, when ``shared``, whole (``aval``) at each of the ``length`` iterations, as a
    constant of the scan."""

    path: Path
    outer_chain: tuple[Any, ...]
    length: int
    aval: Any
    shared: bool = False


@dataclasses.dataclass(frozen=True)
class View:
    """A value that is parameter leaf ``leaf`` seen through the view equations ``chain``
    (inside a scan body: one slice of the leaf, seen through ``chain``; see `ScanSlice`)."""

    leaf: int
    chain: tuple[Any, ...] = ()
    scan: ScanSlice | None = None

    @property
    def bijective(self) -> bool:
        """True when the chain only moves entries around (norms and squares survive it)."""
        return all(
            math.prod(e.invars[0].aval.shape) == math.prod(e.outvars[0].aval.shape)
            for e in self.chain
        )


@dataclasses.dataclass(frozen=True)
class Site:
    """The one equation where a parameter leaf enters the loss, linearly."""

    path: Path
    eqn: Any  # JaxprEqn
    weight_pos: int  # position of the (viewed) parameter among eqn.invars
    view: View
    rule: str = ""  # filled in by the layer rules: "dense", "embedding", ...
    # Inside a scan or checkpoint body: no value may be carried out of it (`_fast_tap`).
    nested: bool = False
    # The leaf enters the loss at other sites too (tied weights): gᵢ sums over them.
    shared: bool = False
    # Rule ``scan-constant``: which site passes each operand and δ out of the loop
    # (`_fast_scan_constant.LoopSources`).
    loop_sources: Any = None


@dataclasses.dataclass
class Plan:
    """Result of the analysis: sites of the fast leaves, fallback reasons, unused leaves."""

    jaxpr: Any  # ClosedJaxpr of the per-example loss
    num_leaves: int
    sites: dict[Path, Site]
    fallback: dict[int, str]  # leaf -> why it falls back
    unused: frozenset[int]
    scans: frozenset[Path] = frozenset()  # scans with sites in their body


def sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]]:
    """(jaxpr, consts) of a call equation's body."""
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def jaxpr_at(jaxpr, path: Path):
    """The body reached from ``jaxpr`` through the call or scan equations at ``path``."""
    for k in path:
        jaxpr = sub_jaxpr(jaxpr.eqns[k])[0]
    return jaxpr


def scan_arity(eqn) -> tuple[int, int]:
    """(number of constants, number of carries) of a ``scan`` equation; its inputs are
    the constants, then the carries, then the ``xs``.

    JAX before 0.11 gives the counts as ``num_consts`` and ``num_carry``; from 0.11 on
    they are the sizes of the first two groups of the ``ft_in`` FlatTree."""
    if "ft_in" in eqn.params:
        consts, carry, _ = eqn.params["ft_in"].unpack()
        return len(consts), len(carry)
    return eqn.params["num_consts"], eqn.params["num_carry"]


def analyze(closed_jaxpr, num_leaves: int) -> Plan:
    """Classify every parameter leaf (the first ``num_leaves`` jaxpr inputs)."""
    uses: dict[int, list] = {i: [] for i in range(num_leaves)}

    def walk(jaxpr, in_infos, prefix: Path, nested: bool = False):
        env = {v: info for v, info in zip(jaxpr.invars, in_infos, strict=True) if info}

        def info_of(atom):
            return None if isinstance(atom, core.Literal) else env.get(atom)

        for k, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, k)
            infos = [info_of(a) for a in eqn.invars]
            views = [(i, info) for i, info in enumerate(infos) if info is not None]
            if not views:
                continue
            name = eqn.primitive.name
            if name in VIEW_PRIMITIVES and len(eqn.invars) == 1:
                view = views[0][1]
                env[eqn.outvars[0]] = dataclasses.replace(view, chain=(*view.chain, eqn))
            elif name in INLINE_PRIMITIVES:
                body, _ = sub_jaxpr(eqn)
                outs = walk(body, infos, path, nested or name == REMAT_PRIMITIVE)
                env.update({v: info for v, info in zip(eqn.outvars, outs, strict=True) if info})
            elif name == "scan":
                outs = walk(sub_jaxpr(eqn)[0], scan_body_infos(eqn, infos, path), path, True)
                env.update(scan_output_infos(eqn, outs, path))
            elif len(views) == 1 and views[0][0] in LINEAR_POSITIONS.get(name, ()):
                pos, view = views[0]
                uses[view.leaf].append(Site(path, eqn, pos, view, nested=nested))
            else:
                for _, view in views:
                    uses[view.leaf].append(f"used by `{name}`")
        outs = [info_of(a) for a in jaxpr.outvars]
        if not prefix:  # a body's outputs are followed where its call's outputs go
            for view in filter(None, outs):
                uses[view.leaf].append("returned without a layer")
        return outs

    def scan_body_infos(eqn, infos, path: Path):
        """Views of the scan body's inputs: slices of the leaves among the ``xs``, and
        the leaves among its constants."""
        num_consts, num_carry = scan_arity(eqn)
        body_invars = sub_jaxpr(eqn)[0].invars
        inner = [None] * len(infos)
        for i, view in enumerate(infos):
            if view is None:
                continue
            is_xs = i >= num_consts + num_carry
            if view.scan is not None:
                how = "sliced" if is_xs else "read"
                uses[view.leaf].append(f"{how} by nested `scan`s")
            elif i < num_consts and view.bijective:
                # Read whole by every iteration: tapped there (rule "scan-constant").
                where = ScanSlice(path, view.chain, eqn.params["length"], body_invars[i].aval)
                inner[i] = View(view.leaf, (), dataclasses.replace(where, shared=True))
            elif not is_xs:
                role = "a constant" if i < num_consts else "a carry"
                uses[view.leaf].append(f"{role} of `scan`, shared by its iterations")
            elif not view.bijective:
                uses[view.leaf].append("broadcast before `scan` slices it")
            else:
                aval = body_invars[i].aval
                where = ScanSlice(path, view.chain, eqn.params["length"], aval)
                inner[i] = View(view.leaf, (), where)
        return inner

    def scan_output_infos(eqn, body_outs, path: Path):
        """Views of the scan's outputs: a slice passed through unchanged stacks back to
        the leaf (Flax's lifted scans return the layers' state so); anything else that
        leaves the body is a use of its own."""
        outs, (_, num_carry) = {}, scan_arity(eqn)
        for j, view in enumerate(body_outs):
            if view is None:
                continue
            passed = (
                view.scan is not None
                and view.scan.path == path
                and not view.scan.shared
                and not view.chain
            )
            if passed and j >= num_carry:
                outs[eqn.outvars[j]] = View(view.leaf, view.scan.outer_chain)
            else:
                uses[view.leaf].append("returned by a `scan` body")
        return outs

    jaxpr = closed_jaxpr.jaxpr
    infos = [View(i) for i in range(num_leaves)] + [None] * (len(jaxpr.invars) - num_leaves)
    walk(jaxpr, infos, ())

    sites, fallback, unused = {}, {}, set()
    for leaf, leaf_uses in uses.items():
        if not leaf_uses:
            unused.add(leaf)
        elif len(leaf_uses) == 1 and isinstance(leaf_uses[0], Site):
            site = leaf_uses[0]
            if site.view.scan and site.view.scan.shared and not _inexact_operands(site):
                # Its operands leave the loop as an accumulator's cotangents: floats only.
                name = site.eqn.primitive.name
                fallback[leaf] = f"a constant of `scan` read by `{name}` of integer operands"
            else:
                sites[site.path] = site
        elif all(isinstance(u, Site) and not u.nested and not u.view.scan for u in leaf_uses):
            # Linear at every use (tied embeddings): per-example products of all of them,
            # summed example by example after the pass (`_fast_shared`).
            sites.update((u.path, dataclasses.replace(u, shared=True)) for u in leaf_uses)
        else:
            reasons = [u if isinstance(u, str) else f"`{u.eqn.primitive.name}`" for u in leaf_uses]
            if len(leaf_uses) > 1:
                fallback[leaf] = f"used {len(leaf_uses)} times ({', '.join(reasons)})"
            else:
                fallback[leaf] = reasons[0]
    scans = frozenset(site.view.scan.path for site in sites.values() if site.view.scan)
    return Plan(closed_jaxpr, num_leaves, sites, fallback, frozenset(unused), scans)


def _inexact_operands(site: Site) -> bool:
    return all(
        jnp.issubdtype(v.aval.dtype, jnp.inexact)
        for i, v in enumerate(site.eqn.invars)
        if i != site.weight_pos
    )


def transpose_views(chain, leaf_aval, cotangent):
    """Map a cotangent of a value seen through the views ``chain`` back to the leaf
    (dtype casts skipped, so the sums keep their accumulation precision)."""

    def view(w):
        for eqn in chain:
            if eqn.primitive.name != "convert_element_type":
                w = bind(eqn, w)
        return w

    primal = vary_like(jnp.zeros(leaf_aval.shape, cotangent.dtype), cotangent)
    return jax.vjp(view, primal)[1](cotangent)[0]


def bind(eqn, *args, params=None):
    """Bind ``eqn``'s primitive to ``args``, first making every argument vary over the
    same ``shard_map`` axes: the traced jaxpr knows no device axes, while inside
    ``shard_map`` the batch and the params vary over them and constants do not."""
    axes = set().union(*(varying_axes(a) for a in args))
    if axes:
        args = [vary(a, axes) for a in args]
    params = eqn.primitive.get_bind_params(eqn.params) if params is None else params
    return eqn.primitive.bind(*args, **params)


def evaluate(plan: Plan, args: Sequence[Any], site_fns: dict[Path, Any], site_xs=None):
    """Run the per-example jaxpr, replacing each site's output y by
    ``site_fns[path](y, records, *xs)`` with records the site's non-parameter operands
    and ``xs`` = ``[site_xs[path]]`` where given. A site inside a scan body gets the
    slice of ``site_xs[path]`` for its iteration (the scan slices it like its ``xs``).
    Returns the jaxpr's outputs.
    """

    def run(jaxpr, consts, values, prefix: Path, xs_of):
        env = {}

        def read(atom):
            return atom.val if isinstance(atom, core.Literal) else env[atom]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, values, strict=True))
        for k, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, k)
            invals = [read(a) for a in eqn.invars]
            if eqn.primitive.name == REMAT_PRIMITIVE:
                # Still rematerialised: the body's sites are taps (`Site.nested`), which
                # carry nothing out of it.
                body, body_consts = sub_jaxpr(eqn)
                rerun = functools.partial(run, body, body_consts, prefix=path, xs_of=xs_of)
                policy, prevent_cse = eqn.params["policy"], eqn.params["prevent_cse"]
                outs = jax.checkpoint(rerun, policy=policy, prevent_cse=prevent_cse)(invals)
            elif eqn.primitive.name in INLINE_PRIMITIVES:
                # Always inlined here: re-binding a call traced without the caller's mesh
                # fails under vmap over a batch with explicit sharding.
                body, body_consts = sub_jaxpr(eqn)
                outs = run(body, body_consts, invals, path, xs_of)
            elif path in plan.scans:
                outs = run_scan(eqn, invals, path, xs_of)
            else:
                with eqn.ctx.manager:
                    outs = bind(eqn, *invals)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                site = plan.sites.get(path)
                if site is not None:
                    records = [v for i, v in enumerate(invals) if i != site.weight_pos]
                    xs = [xs_of[path]] if path in xs_of else []
                    outs = [site_fns[path](outs[0], records, *xs)]
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(a) for a in jaxpr.outvars]

    def run_scan(eqn, invals, path: Path, xs_of):
        """The scan re-run with ``lax.scan``, its body by `run`, slicing the sites' xs."""
        body, body_consts = sub_jaxpr(eqn)
        consts_end, num_carry = scan_arity(eqn)
        carry_end = consts_end + num_carry
        inner = {p: x for p, x in xs_of.items() if p[: len(path)] == path}

        def step(carry, xs):
            values, inner_xs = xs
            outs = run(body, body_consts, [*invals[:consts_end], *carry, *values], path, inner_xs)
            return outs[: len(carry)], outs[len(carry) :]

        # Inside shard_map the body's outputs vary over the batch's device axes. An
        # initial carry that the traced jaxpr builds from constants (zeros, say, which
        # the user's zeros_like(x) became) would not, and lax.scan refuses the mismatch.
        axes = set().union(*(varying_axes(v) for v in jax.tree.leaves((invals, inner))))
        init = [vary(c, axes) if axes else c for c in invals[consts_end:carry_end]]
        carry, ys = jax.lax.scan(
            step,
            init,
            (invals[carry_end:], inner),
            length=eqn.params["length"],
            reverse=eqn.params["reverse"],
            unroll=eqn.params["unroll"],
        )
        return [*carry, *ys]

    return run(plan.jaxpr.jaxpr, plan.jaxpr.consts, list(args), (), site_xs or {})
