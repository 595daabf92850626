"""``adaptive-batch train --spectrum``: the Hessian spectrum of the trained model.

After training, stochastic Lanczos quadrature (`adaptive_batch.spectral_density`)
estimates the spectral density of the Hessian of the mean training loss on a fixed
batch of training examples, and `adaptive_batch.top_eigenvalue` its largest
eigenvalue; the density is written to ``spectrum.png`` in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import adaptive_batch as ab
from adaptive_batch.curvature import plot_spectrum
from adaptive_batch.datasets import Dataset
from adaptive_batch.models import ModelFns

#: Training examples the Hessian is taken over (the whole set if smaller).
SPECTRUM_EXAMPLES = 1000


def write_spectrum(
    fns: ModelFns,
    params: Any,
    dataset: Dataset,
    out: Path,
    *,
    seed: int = 0,
    num_iters: int = 32,
    num_probes: int = 8,
    title: str | None = None,
) -> dict[str, Any]:
    """Estimate the Hessian spectrum at ``params``, plot it to ``out/spectrum.png``.

    Returns the figures for the run's summary: ``top_eigenvalue`` (λ_max by Lanczos,
    the largest stable SGD learning rate is about 2/λ_max), ``spectrum_examples`` and
    ``spectrum_plot``.
    """
    size = min(SPECTRUM_EXAMPLES, dataset.num_train)
    batch = jax.tree.map(lambda x: jnp.asarray(x[:size]), dataset.train)
    key_density, key_top = jax.random.split(jax.random.key(seed))
    density = ab.spectral_density(
        fns.loss_fn, params, batch, key=key_density, num_iters=num_iters, num_probes=num_probes
    )
    top = ab.top_eigenvalue(fns.loss_fn, params, batch, key=key_top, num_iters=num_iters)
    path = out / "spectrum.png"
    plot_spectrum(density, path, title=title or f"Hessian spectral density (SLQ, {size} examples)")
    return {"top_eigenvalue": float(top), "spectrum_examples": size, "spectrum_plot": path.name}
