"""What a test needs of the machine, and what to do when it is missing.

Two markers (registered in ``pyproject.toml``, applied in ``tests/conftest.py``):

* ``@pytest.mark.devices(n)``: the test builds a mesh of ``n`` devices. On the CPU,
  ``tests/conftest.py`` simulates 8, so fewer there is a broken set-up and the test
  fails. On a GPU or TPU JAX shows the real devices (often one), and the test is
  skipped with how to run it: ``JAX_PLATFORMS=cpu`` makes JAX simulate them.
* ``@pytest.mark.xla_cpu``: the test asserts a figure of XLA:CPU's compiled program
  (temporary memory measured there); another platform compiles another program, so
  the test is skipped off the CPU.

And the XLA flags the suite compiles with (`suite_xla_flags`).
"""

from __future__ import annotations


def missing_devices(needed: int, count: int, platform: str) -> tuple[str, str] | None:
    """``None`` when ``count`` devices suffice for a test that needs ``needed``; else
    ``("fail", why)`` on the CPU (its 8 simulated devices are the set-up's promise) or
    ``("skip", why)`` on any other ``platform``."""
    if count >= needed:
        return None
    if platform == "cpu":
        return "fail", (
            f"needs {needed} devices and JAX has {count} CPU device(s): tests/conftest.py "
            "sets jax_num_cpu_devices to 8 before JAX starts; was JAX started earlier "
            "(say, by a plugin), or XLA_FLAGS set to fewer devices?"
        )
    return "skip", (
        f"needs {needed} devices and JAX has {count} {platform} device(s); "
        "run with JAX_PLATFORMS=cpu to simulate 8 devices on the CPU"
    )


def off_xla_cpu(platform: str) -> str | None:
    """The reason to skip a test of XLA:CPU's compiled program on ``platform``, or None."""
    if platform == "cpu":
        return None
    return (
        f"asserts a figure of XLA:CPU's compiled program and JAX runs on {platform}; "
        "run with JAX_PLATFORMS=cpu to check it"
    )


# Compile time, not run time, dominates the suite: the LLVM back end's optimisations
# cost more than they save on its small programs. A test module of scanned models took
# 105 s with these flags, 138 s without (2-core CPU); random-number programs compile
# about 3x faster.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def suite_xla_flags(xla_flags: str) -> str:
    """``xla_flags`` with `FAST_COMPILE_FLAGS` added, unless it already sets the back
    end's optimisation level (then it is returned unchanged: the caller's choice)."""
    if "--xla_backend_optimization_level" in xla_flags:
        return xla_flags
    return " ".join([xla_flags, *FAST_COMPILE_FLAGS]).strip()
