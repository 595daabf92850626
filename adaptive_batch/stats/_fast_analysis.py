"""Jaxpr analysis for the ``"fast"`` backend: where does each parameter enter the loss?

The per-example loss ``ℓ(w, x)`` is traced to a jaxpr with the parameter leaves as
inputs. Each leaf is followed through *views* (reshape, transpose, dtype casts,
broadcasts, squeezes) to the equations that consume it. A leaf whose only consumer is
one equation that is linear in it — a *site*: ``dot_general``, ``conv_general_dilated``,
``gather``, elementwise ``mul``/``add``/``sub``/``div`` — has per-example gradient

    gᵢ(W) = Vᵀ (∂y/∂Wv)ᵀ δᵢ,   δᵢ = ∂ℓᵢ/∂y,

with y the site output, Wv the viewed leaf and V the view chain. Every other leaf
(used twice, e.g. tied embeddings, or through another primitive, or inside a loop or a
custom derivative) falls back to exact per-example gradients.

``jit`` / ``closed_call`` / ``core_call`` / ``checkpoint`` sub-jaxprs that receive a
parameter are inlined, because Flax layers and ``jax.numpy`` functions (``jnp.take``)
wrap their work in them. Custom-derivative calls are never inlined: their rule would be
lost.

Sites are keyed by their *path*, the tuple of equation indices from the top jaxpr down
through inlined calls, because the same inner jaxpr object can be called twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

Path = tuple[int, ...]

# Linear, shape-only operations: a parameter seen through them is still "the parameter".
VIEW_PRIMITIVES = frozenset(
    {"reshape", "transpose", "convert_element_type", "squeeze", "broadcast_in_dim", "copy"}
)
# Call primitives whose body is inlined when a parameter flows in.
INLINE_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint"})
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
class View:
    """A value that is parameter leaf ``leaf`` seen through the view equations ``chain``."""

    leaf: int
    chain: tuple[Any, ...] = ()

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


@dataclasses.dataclass
class Plan:
    """Result of the analysis: sites of the fast leaves, fallback reasons, inlined calls."""

    jaxpr: Any  # ClosedJaxpr of the per-example loss
    num_leaves: int
    sites: dict[Path, Site]
    inline: frozenset[Path]
    fallback: dict[int, str]  # leaf -> why it falls back
    unused: frozenset[int]


def sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]]:
    """(jaxpr, consts) of a call equation's body."""
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def analyze(closed_jaxpr, num_leaves: int) -> Plan:
    """Classify every parameter leaf (the first ``num_leaves`` jaxpr inputs)."""
    uses: dict[int, list] = {i: [] for i in range(num_leaves)}
    inline: set[Path] = set()

    def walk(jaxpr, in_infos, prefix: Path):
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
                env[eqn.outvars[0]] = View(view.leaf, (*view.chain, eqn))
            elif name in INLINE_PRIMITIVES:
                inline.add(path)
                body, _ = sub_jaxpr(eqn)
                outs = walk(body, infos, path)
                env.update({v: info for v, info in zip(eqn.outvars, outs, strict=True) if info})
            elif len(views) == 1 and views[0][0] in LINEAR_POSITIONS.get(name, ()):
                pos, view = views[0]
                uses[view.leaf].append(Site(path, eqn, pos, view))
            else:
                for _, view in views:
                    uses[view.leaf].append(f"used by `{name}`")
        for atom in jaxpr.outvars:
            if info_of(atom) is not None:
                uses[info_of(atom).leaf].append("returned without a layer")
        return [info_of(a) for a in jaxpr.outvars]

    jaxpr = closed_jaxpr.jaxpr
    infos = [View(i) for i in range(num_leaves)] + [None] * (len(jaxpr.invars) - num_leaves)
    walk(jaxpr, infos, ())

    sites, fallback, unused = {}, {}, set()
    for leaf, leaf_uses in uses.items():
        if not leaf_uses:
            unused.add(leaf)
        elif len(leaf_uses) == 1 and isinstance(leaf_uses[0], Site):
            sites[leaf_uses[0].path] = leaf_uses[0]
        else:
            reasons = [u if isinstance(u, str) else f"`{u.eqn.primitive.name}`" for u in leaf_uses]
            if len(leaf_uses) > 1:
                fallback[leaf] = f"used {len(leaf_uses)} times ({', '.join(reasons)})"
            else:
                fallback[leaf] = reasons[0]
    return Plan(closed_jaxpr, num_leaves, sites, frozenset(inline), fallback, frozenset(unused))


def bind(eqn, *args, params=None):
    """Bind ``eqn``'s primitive to ``args``, first making every argument vary over the
    same ``shard_map`` axes: the traced jaxpr knows no device axes, while inside
    ``shard_map`` the batch and the params vary over them and constants do not."""
    axes = set().union(*(_varying_axes(a) for a in args))
    if axes:
        args = [_vary(a, axes) for a in args]
    params = eqn.primitive.get_bind_params(eqn.params) if params is None else params
    return eqn.primitive.bind(*args, **params)


def _varying_axes(x) -> set:
    aval = jax.typeof(x)
    manual_axes = getattr(aval, "mat", None)  # the attribute moved across JAX versions
    if manual_axes is not None:
        return set(manual_axes.varying)
    return set(getattr(aval, "vma", ()))


def _vary(x, axes):
    missing = tuple(sorted(axes - _varying_axes(x)))
    return jax.lax.pcast(jnp.asarray(x), missing, to="varying") if missing else x


def vary_like(x, reference):
    """``x`` made to vary over the ``shard_map`` axes that ``reference`` varies over."""
    axes = _varying_axes(reference)
    return _vary(x, axes) if axes else x


def evaluate(plan: Plan, args: Sequence[Any], site_fns: dict[Path, Any]):
    """Run the per-example jaxpr, replacing each site's output y by ``site_fns[path](y, records)``
    with records the site's non-parameter operands. Returns the jaxpr's outputs.
    """

    def run(jaxpr, consts, values, prefix: Path):
        env = {}

        def read(atom):
            return atom.val if isinstance(atom, core.Literal) else env[atom]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, values, strict=True))
        for k, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, k)
            invals = [read(a) for a in eqn.invars]
            if eqn.primitive.name in INLINE_PRIMITIVES:
                # Always inlined here: re-binding a call traced without the caller's mesh
                # fails under vmap over a batch with explicit sharding.
                body, body_consts = sub_jaxpr(eqn)
                outs = run(body, body_consts, invals, path)
            else:
                with eqn.ctx.manager:
                    outs = bind(eqn, *invals)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                site = plan.sites.get(path)
                if site is not None:
                    records = [v for i, v in enumerate(invals) if i != site.weight_pos]
                    outs = [site_fns[path](outs[0], records)]
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(a) for a in jaxpr.outvars]

    return run(plan.jaxpr.jaxpr, plan.jaxpr.consts, list(args), ())
