"""The built-in classifiers, in Flax NNX: logistic regression, MLP and the MNIST-1D CNN.

The MLP and the CNN follow the published MNIST-1D baselines (Greydanus 2020, the
``models.py`` of github.com/greydanus/mnist1d): MLP 2 hidden layers of 100 with a
residual connection, CNN 3 convolutions of 25 channels (kernels 5, 3, 3; stride 2,
padding 1; ReLU) and a linear head on the flattened features. None uses batch norm or
dropout, so each example's loss depends on that example alone (the loss contract of
`adaptive_batch.per_example_stats`). Weights and biases start as PyTorch's defaults
(uniform in ±1/√fan_in), the framework the published numbers were measured in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _torch_uniform(fan_in: int):
    """PyTorch's default init of Linear / Conv weights and biases: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    init = _torch_uniform(in_features)
    return nnx.Linear(in_features, out_features, kernel_init=init, bias_init=init, rngs=rngs)


def _conv(in_channels: int, out_channels: int, kernel: int, rngs: nnx.Rngs) -> nnx.Conv:
    init = _torch_uniform(in_channels * kernel)
    return nnx.Conv(
        in_channels, out_channels, kernel_size=(kernel,), strides=(2,), padding=((1, 1),),
        kernel_init=init, bias_init=init, rngs=rngs,
    )  # fmt: skip


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class LogisticRegression(nnx.Module):
    """logits = x W + b on the flattened input (softmax regression)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        self.linear = _linear(math.prod(input_shape), num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(_flat(x))


class MLP(nnx.Module):
    """h = relu(x W₁); h = h + relu(h W₂); logits = h W₃ (the MNIST-1D MLPBase)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: int = 100,
        rngs: nnx.Rngs,
    ):
        self.linear1 = _linear(math.prod(input_shape), hidden, rngs)
        self.linear2 = _linear(hidden, hidden, rngs)
        self.linear3 = _linear(hidden, num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.linear1(_flat(x)))
        h = h + jax.nn.relu(self.linear2(h))
        return self.linear3(h)


def _conv_length(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN(nnx.Module):
    """The MNIST-1D ConvBase: 3 × (conv stride 2, padding 1, ReLU), then linear.

    Kernels 5, 3, 3 and 25 channels: on a signal of length 40 the lengths are
    40 → 19 → 10 → 5, so the head sees 25·5 = 125 features (``linear_in=125`` in the
    published code). A flat input of any length L is read as one channel of length L.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: int = 25,
        rngs: nnx.Rngs,
    ):
        length = math.prod(input_shape)
        kernels = (5, 3, 3)
        in_channels = (1, channels, channels)
        self.convs = nnx.List(
            [_conv(c, channels, k, rngs) for c, k in zip(in_channels, kernels, strict=True)]
        )
        for k in kernels:
            length = _conv_length(length, k)
        if length < 1:
            raise ValueError(
                f"CNN: input of {math.prod(input_shape)} features is too short for three "
                "stride-2 convolutions; use --model mlp or logreg for it."
            )
        self.linear = _linear(channels * length, num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _flat(x)[..., None]  # (B, L, 1): NNX convolutions are channels-last
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        return self.linear(_flat(h))


MODELS = {"logreg": LogisticRegression, "mlp": MLP, "cnn": CNN}


def make_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> nnx.Module:
    """A built-in classifier by name (one of `MODELS`), initialised from ``seed``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adaptive_batch.models import make_model
      >>> make_model("cnn", (40,), 10)(jnp.zeros((2, 40))).shape
      (2, 10)
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    return MODELS[name](tuple(input_shape), num_classes, rngs=nnx.Rngs(seed))
