"""A plot of an SLQ spectral density (matplotlib, imported only when plotting)."""

from __future__ import annotations

import os

import numpy as np

from adaptive_batch.curvature._slq import SpectralDensity


def plot_spectrum(
    density: SpectralDensity,
    path: str | os.PathLike,
    *,
    sigma: float | None = None,
    num_points: int = 512,
    log_scale: bool = True,
    title: str | None = "Hessian spectral density (SLQ)",
) -> tuple[np.ndarray, np.ndarray]:
    """Write the Gaussian-smoothed spectral density to an image file.

    The density is `SpectralDensity.on_grid`; a logarithmic y axis (the default, as in
    Ghorbani et al. and PyHessian) shows the outliers next to the bulk. The format
    follows the file name's suffix (``.png``, ``.pdf``, ``.svg``).

    Args:
      density: an SLQ estimate from `spectral_density`.
      path: the image file to write; its directory must exist.
      sigma, num_points: passed to `SpectralDensity.on_grid`.
      log_scale: logarithmic density axis (values below 1e-12 of the peak are clipped).
      title: figure title, or None.

    Returns:
      ``(grid, values)`` that were plotted, as NumPy arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adaptive_batch.curvature import plot_spectrum, spectral_density
      >>> def loss_fn(w, x):
      ...     return 0.5 * (x @ w) ** 2
      >>> density = spectral_density(loss_fn, jnp.zeros(4), jnp.eye(4),
      ...                            key=jax.random.key(0), num_iters=4)
      >>> grid, values = plot_spectrum(density, "/tmp/spectrum.png")
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid, values = density.on_grid(sigma=sigma, num_points=num_points)
    grid, values = np.asarray(grid), np.asarray(values)
    figure, axes = plt.subplots(figsize=(6, 4))
    try:
        shown = np.maximum(values, 1e-12 * values.max()) if log_scale else values
        axes.plot(grid, shown)
        if log_scale:
            axes.set_yscale("log")
        axes.set_xlabel("eigenvalue")
        axes.set_ylabel("density")
        if title:
            axes.set_title(title)
        figure.tight_layout()
        figure.savefig(os.fspath(path))
    finally:
        plt.close(figure)
    return grid, values
