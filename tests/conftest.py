"""Shared test set-up.

Eight simulated CPU devices so data-parallel code is tested without accelerators; this
must be set before JAX creates its backends, hence at conftest import.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
