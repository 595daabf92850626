"""Fast statistics of layers stacked and run by ``lax.scan``, against a plain gradient.

Five models, each measured at a few batch sizes:

* ``scan MLP``: 40 → 512, then L = 4 layers 512 → 512 (dense, bias, tanh) stacked along
  a leading axis and run by ``lax.scan``, then 512 → 10;
* ``unrolled MLP``: the same layers as separate leaves in a Python loop (the reference:
  what the scanned layers should cost);
* ``nnx.scan transformer``: L = 4 Flax NNX layers (self-attention, LayerNorm, MLP),
  T = 32, D = 64, created with ``nnx.vmap`` and run by ``nnx.scan`` under ``nnx.remat``;
* ``RNN``: an Elman RNN, 32 inputs → 256 hidden units over T = 16 steps, then 10
  classes; its weights are constants of the loop, read whole by every step (rule
  ``scan-constant``, which fell back to per-example gradients before);
* ``Linen LSTM``: Flax Linen ``nn.RNN(nn.LSTMCell)``, the same inputs and steps, half the
  RNN's hidden units, then 10 classes: twelve ``scan-constant`` sites, whose gates read
  the same x and h.

For each, interleaved in rounds in this one process: ``plain`` (``jax.value_and_grad``
of the masked mean loss, the unit), ``fast`` and ``fast+coords``
(``per_example_stats(backend="fast")``, norms only / with Σgᵢ⊙gᵢ) and ``vmap+coords``
(exact per-example gradients: about what the fast backend paid for the scanned leaves
before it had rules for them, when they fell back). Time is the median over rounds of
the ratio to ``plain`` in the same round; memory the compiled temporary buffers, also
as a ratio, and ``mem+out``: temporary and output buffers together (norms only, whose
outputs are the size of a plain gradient's). XLA may keep temporaries in output
buffers before the outputs are written: the unrolled MLP's plain gradient keeps its
activations in its gradients' buffers, so its temporary memory does not grow with
depth, while the fast backend's does.

Usage: ``python benchmarks/scan.py [--quick] [--batch-sizes 64 256]``. The last line is
a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plain_and_fast, print_table, ratios_to_plain

from adaptive_batch.stats import fast_stats_report, per_example_stats

LAYERS = 4


def mlp_params(width, layers):
    ks = jax.random.split(jax.random.key(0), 4)
    return {
        "first": jax.random.normal(ks[0], (40, width)) / np.sqrt(40),
        "layers": {
            "w": jax.random.normal(ks[1], (layers, width, width)) / np.sqrt(width),
            "b": jnp.zeros((layers, width)),
        },
        "last": jax.random.normal(ks[2], (width, 10)) / np.sqrt(width),
    }


def scan_mlp_loss(params, batch):
    def layer(h, weights):
        return jnp.tanh(h @ weights["w"] + weights["b"]), None

    h, _ = jax.lax.scan(layer, jnp.tanh(batch["x"] @ params["first"]), params["layers"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["last"], batch["y"])


def unrolled(params):
    layers = params["layers"]
    return {
        **params,
        "layers": [{"w": w, "b": b} for w, b in zip(layers["w"], layers["b"], strict=True)],
    }


def unrolled_mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["first"])
    for weights in params["layers"]:
        h = jnp.tanh(h @ weights["w"] + weights["b"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["last"], batch["y"])


class Block(nnx.Module):
    def __init__(self, width, rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=4, in_features=width, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class ScannedTransformer(nnx.Module):
    def __init__(self, vocab, width, layers, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(width, rngs)

        self.blocks = create(rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def forward(x, block):
            return block(x)

        return self.head(forward(self.embed(ids), self.blocks).mean(1))


def transformer_setup():
    graphdef, params = nnx.split(ScannedTransformer(256, 64, LAYERS, nnx.Rngs(0)))

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


STEPS, RNN_INPUTS = 16, 32


def rnn_params(width):
    ks = jax.random.split(jax.random.key(1), 3)
    return {
        "wx": jax.random.normal(ks[0], (RNN_INPUTS, width)) / np.sqrt(RNN_INPUTS),
        "wh": jax.random.normal(ks[1], (width, width)) / np.sqrt(width),
        "b": jnp.zeros(width),
        "head": jax.random.normal(ks[2], (width, 10)) / np.sqrt(width),
    }


def rnn_loss(params, batch):
    """An Elman RNN over T = 16 steps: wx, wh and b are constants of the loop."""

    def step(h, x_t):
        return jnp.tanh(x_t @ params["wx"] + h @ params["wh"] + params["b"]), None

    h0 = jnp.zeros((batch["x"].shape[0], params["wh"].shape[0]))
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(batch["x"], 0, 1))
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["head"], batch["y"])


class LinenLSTM(linen.Module):
    hidden: int

    @linen.compact
    def __call__(self, x):
        return linen.Dense(10)(linen.RNN(linen.LSTMCell(self.hidden))(x)[:, -1])


def lstm_setup(hidden):
    """(loss_fn, params) of a Linen LSTM over the RNN's inputs."""
    model = LinenLSTM(hidden)
    params = model.init(jax.random.key(2), jnp.zeros((1, STEPS, RNN_INPUTS)))

    def loss_fn(params, batch):
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


