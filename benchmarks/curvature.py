"""Cost of curvature estimates relative to one gradient, measured side by side.

An MLP on synthetic data; every function is jit-compiled and warmed up, then timed as
the median of several runs in this one process:

* ``grad``: ∇F of the mean loss (the unit),
* ``hvp``: one Hessian-vector product, forward over reverse (`hvp`),
* ``top_eigenvalue``: λ_max from m Lanczos steps,
* ``slq``: a spectral density from P probes × m Lanczos steps,
* ``hutchinson``: a trace estimate from P probes.

The Lanczos-based numbers are also given per Hessian-vector product: they linearise
∇F once and reuse it, so each product costs less than a standalone HVP.

Usage: ``python benchmarks/curvature.py [--quick]``. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_seconds

from adaptive_batch.curvature import (
    hutchinson_trace,
    hvp,
    mean_loss,
    spectral_density,
    top_eigenvalue,
)


def mlp_loss(params, batch):
    hidden = batch["x"]
    for layer in params[:-1]:
        hidden = jax.nn.relu(hidden @ layer["w"] + layer["b"])
    logits = hidden @ params[-1]["w"] + params[-1]["b"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]


def make(widths, batch_size, key):
    keys = jax.random.split(key, len(widths) + 1)
    params = [
        {
            "w": jax.random.normal(k, (d_in, d_out)) / jnp.sqrt(d_in),
            "b": jnp.zeros(d_out),
        }
        for k, d_in, d_out in zip(keys, widths[:-1], widths[1:], strict=False)
    ]
    batch = {
        "x": jax.random.normal(keys[-1], (batch_size, widths[0])),
        "y": jax.random.randint(keys[-2], (batch_size,), 0, widths[-1]),
    }
    return params, batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats")
    args = parser.parse_args()
    if args.quick:
        widths, batch_size, repeats, num_iters, num_probes = (40, 128, 128, 10), 128, 5, 10, 4
    else:
        widths, batch_size, repeats, num_iters, num_probes = (40, 512, 512, 10), 1024, 5, 20, 8
    params, batch = make(widths, batch_size, jax.random.key(0))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    key = jax.random.key(1)
    vector = jax.tree.map(jnp.ones_like, params)

    grad_fn = jax.jit(jax.grad(lambda p, b: mean_loss(mlp_loss, p, b)))
    seconds = {
        "grad": median_seconds(lambda: grad_fn(params, batch), repeats=repeats),
        "hvp": median_seconds(lambda: hvp(mlp_loss, params, batch, vector), repeats=repeats),
        "top_eigenvalue": median_seconds(
            lambda: top_eigenvalue(mlp_loss, params, batch, key=key, num_iters=num_iters),
            repeats=repeats,
        ),
        "slq": median_seconds(
            lambda: spectral_density(
                mlp_loss, params, batch, key=key, num_iters=num_iters, num_probes=num_probes
            ),
            repeats=repeats,
        ),
        "hutchinson": median_seconds(
            lambda: hutchinson_trace(mlp_loss, params, batch, key=key, num_probes=num_probes),
            repeats=repeats,
        ),
    }
    products = {
        "grad": 0,
        "hvp": 1,
        "top_eigenvalue": num_iters,
        "slq": num_iters * num_probes,
        "hutchinson": num_probes,
    }
    ratios = {name: s / seconds["grad"] for name, s in seconds.items()}
    print(
        f"device: {jax.devices()[0].platform}, MLP {widths}, {num_params} params, "
        f"batch {batch_size}, m = {num_iters} Lanczos steps, P = {num_probes} probes"
    )
    print(f"{'what':<16}{'HVPs':>6}{'ms':>10}{'× grad':>10}{'× grad / HVP':>14}")
    for name, s in seconds.items():
        per = f"{ratios[name] / products[name]:.2f}" if products[name] else "-"
        print(f"{name:<16}{products[name]:>6}{1e3 * s:>10.2f}{ratios[name]:>10.2f}{per:>14}")
    result = {
        "benchmark": "curvature",
        "device": jax.devices()[0].platform,
        "widths": list(widths),
        "batch_size": batch_size,
        "num_params": int(num_params),
        "num_iters": num_iters,
        "num_probes": num_probes,
        "ms": {name: round(1e3 * s, 3) for name, s in seconds.items()},
        "ratio_to_grad": {name: round(r, 3) for name, r in ratios.items()},
        "ratio_to_grad_per_hvp": {
            name: round(ratios[name] / products[name], 3) for name in seconds if products[name]
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
