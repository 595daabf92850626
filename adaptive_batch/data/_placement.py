"""Put a host batch on devices with a `jax.sharding.Sharding` (JAX imported lazily)."""

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


def place(data: Any, mask: Any, sharding: Any) -> tuple[Any, Any]:
    """``jax.device_put`` of the batch and its mask, after checking the batch divides."""
    import jax

    padded_size = mask.shape[0]
    shards = batch_shards(sharding)
    if padded_size % shards:
        raise ValueError(
            f"a padded batch of {padded_size} rows cannot be split over the {shards} shards "
            "of the sharding's batch axis. Request padded sizes that are multiples of "
            f"{shards}: BatchSizeController(..., multiple_of={shards})."
        )
    shardings = jax.tree.map(lambda x: leaf_sharding(sharding, x.ndim), data)
    return jax.device_put(data, shardings), jax.device_put(mask, leaf_sharding(sharding, 1))
