"""Cost of exact (vmap) per-example statistics relative to a plain gradient.

For an MLP 40-512-512-10 and the MNIST-1D CNN at batch sizes 64, 256 and 1024, times
(median of repeats, compile excluded) and compiled temporary memory of:

* plain   — ``jax.value_and_grad`` of the mean loss (what ordinary training pays),
* norms   — ``per_example_stats(loss_fn, backend="vmap")`` (Σ‖gᵢ‖²),
* coords  — the same with ``coordinates=True`` (also Σ gᵢ⊙gᵢ),
* chunked — norms with ``microbatch_size=64`` (memory bounded by 64 × params),

each reported as a ratio to plain measured in the same run, and the seconds each takes
to compile (on an H100, XLA:GPU once took over a minute for the norms of the MLP at
B = 256: benchmarks/README.md, "The exact backend on a GPU"). These are the baseline
figures the fast backend has to beat. Last line: a JSON object with the headline
ratios.

    python benchmarks/stats.py            # full table (a few minutes on 2 CPU cores)
    python benchmarks/stats.py --quick    # B = 64 and 256, fewer repeats
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compiled_temp_bytes, median_seconds, print_table

import adaptive_batch as ab


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def mlp(key, sizes=(40, 512, 512, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (m, n)) / m**0.5, "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss_fn(params, batch):
        h = batch["x"]
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return cross_entropy(h @ params[-1]["w"] + params[-1]["b"], batch["y"])

    return params, loss_fn, (40,)


def cnn(key, channels=25, length=40):
    """The MNIST-1D CNN (Greydanus 2020): three conv layers, kernel 5, stride 2, ReLU."""
    keys = jax.random.split(key, 4)
    params, in_channels, width = {}, 1, length
    for i in range(3):
        params[f"conv{i}"] = {
            "w": jax.random.normal(keys[i], (channels, in_channels, 5)) / (5 * in_channels) ** 0.5,
            "b": jnp.zeros(channels),
        }
        in_channels, width = channels, (width + 2 - 5) // 2 + 1
    params["head"] = {
        "w": jax.random.normal(keys[3], (channels * width, 10)) / (channels * width) ** 0.5,
        "b": jnp.zeros(10),
    }

    def loss_fn(params, batch):
        h = batch["x"][:, None, :]
        for i in range(3):
            layer = params[f"conv{i}"]
            h = jax.lax.conv_general_dilated(h, layer["w"], (2,), [(1, 1)])
            h = jax.nn.relu(h + layer["b"][:, None])
        h = h.reshape(h.shape[0], -1)
        return cross_entropy(h @ params["head"]["w"] + params["head"]["b"], batch["y"])

    return params, loss_fn, (length,)


def variants(loss_fn):
    def plain(params, batch):
        return jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)

    # The exact backend by name: the default, "auto", takes the fast one where it applies
    # (`benchmarks/stats_fast.py` measures that).
    exact = functools.partial(ab.per_example_stats, backend="vmap")
    return {
        "plain": plain,
        "norms": exact(loss_fn),
        "coords": exact(loss_fn, coordinates=True),
        "chunked": exact(loss_fn, microbatch_size=64),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B = 64, 256; fewer repeats")
    args = parser.parse_args(argv)
    batch_sizes = (64, 256) if args.quick else (64, 256, 1024)
    repeats = 3 if args.quick else 5

    rows = []
    key = jax.random.key(0)
    for model_name, build in (("mlp", mlp), ("cnn", cnn)):
        params, loss_fn, input_shape = build(key)
        fns = variants(loss_fn)
        for b in batch_sizes:
            batch = {
                "x": jax.random.normal(jax.random.fold_in(key, b), (b, *input_shape)),
                "y": jax.random.randint(jax.random.fold_in(key, b + 1), (b,), 0, 10),
            }
            row = {"model": model_name, "B": b}
            for name, fn in fns.items():
                start = time.perf_counter()
                compiled = jax.jit(fn).lower(params, batch).compile()
                row[f"{name}_compile_s"] = time.perf_counter() - start
                seconds = median_seconds(compiled, params, batch, repeats=repeats)
                row[f"{name}_ms"] = 1e3 * seconds
                row[f"{name}_mem_MiB"] = compiled_temp_bytes(compiled) / 2**20
            for name in ("norms", "coords", "chunked"):
                row[f"{name}/plain"] = row[f"{name}_ms"] / row["plain_ms"]
                row[f"{name}_mem/plain"] = row[f"{name}_mem_MiB"] / max(row["plain_mem_MiB"], 1e-9)
            rows.append(row)
            print(
                f"  {model_name} B={b}: plain {row['plain_ms']:.2f} ms, "
                f"norms x{row['norms/plain']:.1f}",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    )
    print_table(rows, ["model", "B", "plain_ms", "norms/plain", "coords/plain", "chunked/plain"])
    print()
    print_table(
        rows,
        ["model", "B", "plain_mem_MiB", "norms_mem/plain", "coords_mem/plain", "chunked_mem/plain"],
    )
    print()  # seconds to compile: XLA:GPU once took minutes for the norms (README)
    print_table(rows, ["model", "B", *(f"{name}_compile_s" for name in fns)])
    headline = {
        f"{r['model']}_B{r['B']}": {
            "norms_time_ratio": round(r["norms/plain"], 2),
            "coords_time_ratio": round(r["coords/plain"], 2),
            "chunked_time_ratio": round(r["chunked/plain"], 2),
            "norms_mem_ratio": round(r["norms_mem/plain"], 2),
            "norms_compile_s": round(r["norms_compile_s"], 1),
            "chunked_mem_ratio": round(r["chunked_mem/plain"], 2),
        }
        for r in rows
    }
    print(json.dumps({"benchmark": "stats_vmap", "quick": args.quick, "results": headline}))


if __name__ == "__main__":
    main()
