"""Limits shared by the device-side rules and the host-side controller and loader.

Pure Python on purpose: `adaptive_batch.control` and `adaptive_batch.data` import it
without JAX.
"""

#: The largest batch size anything in the package accepts. The rules keep the batch
#: size in an int32 state; 2**30 leaves a margin below 2**31 for the arithmetic on it.
MAX_REPRESENTABLE_BATCH = 2**30
