"""Built-in data sets for the `adaptive-batch` command, all available offline.

* ``"mnist1d"``: MNIST-1D made with the ``mnist1d`` package (4000 / 1000, length 40),
  cached on disk.
* ``"digits"``: scikit-learn's 8×8 digits (1797 images).
* ``"synthetic"``: Gaussian classes, made on the fly.

Each loader returns a `Dataset` (train / test dicts of NumPy arrays, ``num_classes``,
``input_shape``). `load_dataset` picks one by name.
"""

from __future__ import annotations

from adaptive_batch.datasets._cache import cache_dir, cache_path
from adaptive_batch.datasets._dataset import Dataset
from adaptive_batch.datasets._digits import load_digits
from adaptive_batch.datasets._mnist1d import load_mnist1d
from adaptive_batch.datasets._synthetic import make_synthetic

#: name -> loader; every loader takes keyword arguments only beyond its first.
DATASETS = {"mnist1d": load_mnist1d, "digits": load_digits, "synthetic": make_synthetic}


def load_dataset(name: str, **kwargs) -> Dataset:
    """The built-in data set called ``name`` (one of `DATASETS`), made with ``kwargs``.

    Example:
      >>> from adaptive_batch.datasets import load_dataset
      >>> load_dataset("synthetic", num_train=64, num_test=16).num_train
      64
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name](**kwargs)


__all__ = [
    "DATASETS",
    "Dataset",
    "cache_dir",
    "cache_path",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "make_synthetic",
]
