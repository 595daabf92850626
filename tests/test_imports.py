"""`import adaptive_batch` and a plain-JAX training run do not import Flax (0.7 s of
import time, for NNX and Linen users only); the NNX adapter still imports on demand."""

from __future__ import annotations

import subprocess
import sys

PLAIN_RUN = """
import sys
import adaptive_batch as ab
import jax.numpy as jnp, numpy as np, optax
assert "flax" not in sys.modules, "import adaptive_batch imported flax"
def loss_fn(w, batch):
    return 0.5 * (batch["x"] @ w - batch["y"]) ** 2
tx = optax.chain(ab.norm_test(0.5, min_batch_size=8), optax.sgd(0.1))
x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
w = jnp.zeros(3)
result = ab.fit(ab.make_train_step(loss_fn, tx), (w, tx.init(w)), {"x": x, "y": x.sum(1)},
                ab.BatchSizeController(8, 32), steps=5, progress=False)
assert result.steps == 5
assert "flax" not in sys.modules, "a plain-JAX fit imported flax"
from adaptive_batch import make_nnx_train_step
from adaptive_batch.training import NnxTrainStep
assert make_nnx_train_step.__module__ == "adaptive_batch.training._nnx"
assert ab.training.make_nnx_train_step is make_nnx_train_step and NnxTrainStep
assert "flax" in sys.modules
try:
    ab.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("an unknown attribute did not raise")
print("ok")
"""


def test_plain_jax_users_do_not_import_flax():
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_RUN], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
