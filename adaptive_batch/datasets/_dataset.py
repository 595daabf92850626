"""`Dataset`: the common return type of the built-in data sets."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification data set held in memory as NumPy arrays.

    Attributes:
      name: the registry name (``"mnist1d"``, ``"digits"``, ``"synthetic"``).
      train, test: ``{"x": float32 (n, *input_shape), "y": int32 (n,)}``, ready for
        `adaptive_batch.data.Loader` (a dict of arrays with a leading example axis).
      num_classes: labels are ``0 .. num_classes - 1``.
      input_shape: the shape of one example's ``x``.
      info: how the data was made (arguments, source), for a run's config.json.
    """

    name: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int
    input_shape: tuple[int, ...]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train["y"])

    @property
    def num_test(self) -> int:
        return len(self.test["y"])


def split_arrays(x, y, num_train: int) -> tuple[dict, dict]:
    """The first ``num_train`` rows for training, the rest for testing, as float32/int32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int32)
    train = {"x": x[:num_train], "y": y[:num_train]}
    test = {"x": x[num_train:], "y": y[num_train:]}
    return train, test
