"""MNIST-1D (Greydanus 2020), generated offline with the ``mnist1d`` package.

The data is *made* with ``mnist1d.data.make_dataset(args)`` from the package's default
arguments (``get_dataset_args()``), never fetched: ``mnist1d.data.get_dataset``
downloads a pickle from GitHub, this module never calls it. With the defaults this is
the published set: 5000 signals of length 40, 4000 for training and 1000 for testing,
10 classes. Generation takes a few seconds, so the arrays are cached on disk (see
`adaptive_batch.datasets._cache`).
"""

from __future__ import annotations

import random

import numpy as np

from adaptive_batch.datasets._cache import cached_arrays
from adaptive_batch.datasets._dataset import Dataset, split_arrays

#: The published MNIST-1D size: 5000 examples, 4000 train / 1000 test.
DEFAULT_NUM_SAMPLES = 5000
DEFAULT_TRAIN_SPLIT = 0.8
DEFAULT_SEED = 42


def load_mnist1d(
    num_samples: int = DEFAULT_NUM_SAMPLES,
    *,
    train_split: float = DEFAULT_TRAIN_SPLIT,
    seed: int = DEFAULT_SEED,
    cache: bool = True,
) -> Dataset:
    """MNIST-1D: 10 classes of 1-D signals of length 40, made offline.

    Args:
      num_samples: total examples (default 5000, the published set); a multiple of 10
        (the package makes ``num_samples // 10`` per class).
      train_split: fraction for training (default 0.8: 4000 / 1000).
      seed: the generator's seed (default 42, the published set).
      cache: read and write the on-disk cache (default True).

    Returns:
      A `Dataset` with ``x`` of shape ``(n, 40)`` (float32, zero mean, unit variance over
      the whole set, as the package makes it) and ``y`` in 0..9.

    Example:
      >>> from adaptive_batch.datasets import load_mnist1d
      >>> ds = load_mnist1d()
      >>> ds.num_train, ds.num_test, ds.input_shape
      (4000, 1000, (40,))

    References:
      Greydanus, "Scaling down deep learning", 2020, https://arxiv.org/abs/2011.14439
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(
            f"num_samples={num_samples!r} must be an int >= 20 (MNIST-1D makes "
            "num_samples // 10 signals per class); the published set uses 5000."
        )
    if num_samples % 10:
        raise ValueError(
            f"num_samples={num_samples} must be a multiple of 10 (one tenth per class); "
            f"use {num_samples - num_samples % 10} or {num_samples + 10 - num_samples % 10}."
        )
    if not 0 < train_split < 1:
        raise ValueError(f"train_split={train_split!r} must be in (0, 1), e.g. 0.8.")
    import mnist1d
    from mnist1d import data as mnist1d_data

    args = mnist1d_data.get_dataset_args(as_dict=True)
    args.pop("url")  # the download address: not used, and not part of what makes the data
    args.update(num_samples=num_samples, train_split=train_split, seed=seed)
    key = {**args, "mnist1d_version": getattr(mnist1d, "__version__", "unknown")}

    def build():
        x, y = _generate(mnist1d_data, args)
        return {"x": x.astype(np.float32), "y": y.astype(np.int32)}

    arrays = cached_arrays("mnist1d", key, build, cache=cache)
    num_train = int(num_samples * train_split)
    train, test = split_arrays(arrays["x"], arrays["y"], num_train)
    return Dataset(
        name="mnist1d",
        train=train,
        test=test,
        num_classes=10,
        input_shape=tuple(arrays["x"].shape[1:]),
        info={"source": "mnist1d.data.make_dataset (generated offline)", **args},
    )


def _generate(mnist1d_data, args: dict) -> tuple[np.ndarray, np.ndarray]:
    """All examples, train rows first, from ``make_dataset``.

    ``make_dataset`` seeds NumPy's and Python's global generators; their states are
    restored afterwards so loading data does not change the caller's randomness.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = mnist1d_data.make_dataset(_ObjectView(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([made["x"], made["x_test"]])
    y = np.concatenate([made["y"], made["y_test"]])
    return x, y


class _ObjectView:
    """Attribute access to a dict (what ``make_dataset`` expects for its args)."""

    def __init__(self, d: dict):
        self.__dict__ = dict(d)
