"""JAX's persistent compilation cache for the command: a step compiled by one run is
read from disk by the next (another method of ``compare``, another seed, a
``--resume``), instead of being compiled again.

The directory is ``--compile-cache DIR``, else ``$JAX_COMPILATION_CACHE_DIR`` when the
user set it, else ``xla/`` in the package's cache (``$ADAPTIVE_BATCH_CACHE``, or
``~/.cache/adaptive_batch``). Entries are keyed by the program, the JAX and XLA
versions and the devices, so a stale entry is never used; a damaged one is skipped
with a warning and compiled again. Delete the directory to reclaim its space.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptive_batch.datasets._cache import cache_dir


def default_directory() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR``, else ``<package cache>/xla``."""
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(chosen) if chosen else cache_dir() / "xla"


def use_compile_cache(directory: Path) -> None:
    """Keep every compiled program of this process in ``directory`` and read it back."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX caches only programs that took >= 1 s to compile by default; a step of a
    # small model compiles in 0.3-1.5 s on a CPU and is worth keeping all the same.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
