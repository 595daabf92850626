"""Benchmark: the "fast" per-example statistics against "vmap" and a plain gradient.

For an MLP 40-512-512-10, a small 2-D CNN and a transformer block (Flax NNX:
embedding, attention, LayerNorm, MLP) at B = 64, 256, 1024 it measures, in one run and
side by side (methods interleaved round by round, median of the rounds; each model in a
fresh process, see `run_children`):

* time of ``per_example_stats(backend="fast")`` (norms only), of the same with
  ``coordinates=True``, of ``backend="vmap"`` (the exact backend, norms only) and of
  per-example gradients by ``jax.vmap(jax.grad(...))`` summed into the same statistics
  (`per_example_gradients`: what one writes without this package, the baseline of
  issue 7), each divided by the time of a plain ``jax.value_and_grad`` of the masked
  mean loss (the last two in rounds of their own, see `run_jax`);
* for the MLP, the floor of ``coordinates=True`` on this machine: the plain gradient
  together with the products (a⊙a)ᵀ(δ⊙δ) that Σgᵢ⊙gᵢ needs at least (`coordinate_floor`),
  and the same statistics written by hand for that one model (`coordinates_by_hand`);
* compiled temporary memory (``memory_analysis().temp_size_in_bytes``), as a ratio to
  the plain gradient's.

Targets (issue 7, 2-core CPU): norms <= 1.15x plain, with coordinates <= 1.4x plain,
temporary memory <= 1.5x plain, MLP at B = 256 at least 20x faster than vmap (printed
against both the exact backend and per-example gradients).

With PyTorch and BackPACK installed (``pip install torch==2.13.0
backpack-for-pytorch``) the same MLP and CNN are also timed with BackPACK's
BatchL2Grad (and SumGradSquared for coordinates), reported as our time / BackPACK's;
on the GPU when JAX runs on one and PyTorch sees it (TF32 products on both sides).

Run: ``python benchmarks/stats_fast.py [--quick] [--models mlp,cnn] [--repeats N]
[--batch-sizes 64 4096]``. With
``--repeats N`` each model runs in N fresh processes and the table gives medians and
ranges (`median_rows`). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_rounds, median_ratio

from adaptive_batch.stats import per_example_stats

# ----------------------------------------------------------------------------- models


def xent(logits, labels):
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]


def mlp(key):
    sizes = (40, 512, 512, 10)
    ks = jax.random.split(key, len(sizes))
    params = [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(ks, sizes[:-1], sizes[1:], strict=False)
    ]

    def loss_fn(params, batch):
        h = batch["x"]
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return xent(h @ params[-1]["w"] + params[-1]["b"], batch["y"])

    def make_batch(k, n):
        k1, k2 = jax.random.split(k)
        return {"x": jax.random.normal(k1, (n, 40)), "y": jax.random.randint(k2, (n,), 0, 10)}

    return params, loss_fn, make_batch


CNN_CHANNELS = ((3, 16, 1), (16, 32, 2), (32, 32, 2))  # (in, out, stride), 3x3, padding 1


def cnn(key, channels=None, image_size=16):
    """3×3 convolutions ((in, out, stride) per layer, default `CNN_CHANNELS`) on
    ``image_size``² × 3 images, a spatial mean and a linear classifier."""
    channels = CNN_CHANNELS if channels is None else channels
    ks = jax.random.split(key, len(channels) + 1)
    params = {
        f"conv{i}": {
            "w": jax.random.normal(k, (3, 3, c_in, c_out)) / np.sqrt(9 * c_in),
            "b": jnp.zeros(c_out),
        }
        for i, (k, (c_in, c_out, _)) in enumerate(zip(ks, channels, strict=False))
    }
    width = channels[-1][1]
    params["out"] = {
        "w": jax.random.normal(ks[-1], (width, 10)) / np.sqrt(width),
        "b": jnp.zeros(10),
    }

    def loss_fn(params, batch):
        h = batch["x"]
        for i, (_, _, stride) in enumerate(channels):
            layer = params[f"conv{i}"]
            h = lax.conv_general_dilated(
                h, layer["w"], (stride, stride), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # fmt: skip
            h = jax.nn.relu(h + layer["b"])
        h = h.mean(axis=(1, 2))
        return xent(h @ params["out"]["w"] + params["out"]["b"], batch["y"])

    def make_batch(k, n):
        k1, k2 = jax.random.split(k)
        x = jax.random.normal(k1, (n, image_size, image_size, 3))
        return {"x": x, "y": jax.random.randint(k2, (n,), 0, 10)}

    return params, loss_fn, make_batch


class TransformerBlock(nnx.Module):
    def __init__(self, vocab, width, heads, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.attention(self.ln1(h))
        h = h + self.down(jax.nn.gelu(self.up(self.ln2(h))))
        return self.head(h.mean(axis=1))


def transformer(key, vocab=256, length=32, width=64, heads=4):
    model = TransformerBlock(vocab, width, heads, nnx.Rngs(int(jax.random.randint(key, (), 0, 99))))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        return xent(nnx.merge(graphdef, params, rest)(batch["x"]), batch["y"])

    def make_batch(k, n):
        k1, k2 = jax.random.split(k)
        return {
            "x": jax.random.randint(k1, (n, length), 0, vocab),
            "y": jax.random.randint(k2, (n,), 0, 10),
        }

    return params, loss_fn, make_batch


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}

# ----------------------------------------------------------------------------- timing


def masked_mean_loss(loss_fn):
    def mean_loss(params, batch, mask):
        return jnp.sum(jnp.where(mask, loss_fn(params, batch), 0)) / jnp.sum(mask)

    return mean_loss


def methods_for(loss_fn):
    methods = {
        "plain": jax.jit(jax.value_and_grad(masked_mean_loss(loss_fn))),
        "fast": per_example_stats(loss_fn, backend="fast"),
        "fast_coords": per_example_stats(loss_fn, backend="fast", coordinates=True),
    }
    return methods


def per_example_gradients(loss_fn):
    """Σmᵢgᵢ and Σmᵢ‖gᵢ‖² from per-example gradients, ``jax.vmap(jax.grad(...))``.

    The statistics written the direct way (issue 7's baseline: "jax.vmap of per-example
    gradients ... 190x the time of a plain gradient at B = 128"). The exact backend,
    ``backend="vmap"``, computes the same sums for less: Σgᵢ from one backward pass and
    the norms without keeping every gᵢ (`_vmap._norm_sums`).
    """

    def example_loss(params, example):
        return loss_fn(params, jax.tree.map(lambda x: x[None], example))[0]

    def stats(params, batch, mask):
        grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
        weights = mask.astype(jnp.float32)
        grad_sum = jax.tree.map(lambda g: jnp.tensordot(weights, g, 1), grads)
        sq_norms = sum(
            jnp.sum(jnp.square(g).reshape(g.shape[0], -1), 1) for g in jax.tree.leaves(grads)
        )
        return grad_sum, jnp.dot(weights, sq_norms)

    return jax.jit(stats)


def coordinate_floor(loss_fn, params, batch_size):
    """The plain gradient plus what Σᵢ gᵢ⊙gᵢ adds at least on a network of dense layers.

    For a dense weight (K, N), gᵢ = aᵢ⊗δᵢ and Σᵢ gᵢ⊙gᵢ = (a⊙a)ᵀ(δ⊙δ): a contraction over
    the batch with the FLOPs of the weight gradient itself, and on XLA:CPU the squared
    copies it reads. This times the plain gradient together with that product (narrower
    operand first, as the fast backend does) on random (B, K) and (B, N) operands for
    every 2-D weight: no exact form of the coordinate sums does less, so its ratio to
    the plain gradient bounds what ``coordinates=True`` can reach on this machine.
    Returns ``(fn, extra_args)``; ``fn(params, batch, mask, *extra_args)``.
    """

    def fn(params, batch, mask, operands):
        value_and_grad = jax.value_and_grad(masked_mean_loss(loss_fn))(params, batch, mask)
        squares = [jnp.einsum("bk,bn->kn", a * a, d * d) for a, d in operands]
        return value_and_grad, squares

    shapes = [sorted(w.shape) for w in jax.tree.leaves(params) if w.ndim == 2]
    keys = jax.random.split(jax.random.key(1), 2 * len(shapes))
    operands = [
        (jax.random.normal(keys[2 * i], (batch_size, narrow)),
         jax.random.normal(keys[2 * i + 1], (batch_size, wide)))
        for i, (narrow, wide) in enumerate(shapes)
    ]  # fmt: skip
    return jax.jit(fn), (operands,)


def coordinates_by_hand():
    """The MLP's statistics with coordinates written by hand for this one model.

    Each dense layer is a `jax.custom_vjp` whose reverse rule returns, besides the
    gradients, (x⊙x)ᵀ(δ⊙δ), Σᵢδᵢ⊙δᵢ and Σᵢ(‖xᵢ‖² + 1)‖δᵢ‖² as the "gradient" of a dummy
    input: the statistics computed where a bespoke implementation would compute them,
    with the data dependencies the fast backend has (unlike `coordinate_floor`).
    Returns ``fn(params, batch, mask) -> (loss_sum, grad_sum, sq_norm_sum, sq_sum)``.
    """

    @jax.custom_vjp
    def dense(x, w, b, acc):
        return x @ w + b

    def forward(x, w, b, acc):
        return x @ w + b, (x, w)

    def backward(residuals, g):
        x, w = residuals
        x2, g2 = x * x, g * g
        norms = jnp.sum((jnp.sum(x2, 1) + 1) * jnp.sum(g2, 1))
        return g @ w.T, x.T @ g, jnp.sum(g, 0), (x2.T @ g2, jnp.sum(g2, 0), norms)

    dense.defvjp(forward, backward)

    def stats(params, batch, mask):
        def loss_sum(params, accs):
            h = batch["x"]
            for layer, acc in zip(params[:-1], accs[:-1], strict=True):
                h = jax.nn.relu(dense(h, layer["w"], layer["b"], acc))
            logits = dense(h, params[-1]["w"], params[-1]["b"], accs[-1])
            return jnp.sum(jnp.where(mask, xent(logits, batch["y"]), 0))

        accs = [(jnp.zeros_like(p["w"]), jnp.zeros_like(p["b"]), jnp.zeros(())) for p in params]
        total, (grad_sum, layer_stats) = jax.value_and_grad(loss_sum, (0, 1))(params, accs)
        sq_sum = [{"w": w, "b": b} for w, b, _ in layer_stats]
        return total, grad_sum, sum(norms for *_, norms in layer_stats), sq_sum

    return jax.jit(stats)


def check_by_hand(by_hand, fast_coords, args):
    """The hand-written statistics must be the fast backend's (else the column lies).

    Compared in full float32 products: at JAX's default precision a GPU multiplies in
    TF32, whose rounding (about 1e-3) differs between two orders of the same sums."""
    with jax.default_matmul_precision("highest"):
        total, grad_sum, sq_norm_sum, sq_sum = by_hand(*args)
        stats = fast_coords(*args)
    for want, got in ((stats.loss_sum, total), (stats.grad_sum, grad_sum),
                      (stats.sq_norm_sum, sq_norm_sum), (stats.sq_sum, sq_sum)):  # fmt: skip
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6 * float(jnp.max(jnp.abs(w))))


def measure(methods, args, rounds: int, budget_s: float):
    """Seconds per call (median over rounds) and ratio to "plain" (median over rounds of
    the ratio within a round: every round runs all methods back to back, so load from
    other processes on a shared machine cancels out of the ratios)."""
    for fn in methods.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    runs = {name: lambda fn=fn: jax.block_until_ready(fn(*args)) for name, fn in methods.items()}
    times = interleaved_rounds(runs, rounds, budget_s)
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    return seconds, {name: median_ratio(times, name, "plain") for name in times}


def temp_bytes(fn, args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def run_jax(model_names, batch_sizes, rounds, budget_s, vmap_max_batch):
    rows = []
    for name in model_names:
        params, loss_fn, make_batch = MODELS[name](jax.random.key(0))
        for batch_size in batch_sizes:
            batch = make_batch(jax.random.key(batch_size), batch_size)
            mask = jnp.ones(batch_size)
            methods = methods_for(loss_fn)
            args = (params, batch, mask)
            timed = dict(methods)
            if name == "mlp":  # every weight is a dense layer's: the floor applies
                floor, extra = coordinate_floor(loss_fn, params, batch_size)
                timed["floor"] = lambda *args, floor=floor, extra=extra: floor(*args, *extra)
                timed["by_hand"] = coordinates_by_hand()
                check_by_hand(timed["by_hand"], methods["fast_coords"], args)
            seconds, ratios = measure(timed, args, rounds, budget_s)
            if batch_size <= vmap_max_batch:
                # vmap and per-example gradients are timed in rounds of their own (one
                # each, with the plain gradient): run between the others, their B x params
                # of per-example values evict the caches and slowed the plain gradient
                # that followed (MLP at B = 256: fast with coordinates looked 1.04x plain
                # interleaved with vmap, 1.48x without it). In their rounds an untimed
                # plain call warms the caches again before the timed one: without it the
                # plain call after per-example gradients took 6-50 ms against 4-12 ms with
                # it (MLP, B = 256; 3.2 ms alone), and the ratios looked smaller.
                methods["vmap"] = per_example_stats(loss_fn, backend="vmap")
                methods["grads"] = per_example_gradients(loss_fn)
                for m in ("vmap", "grads"):
                    pair = {"warm": methods["plain"], "plain": methods["plain"], m: methods[m]}
                    pair_seconds, pair_ratios = measure(pair, args, max(3, rounds // 3), budget_s)
                    seconds[m], ratios[m] = pair_seconds[m], pair_ratios[m]
            memory = {m: temp_bytes(fn, args) for m, fn in methods.items()}
            row = {"model": name, "batch": batch_size, "plain_ms": 1e3 * seconds["plain"]}
            for m in methods:
                if m != "plain":
                    row[f"{m}_x"] = ratios[m]
                    row[f"{m}_mem_x"] = memory[m] / max(memory["plain"], 1)
                    row[f"{m}_ms"] = 1e3 * seconds[m]
            if "floor" in ratios:
                row["coords_floor_x"] = ratios["floor"]
                row["coords_by_hand_x"] = ratios["by_hand"]
            if "vmap" in methods:
                row["vmap_over_fast"] = ratios["vmap"] / ratios["fast"]
                row["grads_over_fast"] = ratios["grads"] / ratios["fast"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row):
    def cell(key, fmt="{:.2f}x"):
        return fmt.format(row[key]) if key in row else "-"

    return (
        f"{row['model']:<12}{row['batch']:>6}{row['plain_ms']:>10.2f}"
        f"{cell('fast_x'):>9}{cell('fast_coords_x'):>9}{cell('coords_by_hand_x'):>9}"
        f"{cell('coords_floor_x'):>9}"
        f"{cell('vmap_x', '{:.1f}x'):>9}{cell('grads_x', '{:.1f}x'):>9}"
        f"{cell('fast_mem_x'):>9}{cell('fast_coords_mem_x'):>9}{cell('vmap_mem_x', '{:.1f}x'):>9}"
        f"{cell('grads_mem_x', '{:.1f}x'):>9}"
        f"{cell('vmap_over_fast', '{:.0f}x'):>10}{cell('grads_over_fast', '{:.0f}x'):>11}"
    )


HEADER = (
    f"{'model':<12}{'B':>6}{'plain ms':>10}{'fast':>9}{'+coords':>9}{'by hand':>9}{'floor':>9}"
    f"{'vmap':>9}{'grads':>9}"
    f"{'mem fast':>9}{'mem +co':>9}{'mem vmap':>9}{'mem grad':>9}{'vmap/fast':>10}"
    f"{'grads/fast':>11}"
)

# ----------------------------------------------------------------------------- BackPACK


def run_backpack(model_names, batch_sizes, rounds, budget_s):
    """Time BackPACK on the same MLP and CNN; our time / BackPACK's per row."""
    try:
        import torch
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad, SumGradSquared
    except ImportError as error:
        print(f"BackPACK comparison skipped ({error}).")
        return []
    torch.manual_seed(0)
    # BackPACK runs where JAX runs: on the GPU when JAX's default backend is one and
    # PyTorch sees it too, else on the CPU.
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        # JAX's default float32 precision on recent NVIDIA GPUs is TF32; PyTorch's is full
        # float32 for products. The same arithmetic on both sides.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        # One thread: on the shared 2-core machine PyTorch's two OpenMP threads spin
        # against the other jobs and its median time goes up 50x (XLA's pool does not).
        torch.set_num_threads(1)
    print(f"BackPACK on {device}", flush=True)
    nets = {
        "mlp": lambda: torch.nn.Sequential(
            torch.nn.Linear(40, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
            torch.nn.ReLU(), torch.nn.Linear(512, 10),
        ),
        "cnn": lambda: torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 1, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(32, 10),
        ),
    }  # fmt: skip
    shapes = {"mlp": (40,), "cnn": (3, 16, 16)}
    rows = []
    for name, make in nets.items():
        if name not in model_names:
            continue
        net, loss_fn = extend(make().to(device)), extend(torch.nn.CrossEntropyLoss())
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, *shapes[name], device=device)
            y = torch.randint(0, 10, (batch_size,), device=device)

            def step(*extensions, net=net, loss_fn=loss_fn, x=x, y=y):
                net.zero_grad()
                loss = loss_fn(net(x), y)
                with backpack(*extensions):
                    loss.backward()
                if on_gpu:
                    torch.cuda.synchronize()  # as jax.block_until_ready on our side

            # Ours right before BackPACK's, for the same model and batch. Not interleaved
            # call by call: XLA's and PyTorch's thread pools spin-wait after a call, and
            # alternating them slows both by an order of magnitude.
            params, jax_loss, make_batch = MODELS[name](jax.random.key(0))
            args = (params, make_batch(jax.random.key(batch_size), batch_size))
            args += (jnp.ones(batch_size),)
            ours, _ = measure(methods_for(jax_loss), args, rounds, budget_s)
            runs = {
                "torch": lambda step=step: step(),
                "norms": lambda step=step: step(BatchL2Grad()),
                "coords": lambda step=step: step(BatchL2Grad(), SumGradSquared()),
            }
            for fn in runs.values():
                fn()  # warm up
            theirs = {
                k: float(np.median(t))
                for k, t in interleaved_rounds(runs, rounds, budget_s).items()
            }
            row = {
                "model": name,
                "batch": batch_size,
                "backpack_plain_ms": 1e3 * theirs["torch"],
                "backpack_norms_ms": 1e3 * theirs["norms"],
                "backpack_coords_ms": 1e3 * theirs["coords"],
                "ours_over_backpack_norms": ours["fast"] / theirs["norms"],
                "ours_over_backpack_coords": ours["fast_coords"] / theirs["coords"],
                "plain_jax_over_torch": ours["plain"] / theirs["torch"],
            }
            rows.append(row)
            print(
                f"{name:<12}{batch_size:>6}  BackPACK norms {row['backpack_norms_ms']:8.2f} ms"
                f"  coords {row['backpack_coords_ms']:8.2f} ms  ours/BackPACK:"
                f" norms {row['ours_over_backpack_norms']:.2f}"
                f" coords {row['ours_over_backpack_coords']:.2f}"
                f"  (plain JAX/torch {row['plain_jax_over_torch']:.2f})",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 64 and 256 only, fewer rounds")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--no-backpack", action="store_true")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="batch sizes to measure (default 64 256 1024; with --quick 64 256)",
    )
    parser.add_argument(
        "--same-process", action="store_true", help="measure all models in this process"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per model (N >= 1); with N > 1 the table gives the median "
        "of each ratio over the N runs and its range",
    )
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # a child's result
    args = parser.parse_args()
    if args.batch_sizes and min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes {args.batch_sizes}: every batch size must be at least 1")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: the number of runs must be at least 1")
    if args.repeats > 1 and args.same_process:
        parser.error("--repeats N > 1 runs each model in fresh processes; drop --same-process")
    models = args.models.split(",")
    runs = None
    if args.repeats > 1:
        runs = [run_children(models, args) for _ in range(args.repeats)]
        rows = median_rows([rows for rows, _ in runs])
        backpack_rows = median_rows([backpack for _, backpack in runs])
        print_summary(rows, args.repeats)
    elif len(models) > 1 and not args.same_process:
        rows, backpack_rows = run_children(models, args)
    else:
        rows, backpack_rows = run_here(models, args)
    result = {"rows": rows, "backpack": backpack_rows, "targets_met": targets_met(rows)}
    if runs is not None:
        result["targets_met_per_run"] = [targets_met(rows) for rows, _ in runs]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result))


