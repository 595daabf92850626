"""The rules of the ``devices(n)`` and ``xla_cpu`` markers, and the suite's XLA flags
(`tests/_requirements.py`)."""

import os

import jax
import pytest
from _requirements import FAST_COMPILE_FLAGS, missing_devices, off_xla_cpu, suite_xla_flags


def test_enough_devices_run_anywhere():
    assert missing_devices(8, 8, "cpu") is None
    assert missing_devices(4, 8, "gpu") is None


def test_too_few_cpu_devices_fail_as_a_broken_set_up():
    action, why = missing_devices(8, 1, "cpu")
    assert action == "fail"
    assert "needs 8 devices" in why and "1 CPU device" in why and "jax_num_cpu_devices" in why


def test_too_few_accelerators_skip_with_how_to_run_the_test():
    action, why = missing_devices(8, 1, "gpu")
    assert action == "skip"
    assert "needs 8 devices" in why and "1 gpu device" in why and "JAX_PLATFORMS=cpu" in why


def test_xla_cpu_figures_skip_off_the_cpu_only():
    assert off_xla_cpu("cpu") is None
    assert "JAX_PLATFORMS=cpu" in off_xla_cpu("tpu")


def test_this_set_up_runs_every_device_test_on_the_cpu():
    """On the CPU the marked tests must run, not skip: conftest's 8 devices are there."""
    if jax.default_backend() != "cpu":
        pytest.skip("on an accelerator the device tests skip by design")
    assert missing_devices(8, jax.device_count(), "cpu") is None


class _Item:
    """The part of a pytest item that the hook reads: its markers."""

    def __init__(self, *marks):
        self.marks = marks

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)

    def get_closest_marker(self, name):
        return next(self.iter_markers(name), None)


def test_the_hook_applies_the_markers(monkeypatch):
    import conftest

    needs_two, cpu_figure = pytest.mark.devices(2).mark, pytest.mark.xla_cpu.mark
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(pytest.skip.Exception, match="needs 2 devices"):
        conftest.pytest_runtest_setup(_Item(needs_two))
    with pytest.raises(pytest.skip.Exception, match="XLA:CPU"):
        conftest.pytest_runtest_setup(_Item(cpu_figure))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(pytest.fail.Exception, match="jax_num_cpu_devices"):
        conftest.pytest_runtest_setup(_Item(needs_two))
    conftest.pytest_runtest_setup(_Item(cpu_figure))  # runs on the CPU
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    conftest.pytest_runtest_setup(_Item(needs_two))


def test_fast_compile_flags_join_the_callers_flags():
    assert suite_xla_flags("") == " ".join(FAST_COMPILE_FLAGS)
    devices = "--xla_force_host_platform_device_count=4"
    assert suite_xla_flags(devices).split() == [devices, *FAST_COMPILE_FLAGS]


def test_a_callers_optimisation_level_is_kept():
    mine = "--xla_dump_to=/tmp/x --xla_backend_optimization_level=3"
    assert suite_xla_flags(mine) == mine


def test_this_run_compiles_with_a_chosen_optimisation_level():
    """conftest set XLA_FLAGS before JAX started (or the caller chose a level)."""
    assert "--xla_backend_optimization_level=" in os.environ["XLA_FLAGS"]