def measure(loss_fn, params, batch, budget_s: float):
    args = (params, batch, jnp.ones(batch["y"].shape[0]))

    fns = plain_and_fast(loss_fn)
    fns["vmap+coords"] = per_example_stats(loss_fn, backend="vmap", coordinates=True)
    compiled = {name: fn.lower(*args).compile() for name, fn in fns.items()}
    row = ratios_to_plain(compiled, args, budget_s)
    with_outputs = {
        name: c.memory_analysis().temp_size_in_bytes + c.memory_analysis().output_size_in_bytes
        for name, c in compiled.items()
    }
    row["mem+out fast x"] = with_outputs["fast"] / with_outputs["plain"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, short rounds")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    width, budget = (64, 2.0) if args.quick else (512, 10.0)
    batch_sizes = [16] if args.quick else args.batch_sizes
    params = mlp_params(width, LAYERS)
    transformer_loss, transformer_params = transformer_setup()
    models = [
        ("scan MLP", scan_mlp_loss, params, "x"),
        ("unrolled MLP", unrolled_mlp_loss, unrolled(params), "x"),
        ("nnx.scan transformer", transformer_loss, transformer_params, "ids"),
        (f"RNN {width // 2}, T = {STEPS}", rnn_loss, rnn_params(width // 2), "seq"),
        (f"Linen LSTM {width // 4}, T = {STEPS}", *lstm_setup(width // 4), "seq"),
    ]
    rows = []
    for batch_size in batch_sizes:
        key_x, key_y = jax.random.split(jax.random.key(batch_size))
        inputs = {
            "x": jax.random.normal(key_x, (batch_size, 40)),
            "ids": jax.random.randint(key_x, (batch_size, 32), 0, 256),
            "seq": jax.random.normal(key_x, (batch_size, STEPS, RNN_INPUTS)),
        }
        for model, loss_fn, model_params, input_name in models:
            batch = {"x": inputs[input_name], "y": jax.random.randint(key_y, (batch_size,), 0, 10)}
            report = fast_stats_report(loss_fn, model_params, batch, coordinates=True)
            fallback = sum(rule.startswith("fallback") for rule in report.values())
            row = measure(loss_fn, model_params, batch, budget_s=budget)
            rows.append({"model": model, "B": batch_size, "fallback leaves": fallback, **row})
            print(f"measured {model} at B = {batch_size}", file=sys.stderr, flush=True)
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; {LAYERS} stacked layers; "
        "ratios to the plain gradient, measured side by side"
    )
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(json.dumps({"layers": LAYERS, "width": width, "rows": rows}))


if __name__ == "__main__":
    main()
