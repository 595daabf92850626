"""On-disk cache of generated arrays: one ``.npz`` per (data set, arguments), written atomically.

The cache directory is ``$ADAPTIVE_BATCH_CACHE`` if set, else ``~/.cache/adaptive_batch``.
A file's name carries a hash of the arguments that made it, so changing any argument
makes a new file rather than reading a stale one. Files are written to a temporary name
in the same directory and renamed (``os.replace`` is atomic), so a crash or two
processes generating at once never leave a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV_VAR = "ADAPTIVE_BATCH_CACHE"


def cache_dir() -> Path:
    """``$ADAPTIVE_BATCH_CACHE``, or ``~/.cache/adaptive_batch``."""
    root = os.environ.get(ENV_VAR)
    return Path(root) if root else Path.home() / ".cache" / "adaptive_batch"


def cache_path(name: str, key: dict) -> Path:
    """Where the arrays of data set ``name`` made with arguments ``key`` are cached."""
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.npz"


def cached_arrays(
    name: str, key: dict, build: Callable[[], dict[str, np.ndarray]], *, cache: bool = True
) -> dict[str, np.ndarray]:
    """Load the arrays for (name, key) from the cache, or ``build()`` and store them.

    ``cache=False`` builds without reading or writing the disk. A cache file that
    cannot be read (truncated by hand, wrong format) is rebuilt and replaced.
    """
    if not cache:
        return build()
    path = cache_path(name, key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError, EOFError):
            pass  # unreadable: rebuild below and overwrite it
    arrays = build()
    _write_atomically(path, arrays)
    return arrays


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        # A read-only or full disk must not stop training; the data is in memory.
        return
