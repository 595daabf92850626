"""Put a host batch on devices with a `jax.sharding.Sharding` (JAX imported lazily).

One process (every device addressable): the whole padded batch is built on the host and
``jax.device_put`` with the sharding. Several processes (multi-host): each builds only
the rows of the batch its own devices hold (`local_rows`) and the global array is
assembled with ``jax.make_array_from_process_local_data``, so no host reads another's
examples.
"""

from __future__ import annotations

from typing import Any


def check_sharding(sharding: Any) -> None:
    import jax

    if not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(
            f"sharding must be a jax.sharding.Sharding, got {type(sharding).__name__}. For "
            "data parallelism use NamedSharding(jax.make_mesh((n,), ('data',)), P('data'))."
        )


def batch_shards(sharding: Any) -> int:
    """How many pieces ``sharding`` cuts the batch (leading) axis into."""
    devices = len(sharding.device_set)
    return devices // sharding.shard_shape((devices,))[0]


def leaf_sharding(sharding: Any, ndim: int) -> Any:
    """``sharding`` for an array of rank ``ndim``.

    A `NamedSharding` whose spec is longer than the rank (``P("data", None)`` and a
    1-D label array or the mask) keeps its first ``ndim`` entries, so one sharding
    serves every leaf; other shardings are used as they are.
    """
    import jax

    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > ndim:
        spec = jax.sharding.PartitionSpec(*sharding.spec[:ndim])
        return jax.sharding.NamedSharding(sharding.mesh, spec)
    return sharding


def check_divides(sharding: Any, padded_size: int) -> None:
    shards = batch_shards(sharding)
    if padded_size % shards:
        raise ValueError(
            f"a padded batch of {padded_size} rows cannot be split over the {shards} shards "
            "of the sharding's batch axis. Request padded sizes that are multiples of "
            f"{shards}: BatchSizeController(..., multiple_of={shards})."
        )


def local_rows(sharding: Any, padded_size: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``padded_size`` batch this process's devices hold.

    ``(0, padded_size)`` when every device is addressable (one process). With several
    processes the rows must be one contiguous block per process, as they are for a
    mesh whose batch axis runs over the processes in order (``jax.make_mesh``).
    """
    check_divides(sharding, padded_size)
    if sharding.is_fully_addressable:
        return 0, padded_size
    indices = leaf_sharding(sharding, 1).addressable_devices_indices_map((padded_size,))
    rows = sorted(index[0].indices(padded_size)[:2] for index in indices.values())
    start, stop = rows[0][0], max(r[1] for r in rows)
    covered = sum(b - a for a, b in {*rows})
    if covered != stop - start:
        raise ValueError(
            f"this process's devices hold rows {sorted(set(rows))} of the batch, not one "
            "contiguous block; build the mesh with jax.make_mesh so that the batch axis "
            "runs over the processes in order."
        )
    return start, stop


def place(data: Any, mask: Any, sharding: Any, padded_size: int) -> tuple[Any, Any]:
    """The batch and its mask as global ``jax.Array`` s of ``padded_size`` rows.

    ``data`` and ``mask`` hold this process's rows (`local_rows`, which also checks that
    the batch divides over the shards): all of them with one process (then a plain
    ``jax.device_put``).
    """
    import jax

    if sharding.is_fully_addressable:
        shardings = jax.tree.map(lambda x: leaf_sharding(sharding, x.ndim), data)
        return jax.device_put(data, shardings), jax.device_put(mask, leaf_sharding(sharding, 1))

    def assemble(local):
        global_shape = (padded_size, *local.shape[1:])
        return jax.make_array_from_process_local_data(
            leaf_sharding(sharding, local.ndim), local, global_shape
        )

    return jax.tree.map(assemble, data), assemble(mask)
