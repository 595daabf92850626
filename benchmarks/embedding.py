"""Fast statistics of embedding lookups, against a plain gradient, measured side by side.

Two token models that are an embedding table, a mean over positions and a linear
classifier: one in Flax NNX (``nnx.Embed``: ``jnp.take`` of ids) and one in Equinox
(``eqx.nn.Embedding``: one token at a time under ``jax.vmap``, a batched dynamic
slice). For each, interleaved in rounds in this one process:

* ``plain``: ``jax.value_and_grad`` of the masked mean loss (the unit),
* ``fast`` / ``fast+coords``: ``per_example_stats(backend="fast")``, norms only / with
  Σgᵢ⊙gᵢ (the ``embedding`` rule),
* for Equinox, ``products+coords``: the same with the lookup sent through the generic
  per-example products of the whole table (what ``eqx.nn.Embedding`` used before the
  embedding rule recognised its form).

A third model ties the table to the output layer (``nnx.Embed.attend``, logits over the
vocabulary at every position, next-token targets): the table's statistics then come
from the ``tied-lookup`` rule (with coordinates, ``shared-products``: the backend's
choice there), shown against ``shared``/``shared+coords``, the general rule for tied
weights (per-example tables a chunk of examples at a time), ``tied+coords``, the
``tied-lookup`` rule forced with coordinates, and
``vmap+coords``, exact per-example gradients (what the fallback for tied weights held
in memory: B tables).

Time is the median over rounds of the ratio to ``plain`` in the same round; memory the
compiled temporary buffers, also as a ratio. Needs ``pip install equinox``.

Usage: ``python benchmarks/embedding.py [--quick] [--vocab V --width D --length T
--batch B]``. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plain_and_fast, print_table, ratios_to_plain

import adaptive_batch.stats._fast as fast_module
import adaptive_batch.stats._fast_rules as fast_rules
from adaptive_batch.stats import fast_stats_report, per_example_stats
from adaptive_batch.stats._fast_tied import tied_lookup_pair


class NnxTokens(nnx.Module):
    def __init__(self, vocab, width, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.embed(ids).mean(1))


class EqxTokens(eqx.Module):
    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, vocab, width, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(vocab, width, key=k1)
        self.head = eqx.nn.Linear(width, 10, key=k2)

    def __call__(self, ids):
        return self.head(jnp.mean(jax.vmap(self.embed)(ids), 0))


class NnxTiedTokens(nnx.Module):
    """Tied input and output embedding: the table also maps each position to logits."""

    def __init__(self, vocab, width, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.mix = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.mix(self.embed(ids))))


def nnx_tied_setup(vocab, width):
    graphdef, params, rest = nnx.split(NnxTiedTokens(vocab, width, nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, batch):  # next-token style: a target per position
        logits = nnx.merge(graphdef, params, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(-1)

    return loss_fn, params


def nnx_setup(vocab, width):
    graphdef, params, rest = nnx.split(NnxTokens(vocab, width, nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


def eqx_setup(vocab, width):
    params, static = eqx.partition(EqxTokens(vocab, width, jax.random.key(0)), eqx.is_inexact_array)

    def loss_fn(params, batch):
        logits = jax.vmap(eqx.combine(params, static))(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


def compile_without_embedding_rule(loss_fn, args):
    """Fast statistics compiled with the embedding rule switched off: the lookup goes
    through the generic per-example products."""
    recognise = fast_rules.is_embedding
    fast_rules.is_embedding = lambda site: False
    try:
        return per_example_stats(loss_fn, backend="fast", coordinates=True).lower(*args).compile()
    finally:
        fast_rules.is_embedding = recognise


def compile_with_tied_rule(loss_fn, args, coordinates: bool, tied_lookup: bool):
    """Fast statistics compiled with the tied table's rule forced: ``tied-lookup`` when
    ``tied_lookup`` (also where the backend prefers ``shared-products``: coordinates with
    logits at every position), else the general ``shared-products``."""
    choose = fast_module.uses_tied_lookup
    fast_module.uses_tied_lookup = lambda sites, *_: tied_lookup and bool(tied_lookup_pair(sites))
    try:
        stats = per_example_stats(loss_fn, backend="fast", coordinates=coordinates)
        return stats.lower(*args).compile()
    finally:
        fast_module.uses_tied_lookup = choose


def measure(loss_fn, params, batch, with_products: bool, tied: bool, budget_s: float):
    args = (params, batch, jnp.ones(batch["y"].shape[0]))

    fns = plain_and_fast(loss_fn)
    compiled = {name: fn.lower(*args).compile() for name, fn in fns.items()}
    if with_products:
        compiled["products+coords"] = compile_without_embedding_rule(loss_fn, args)
    if tied:
        for coordinates, suffix in ((False, ""), (True, "+coords")):
            compiled[f"shared{suffix}"] = compile_with_tied_rule(loss_fn, args, coordinates, False)
        compiled["tied+coords"] = compile_with_tied_rule(loss_fn, args, True, True)
        vmap = per_example_stats(loss_fn, backend="vmap", coordinates=True)
        compiled["vmap+coords"] = vmap.lower(*args).compile()
    return ratios_to_plain(compiled, args, budget_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short rounds")
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.width, args.length, args.batch = 2000, 32, 16, 16
    for name in ("vocab", "width", "length", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    key_x, key_y = jax.random.split(jax.random.key(1))
    ids = jax.random.randint(key_x, (args.batch, args.length), 0, args.vocab)
    labels = jax.random.randint(key_y, (args.batch,), 0, 10)
    next_ids = jax.random.randint(key_y, (args.batch, args.length), 0, args.vocab)
    budget = 3.0 if args.quick else 15.0
    rows = []
    models = (
        ("nnx.Embed", nnx_setup, labels),
        ("eqx.nn.Embedding", eqx_setup, labels),
        ("nnx.Embed tied (attend)", nnx_tied_setup, next_ids),
    )
    for model, setup, targets in models:
        batch = {"x": ids, "y": targets}
        loss_fn, params = setup(args.vocab, args.width)
        rule = next(r for p, r in fast_stats_report(loss_fn, params, batch).items() if "embed" in p)
        row = measure(
            loss_fn,
            params,
            batch,
            with_products=model.startswith("eqx"),
            tied="tied" in model,
            budget_s=budget,
        )
        rows.append({"model": model, "rule": rule, **row})
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; V={args.vocab} D={args.width} "
        f"T={args.length} B={args.batch}; ratios to the plain gradient, measured side by side"
    )
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(json.dumps({"sizes": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
