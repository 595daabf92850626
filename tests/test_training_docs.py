"""The docstring examples of `adaptive_batch.training` run and print what they show."""

from __future__ import annotations

import doctest

import pytest

from adaptive_batch.training import _fit, _linen, _metrics, _nnx, _step


@pytest.mark.parametrize("module", [_step, _nnx, _linen, _fit, _metrics], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0
