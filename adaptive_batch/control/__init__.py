"""Host-side batch-size control: `BatchSizeController` and the `BatchPlan` it returns.

Pure Python: importing this subpackage's modules needs neither JAX nor NumPy.
"""

from adaptive_batch.control._controller import BatchPlan, BatchSizeController

__all__ = ["BatchPlan", "BatchSizeController"]
