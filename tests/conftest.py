"""Shared test set-up.

Eight simulated CPU devices so data-parallel code is tested without accelerators; this
must be set before JAX creates its backends, hence at conftest import. On a GPU or TPU
JAX shows the real devices instead: tests marked ``devices(n)`` or ``xla_cpu`` are then
skipped with how to run them (`tests/_requirements.py`).
"""

import jax
import pytest
from _requirements import missing_devices, off_xla_cpu

jax.config.update("jax_num_cpu_devices", 8)


def pytest_runtest_setup(item):
    platform = jax.default_backend()
    for marker in item.iter_markers("devices"):
        verdict = missing_devices(marker.args[0], jax.device_count(), platform)
        if verdict is not None:
            action, why = verdict
            (pytest.fail if action == "fail" else pytest.skip)(why)
    if item.get_closest_marker("xla_cpu") is not None:
        why = off_xla_cpu(platform)
        if why is not None:
            pytest.skip(why)
