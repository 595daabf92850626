"""adaptive_batch: training with a batch size chosen by the training itself.

The batch size is set from measured gradient noise (CABS, adaptive sampling tests,
AdAdaGrad), as Optax gradient transformations fed by per-example gradient statistics.
"""

from adaptive_batch.control import BatchPlan, BatchSizeController
from adaptive_batch.stats import GradStats, per_example_stats

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchPlan",
    "BatchSizeController",
    "GradStats",
    "__version__",
    "per_example_stats",
]