def run_here(models, args):
    batch_sizes = args.batch_sizes or ((64, 256) if args.quick else (64, 256, 1024))
    rounds, budget_s = (7, 2.0) if args.quick else (21, 8.0)
    vmap_max_batch = 256 if args.quick else 1024
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ratios to plain grad")
    print(HEADER, flush=True)
    rows = run_jax(models, batch_sizes, rounds, budget_s, vmap_max_batch)
    backpack_rows = [] if args.no_backpack else run_backpack(models, batch_sizes, rounds, budget_s)
    return rows, backpack_rows


def run_children(models, args):
    """Each model in a fresh process, as it would be in a training run.

    Measured one after another in one process, ratios depended on what ran before (CNN
    at B = 256, norms: 1.43x after the MLP rows, 1.13x alone; transformer at B = 64 with
    coordinates: 1.3x after the other models, 1.8x alone). For the transformer the
    cause is glibc's malloc: it sets its mmap threshold from the sizes freed earlier,
    and that decides whether a call's temporary buffers come fresh from the OS, with
    page faults on every call (``MALLOC_MMAP_THRESHOLD_=4294967296`` gives 1.3x alone).
    """
    rows, backpack_rows = [], []
    flags = ["--quick"] * args.quick + ["--no-backpack"] * args.no_backpack
    if args.batch_sizes:
        flags += ["--batch-sizes", *map(str, args.batch_sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            out = os.path.join(tmp, f"{name}.json")
            command = [sys.executable, __file__, "--models", name, "--json-out", out, *flags]
            subprocess.run(command, check=True)
            with open(out) as f:
                child = json.load(f)
            rows += child["rows"]
            backpack_rows += child["backpack"]
    return rows, backpack_rows


def median_rows(runs):
    """One row per (model, batch): the median of each number over the runs, and for the
    ratios (keys ending in ``_x`` or holding ``_over_``) also ``<key>_range`` = [min, max].

    One process's ratios moved by up to 0.1 between runs on the shared 2-core machine
    (MLP with coordinates: 1.38-1.49x at B = 64 over eight runs), more than the margins
    the targets are judged on; a median over fresh processes is steadier."""
    grouped = {}
    for rows in runs:
        for row in rows:
            grouped.setdefault((row["model"], row["batch"]), []).append(row)
    result = []
    for (model, batch), group in grouped.items():
        row = {"model": model, "batch": batch, "runs": len(group)}
        for key in group[0]:
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if key in ("model", "batch") or not values:
                continue
            row[key] = float(np.median(values))
            if key.endswith("_x") or "_over_" in key:
                row[f"{key}_range"] = [min(values), max(values)]
        result.append(row)
    return result


def print_summary(rows, repeats):
    print(f"\nmedian (min-max) over {repeats} fresh processes per model; ratios to plain grad")
    keys = ("fast_x", "fast_coords_x", "coords_by_hand_x", "coords_floor_x", "vmap_over_fast")
    keys += ("grads_over_fast",)
    print(f"{'model':<12}{'B':>6}" + "".join(f"{k.removesuffix('_x'):>22}" for k in keys))
    for row in rows:
        cells = []
        for key in keys:
            if key in row:
                low, high = row[f"{key}_range"]
                cells.append(f"{row[key]:.2f}x ({low:.2f}-{high:.2f})")
            else:
                cells.append("-")
        print(f"{row['model']:<12}{row['batch']:>6}" + "".join(f"{c:>22}" for c in cells))


def targets_met(rows):
    return {
        "norms_le_1.15x": all(r["fast_x"] <= 1.15 for r in rows),
        "coords_le_1.4x": all(r["fast_coords_x"] <= 1.4 for r in rows),
        "memory_le_1.5x": all(max(r["fast_mem_x"], r["fast_coords_mem_x"]) <= 1.5 for r in rows),
        # Against the exact backend and against per-example gradients (issue 7's "vmap").
        **{
            f"mlp_b256_{key}_ge_20": all(
                r[key] >= 20 for r in rows if r["model"] == "mlp" and r["batch"] == 256
            )
            for key in ("vmap_over_fast", "grads_over_fast")
        },
    }


if __name__ == "__main__":
    main()
