"""One `fit` run of `test_fit_resume.py`, as its own process, so a test can SIGKILL it.

Run as ``python _fit_resume_worker.py STYLE OUT_DIR [--resume]`` with STYLE one of
``plain``, ``nnx``, ``linen``. It trains a small MLP on scikit-learn digits with CABS
(the batch size moves both ways) for a fixed examples budget, checkpointing every few
steps into ``OUT_DIR/checkpoints``; every step's record goes to
``OUT_DIR/metrics.jsonl`` (`MetricsWriter`), and at the end the trained parameters to
``OUT_DIR/params.npz``.
"""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from flax.training.train_state import TrainState
from sklearn.datasets import load_digits

import adaptive_batch as ab
from adaptive_batch.training import MetricsWriter

HIDDEN, EXAMPLES, CHECKPOINT_EVERY = 16, 4_000, 25


def data():
    x, y = load_digits(return_X_y=True)
    return {"x": (x / 16.0).astype(np.float32), "y": y.astype(np.int32)}


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def tx():
    return ab.cabs(0.5, min_batch_size=8, max_batch_size=128)


def controller():
    return ab.BatchSizeController(8, 128, monotone=False, fill_buckets=False)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(HIDDEN)(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def setup(style):
    """(step, state, params_of(state)) for one style."""
    if style == "plain":
        linen = LinenMLP()
        params = linen.init(jax.random.key(0), np.zeros((1, 64), np.float32))["params"]
        optimizer = tx()

        def loss_fn(p, batch):
            return xent(linen.apply({"params": p}, batch["x"]), batch["y"])

        return (
            ab.make_train_step(loss_fn, optimizer),
            (params, optimizer.init(params)),
            (lambda state: state[0]),
        )
    if style == "linen":
        linen = LinenMLP()
        params = linen.init(jax.random.key(0), np.zeros((1, 64), np.float32))["params"]
        state = TrainState.create(apply_fn=linen.apply, params=params, tx=tx())

        def loss_fn(p, batch):
            return xent(linen.apply({"params": p}, batch["x"]), batch["y"])

        return ab.make_linen_train_step(loss_fn), state, lambda state: state.params
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)

    def loss_fn(model, batch):
        return xent(model(batch["x"]), batch["y"])

    return (
        ab.make_nnx_train_step(loss_fn),
        (model, optimizer),
        (lambda state: nnx.state(state[0], nnx.Param)),
    )


def main(style, out, resume):
    out = Path(out)
    out.mkdir(exist_ok=True)
    step, state, params_of = setup(style)
    result = ab.fit(
        step, state, data(), controller(), examples=EXAMPLES, seed=1, progress=False,
        callbacks=[MetricsWriter(out / "metrics.jsonl")], log_every=1,
        checkpoint_dir=out / "checkpoints", checkpoint_every=CHECKPOINT_EVERY, resume=resume,
    )  # fmt: skip
    leaves = jax.tree.leaves(params_of(result.state))
    np.savez(out / "params.npz", *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--resume" in sys.argv[3:])
