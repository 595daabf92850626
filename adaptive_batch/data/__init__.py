"""Host-side data pipeline: batches whose size changes every step, each example once per epoch.

`Loader` reads a dict/tuple of NumPy arrays or any random-access source (``len`` +
``source[i]``, the Grain protocol), pads each batch to its plan's size with a mask,
prefetches on a background thread, places batches with a ``jax.sharding.Sharding``, and
checkpoints its position. JAX is imported only for placement.
"""

from adaptive_batch.data._loader import Batch, Loader
from adaptive_batch.data._order import EpochOrder

__all__ = ["Batch", "EpochOrder", "Loader"]
