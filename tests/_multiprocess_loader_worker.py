"""One process of `test_loader_multiprocess.py`: a Loader whose sharding spans 2 processes.

Run as ``python _multiprocess_loader_worker.py PROCESS_ID PORT OUT.json``. The process
joins a 2-process JAX cluster on the CPU (2 devices each, Gloo collectives), takes the
test's batches from a `Loader` sharded over all 4 devices, and writes what it holds:
its shards of every batch, a global reduction over each batch (a cross-process
computation) and every source index it read.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adaptive_batch import BatchPlan
from adaptive_batch.data import Loader

NUM_EXAMPLES, SEED = 50, 3
PLANS = [(5, 8), (8, 8), (30, 32), (2, 4), (40, 40)]


class RecordingSource:
    """Example i is ``{"id": i, "x": [i, i, i]}``; every index read is recorded."""

    def __init__(self):
        self.read = []

    def __len__(self):
        return NUM_EXAMPLES

    def __getitem__(self, i):
        self.read.append(int(i))
        return {"id": np.int32(i), "x": np.full(3, i, np.float32)}


def main(process_id, port, out):
    # Before any computation: the CPU backend starts with these settings.
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    source = RecordingSource()
    sharding = NamedSharding(jax.make_mesh((4,), ("data",)), P("data"))
    masked_sum = jax.jit(lambda ids, mask: jnp.sum(jnp.where(mask, ids, 0)))
    batches = []
    with Loader(source, seed=SEED, sharding=sharding, prefetch=1) as loader:
        for size, padded in PLANS:
            batch = loader.next(BatchPlan(size, padded))
            batches.append(
                {
                    "shape": list(batch.data["x"].shape),
                    "batch_size": batch.batch_size,
                    "ids": _shards(batch.data["id"], padded),
                    "mask": _shards(batch.mask, padded),
                    "x_first_column": [
                        np.asarray(s.data)[:, 0].tolist()
                        for s in batch.data["x"].addressable_shards
                    ],
                    "global_masked_sum": int(masked_sum(batch.data["id"], batch.mask)),
                }
            )
    with open(out, "w") as f:
        json.dump({"batches": batches, "read": sorted(set(source.read))}, f)
    jax.distributed.shutdown()


def _shards(array, padded):
    """``[(first row, values)]`` of this process's shards, by first row."""
    return sorted(
        (s.index[0].indices(padded)[0], np.asarray(s.data).tolist())
        for s in array.addressable_shards
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
