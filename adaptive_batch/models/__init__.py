"""Built-in classifiers (Flax NNX) for the `adaptive-batch` command.

``"logreg"`` (softmax regression), ``"mlp"`` and ``"cnn"`` (the published MNIST-1D
baselines of Greydanus 2020). `functional` splits a model into parameters and pure
functions: the per-example loss ``loss_fn(params, batch) -> (B,)`` and accuracy.
"""

from adaptive_batch.models._functional import ModelFns, functional
from adaptive_batch.models._nets import CNN, MLP, MODELS, LogisticRegression, make_model

__all__ = ["CNN", "MLP", "MODELS", "LogisticRegression", "ModelFns", "functional", "make_model"]
