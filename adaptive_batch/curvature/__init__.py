"""Curvature of the mean loss: Hessian-vector products, Lanczos, SLQ spectra, and a
learning rate and momentum set from the Hessian's extreme eigenvalues."""

from adaptive_batch.curvature._curvature_lr import CurvatureState, scale_by_curvature
from adaptive_batch.curvature._hvp import flat_hvp, hvp, mean_loss
from adaptive_batch.curvature._lanczos import LanczosResult, lanczos
from adaptive_batch.curvature._plot import plot_spectrum
from adaptive_batch.curvature._slq import SpectralDensity, spectral_density
from adaptive_batch.curvature._top_eigenvalue import top_eigenvalue
from adaptive_batch.curvature._trace import hutchinson_trace

__all__ = [
    "CurvatureState",
    "LanczosResult",
    "SpectralDensity",
    "flat_hvp",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "mean_loss",
    "plot_spectrum",
    "scale_by_curvature",
    "spectral_density",
    "top_eigenvalue",
]
