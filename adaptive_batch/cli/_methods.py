"""Method names of the `adaptive-batch` command → Optax optimizers and what they need.

Adaptive methods read per-example statistics (``grad_stats=``) and suggest the next
batch size; the constant-batch baselines take plain gradients at a fixed batch size.
The batch-size tests alone (norm, inner-product, augmented) only set the batch size, so
they are chained with plain SGD at ``--lr``, as in the adaptive sampling papers.

Default learning rates: 0.3 for every method that takes plain SGD steps (CABS, the
tests, and the SGD baseline, so SGD runs at CABS's rate), tuned for CABS on MNIST-1D
with the CNN (0.1, the CABS paper's rate, reaches about 91% there in 20 epochs, 0.3
about 94% in 100). AdaGrad and AdAdaGrad: 0.1 (0.03 reached 85% with AdaGrad at batch
16 in 60 epochs, 0.1 reached 90%); AdaGrad-Norm and AdAdaGradNorm: 1.0 (0.1 reached
39%, 1.0 57% in 30 epochs); Adam: 0.01, the published MNIST-1D baselines' rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

import adaptive_batch as ab
from adaptive_batch.transforms import scale_by_adagrad_torch


@dataclasses.dataclass(frozen=True)
class Method:
    """How to train with one method.

    Attributes:
      name: the command-line name.
      adaptive: True if the method suggests batch sizes (needs per-example statistics).
      default_lr: the learning rate when ``--lr`` is not given.
      make: ``make(lr, min_batch_size, max_batch_size, tolerance) -> optax transform``.
      default_tolerance: the test tolerance (η of the norm tests, θ of the
        inner-product tests) when ``--eta`` is not given; None: the method has no test.
      coordinates, inner: which extra statistics `adaptive_batch.per_example_stats`
        must return.
      monotone: the controller may only grow the batch (False for CABS, which shrinks
        it when the noise falls relative to the loss).
      summary: one line for ``--help``.
    """

    name: str
    adaptive: bool
    default_lr: float
    make: Callable[[float, int, int, float], optax.GradientTransformation]
    summary: str
    default_tolerance: float | None = None
    coordinates: bool = False
    inner: bool = False
    monotone: bool = True


def _bounds(lo, hi):
    return {"min_batch_size": lo, "max_batch_size": hi}


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "cabs", True, 0.3,
            lambda lr, lo, hi, tol: ab.cabs(lr, **_bounds(lo, hi)),
            "CABS: batch = lr·tr Σ / loss, plain SGD (Balles et al. 2017)",
            monotone=False,
        ),
        Method(
            "norm-test", True, 0.3,
            lambda lr, lo, hi, tol: optax.chain(
                ab.norm_test(tol, **_bounds(lo, hi)), optax.sgd(lr)
            ),
            "norm test (--eta: η, default 0.1) + SGD (Byrd et al. 2012)",
            default_tolerance=0.1,
        ),
        Method(
            "inner-product-test", True, 0.3,
            lambda lr, lo, hi, tol: optax.chain(
                ab.inner_product_test(tol, **_bounds(lo, hi)), optax.sgd(lr)
            ),
            "inner-product test (--eta: θ, default 0.1) + SGD (Bollapragada et al. 2018)",
            default_tolerance=0.1,
            inner=True,
        ),
        Method(
            "augmented-test", True, 0.3,
            lambda lr, lo, hi, tol: optax.chain(
                ab.augmented_inner_product_test(tol, 2 * tol, **_bounds(lo, hi)), optax.sgd(lr)
            ),
            "augmented inner-product test (--eta: θ, default 0.5; ν = 2θ) + SGD",
            default_tolerance=0.5,
            inner=True,
        ),
        Method(
            "adadagrad", True, 0.1,
            lambda lr, lo, hi, tol: ab.adadagrad(lr, eta=tol, **_bounds(lo, hi)),
            "AdAdaGrad: norm test (--eta, default 0.1) + coordinate-wise AdaGrad, as the "
            "official code's experiments (Lau et al. 2024)",
            default_tolerance=0.1,
        ),
        Method(
            "adadagrad-norm", True, 1.0,
            lambda lr, lo, hi, tol: ab.adadagrad_norm(lr, eta=tol, **_bounds(lo, hi)),
            "AdAdaGradNorm: norm test (--eta, default 0.1) + AdaGrad-Norm (Lau et al. 2024)",
            default_tolerance=0.1,
        ),
        Method(
            "sgd", False, 0.3,
            lambda lr, lo, hi, tol: optax.sgd(lr),
            "constant batch, plain SGD",
        ),
        Method(
            "adagrad", False, 0.1,
            lambda lr, lo, hi, tol: optax.chain(scale_by_adagrad_torch(), optax.scale(-lr)),
            "constant batch, AdaGrad (PyTorch semantics, as AdAdaGrad's step)",
        ),
        Method(
            "adagrad-norm", False, 1.0,
            lambda lr, lo, hi, tol: optax.chain(ab.scale_by_adagrad_norm(), optax.scale(-lr)),
            "constant batch, AdaGrad-Norm (as AdAdaGradNorm's step)",
        ),
        Method(
            "adam", False, 0.01,
            lambda lr, lo, hi, tol: optax.adam(lr),
            "constant batch, Adam (the published MNIST-1D baselines use lr 1e-2)",
        ),
    ]
}  # fmt: skip
