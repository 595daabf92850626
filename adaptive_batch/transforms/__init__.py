"""Optax gradient transformations for adaptive batch sizes.

Batch-size rules (identity on the updates; their state holds the next batch size,
read it with `suggested_batch_size`): `cabs_rule`, `norm_test`,
`inner_product_test`, `augmented_inner_product_test`, `coordinate_norm_test`.
Complete optimizers (use alone or last in a chain; their state ends with a mark, a
`CompleteOptimizerState`): `cabs`, `adadagrad`, `adadagrad_norm`. Update rules:
`scale_by_adagrad_norm`, `scale_by_adagrad_torch`, `scale_by_batch_size`. Monitor:
`gradient_noise_scale`. All read the keyword argument ``grad_stats=`` (a `GradStats`).
"""

from adaptive_batch.transforms._adadagrad import (
    AdadagradEnd,
    ScaleByAdagradTorchState,
    adadagrad,
    scale_by_adagrad_torch,
)
from adaptive_batch.transforms._adagrad_norm import (
    AdadagradNormEnd,
    ScaleByAdaGradNormState,
    adadagrad_norm,
    scale_by_adagrad_norm,
)
from adaptive_batch.transforms._batch_size_lr import ScaleByBatchSizeState, scale_by_batch_size
from adaptive_batch.transforms._cabs import CabsEnd, CabsState, cabs, cabs_rule
from adaptive_batch.transforms._complete import CompleteOptimizerState
from adaptive_batch.transforms._coordinate_norm_test import coordinate_norm_test
from adaptive_batch.transforms._inner_product_tests import (
    augmented_inner_product_test,
    inner_product_test,
)
from adaptive_batch.transforms._noise_scale import GradientNoiseScaleState, gradient_noise_scale
from adaptive_batch.transforms._norm_test import norm_test
from adaptive_batch.transforms._sampling_test import AdaptiveSamplingState
from adaptive_batch.transforms._suggested import suggested_batch_size

__all__ = [
    "AdadagradEnd",
    "AdadagradNormEnd",
    "AdaptiveSamplingState",
    "CabsEnd",
    "CabsState",
    "CompleteOptimizerState",
    "GradientNoiseScaleState",
    "ScaleByAdaGradNormState",
    "ScaleByAdagradTorchState",
    "ScaleByBatchSizeState",
    "adadagrad",
    "adadagrad_norm",
    "augmented_inner_product_test",
    "cabs",
    "cabs_rule",
    "coordinate_norm_test",
    "gradient_noise_scale",
    "inner_product_test",
    "norm_test",
    "scale_by_adagrad_norm",
    "scale_by_adagrad_torch",
    "scale_by_batch_size",
    "suggested_batch_size",
]
