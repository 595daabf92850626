"""Shared test set-up.

Eight simulated CPU devices so data-parallel code is tested without accelerators; this
must be set before JAX creates its backends, hence at conftest import. On a GPU or TPU
JAX shows the real devices instead: tests marked ``devices(n)`` or ``xla_cpu`` are then
skipped with how to run them (`tests/_requirements.py`).

Most of the suite's time is compiling (452 of 754 s in one run, timing every call of
XLA's compiler; few programs compile twice), so XLA's LLVM back end runs unoptimised
here (`suite_xla_flags`). That moves float32 results in their last bits only
(per-example statistics of an NNX CNN: at most 2e-7 of each field's largest entry) and
leaves the compiled HLO, which the memory tests read, as it is. Setting
``--xla_backend_optimization_level`` in ``XLA_FLAGS`` yourself keeps your value.
"""

import os

from _requirements import missing_devices, off_xla_cpu, suite_xla_flags

# Before JAX starts its backends, which read XLA_FLAGS once.
os.environ["XLA_FLAGS"] = suite_xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax
import pytest

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
