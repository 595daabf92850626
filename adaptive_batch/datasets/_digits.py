"""scikit-learn's 8×8 handwritten digits (1797 images, shipped with scikit-learn)."""

from __future__ import annotations

import numpy as np

from adaptive_batch.datasets._dataset import Dataset, split_arrays


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The UCI digits as flat vectors of 64 pixels scaled to [0, 1], 10 classes.

    Read from the copy bundled with scikit-learn (``sklearn.datasets.load_digits``), so
    no network is needed; small enough that no disk cache is kept. The split is a
    seeded permutation: ``test_fraction`` of the 1797 images (default 20%: 1438 / 359)
    for testing.

    Example:
      >>> from adaptive_batch.datasets import load_digits
      >>> ds = load_digits()
      >>> ds.num_train + ds.num_test, ds.input_shape, ds.num_classes
      (1797, (64,), 10)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1), e.g. 0.2.")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError(
            "The digits data set needs scikit-learn: pip install scikit-learn"
        ) from error
    bunch = sklearn_load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target
    order = np.random.default_rng(seed).permutation(len(y))
    num_train = len(y) - round(test_fraction * len(y))
    train, test = split_arrays(x[order], y[order], num_train)
    return Dataset(
        name="digits",
        train=train,
        test=test,
        num_classes=10,
        input_shape=(64,),
        info={"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction,
              "seed": seed},
    )  # fmt: skip
