"""Where `fit`'s arrays live: the loader's prefetch default, the replicated state, and
compiling the step for the next buckets ahead of time."""

from __future__ import annotations

import jax
import numpy as np


def default_prefetch(sharding) -> int:
    """2 when batches go to an accelerator; 0 on the CPU backend (no separate device to
    overlap with: the prefetch thread only takes cores from the step)."""
    devices = jax.devices() if sharding is None else list(sharding.device_set)
    return 0 if all(d.platform == "cpu" for d in devices) else 2


def replicate_uncommitted(tree, sharding):
    """Replicate the arrays the user did not place over the devices the batches go to.

    A step's outputs are committed to those devices; replicating its inputs up front
    gives the first step the same compiled shape (and cache entry) as all later ones.
    """
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh):
        devices = sorted(sharding.device_set, key=lambda d: d.id)
        mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not x.committed:
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, tree)


def compile_buckets_ahead(step, controller, carry, batch, count: int = 2) -> None:
    """Start compiling the step for the ``count`` buckets above ``batch``'s on the
    background thread (nearest first), and for a controller that may shrink the batch
    (``monotone=False``) the one below.

    Two, not one: a bucket's compile (about a second on a CPU) can take longer than
    training in the bucket below it, so the next-but-one starts while the next is used.
    """
    buckets = controller.buckets
    if buckets is None:
        return
    current = batch.plan.padded_size
    sizes = [b for b in buckets if b > current][:count]
    if not controller.monotone:
        sizes += [b for b in buckets if b < current][-1:]
    for size in sizes:
        target = controller.plan_for(
            min(max(size, controller.min_batch_size), controller.max_batch_size)
        )

        def like(x, rows=target.padded_size):
            shape = (rows, *tuple(np.shape(x))[1:])
            committed = isinstance(x, jax.Array) and x.committed
            sharding = x.sharding if committed else None
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

        data, mask = jax.tree.map(like, (batch.data, batch.mask))
        step.compile_ahead(carry, data, mask, target.num_microbatches)
