"""One process of `test_fit_multiprocess.py`: `fit` under ``jax.distributed``.

Run as ``python _fit_multiprocess_worker.py NUM_PROCESSES PROCESS_ID PORT OUT_DIR
[--resume] [--steps N]``. Each process has ``4 // NUM_PROCESSES`` CPU devices (Gloo
collectives); the batch is sharded over all 4. The run trains a small MLP on
scikit-learn digits with the norm test (the batch grows), checkpointing every few
steps into ``OUT_DIR/checkpoints``; process 0 writes the step records to
``OUT_DIR/metrics.jsonl`` and every process its trained parameters to
``OUT_DIR/params-<id>.npz``. With NUM_PROCESSES = 1 it is the single-process run with
the same 4 devices.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

DEVICES, HIDDEN, CHECKPOINT_EVERY = 4, 16, 10


def main(num_processes, process_id, port, out, resume, steps):
    jax.config.update("jax_num_cpu_devices", DEVICES // num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{port}", num_processes=num_processes, process_id=process_id
        )
    import flax.linen as nn

    import adaptive_batch as ab
    from adaptive_batch.training import MetricsWriter

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(HIDDEN)(x)))

    x, y = load_digits(return_X_y=True)
    data = {"x": (x / 16.0).astype(np.float32), "y": y.astype(np.int32)}
    model = MLP()
    params = model.init(jax.random.key(0), data["x"][:1])["params"]
    tx = optax.chain(ab.norm_test(0.3, min_batch_size=8, max_batch_size=256), optax.sgd(0.3))

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    sharding = NamedSharding(jax.make_mesh((DEVICES,), ("data",)), P("data"))
    controller = ab.BatchSizeController(8, 256, multiple_of=DEVICES, fill_buckets=False)
    out = Path(out)
    out.mkdir(exist_ok=True)
    result = ab.fit(
        ab.make_train_step(loss_fn, tx), (params, tx.init(params)), data, controller,
        steps=steps, seed=2, sharding=sharding, progress=False, log_every=1,
        eval_fn=lambda state: {"w_sum": float(np.sum(np.asarray(state[0]["Dense_1"]["bias"])))},
        eval_every=7, callbacks=[MetricsWriter(out / "metrics.jsonl")],
        checkpoint_dir=out / "checkpoints", checkpoint_every=CHECKPOINT_EVERY, resume=resume,
    )  # fmt: skip
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.state[0])]
    np.savez(out / f"params-{process_id}.npz", *leaves)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:]
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 60
    main(int(args[0]), int(args[1]), int(args[2]), args[3], "--resume" in args, steps)
