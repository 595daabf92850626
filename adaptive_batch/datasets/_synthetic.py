"""A synthetic classification task: Gaussian classes around random means."""

from __future__ import annotations

import numpy as np

from adaptive_batch.datasets._dataset import Dataset, split_arrays


def make_synthetic(
    num_train: int = 2000,
    num_test: int = 500,
    *,
    dim: int = 32,
    num_classes: int = 4,
    separation: float = 1.0,
    seed: int = 0,
) -> Dataset:
    r"""Classes drawn from Gaussians: y ~ Uniform{0..K−1}, x = μ_y + ε.

    .. math::

        \mu_k \sim \mathcal N(0, (4 s^2/d)\, I_d),\qquad ε \sim \mathcal N(0, I_d)

    so two class means are about 2√2·s noise standard deviations apart: s =
    ``separation`` = 1 (default) gives a task a linear model solves to about 75-80%
    test accuracy (scikit-learn's LogisticRegression), not perfectly.
    Made in milliseconds, no disk cache. Deterministic given ``seed``.

    Example:
      >>> from adaptive_batch.datasets import make_synthetic
      >>> ds = make_synthetic(num_train=100, num_test=20, dim=8, num_classes=3)
      >>> ds.train["x"].shape, ds.test["y"].shape, ds.num_classes
      ((100, 8), (20,), 3)
    """
    for name, value, low in (
        ("num_train", num_train, 1), ("num_test", num_test, 1), ("dim", dim, 1),
        ("num_classes", num_classes, 2),
    ):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}.")
    if not separation > 0:
        raise ValueError(f"separation={separation!r} must be > 0, e.g. 1.0.")
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0 * separation / np.sqrt(dim), size=(num_classes, dim))
    n = num_train + num_test
    y = rng.integers(num_classes, size=n)
    x = means[y] + rng.normal(size=(n, dim))
    train, test = split_arrays(x, y, num_train)
    return Dataset(
        name="synthetic",
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=(dim,),
        info={"source": "Gaussian classes", "num_train": num_train, "num_test": num_test,
              "dim": dim, "num_classes": num_classes, "separation": separation, "seed": seed},
    )  # fmt: skip
