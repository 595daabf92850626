"""adaptive_batch: training with a batch size chosen by the training itself.

The batch size is set from measured gradient noise (CABS, adaptive sampling tests,
AdAdaGrad), as Optax gradient transformations fed by per-example gradient statistics.
"""

from adaptive_batch import data  # host-side; imports JAX only to place batches
from adaptive_batch.control import BatchPlan, BatchSizeController
from adaptive_batch.curvature import (
    hutchinson_trace,
    scale_by_curvature,
    spectral_density,
    top_eigenvalue,
)
from adaptive_batch.stats import GradStats, per_example_stats
from adaptive_batch.training import (  # also binds adaptive_batch.training
    fit,
    make_linen_train_step,
    make_train_step,
)
from adaptive_batch.transforms import (
    adadagrad,
    adadagrad_norm,
    augmented_inner_product_test,
    cabs,
    cabs_rule,
    coordinate_norm_test,
    gradient_noise_scale,
    inner_product_test,
    norm_test,
    scale_by_adagrad_norm,
    scale_by_batch_size,
    suggested_batch_size,
)

__version__ = "0.1.0.dev0"


def __getattr__(name: str):
    # make_nnx_train_step imports Flax (0.7 s): only for those who use it.
    if name == "make_nnx_train_step":
        from adaptive_batch.training import make_nnx_train_step

        return make_nnx_train_step
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchPlan",
    "BatchSizeController",
    "GradStats",
    "__version__",
    "adadagrad",
    "adadagrad_norm",
    "augmented_inner_product_test",
    "cabs",
    "cabs_rule",
    "coordinate_norm_test",
    "curvature",
    "data",
    "fit",
    "gradient_noise_scale",
    "hutchinson_trace",
    "inner_product_test",
    "make_linen_train_step",
    "make_nnx_train_step",
    "make_train_step",
    "norm_test",
    "per_example_stats",
    "scale_by_adagrad_norm",
    "scale_by_batch_size",
    "scale_by_curvature",
    "spectral_density",
    "suggested_batch_size",
    "top_eigenvalue",
    "training",
]
