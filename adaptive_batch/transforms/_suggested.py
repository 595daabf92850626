"""`suggested_batch_size`: the batch size the rules in an Optax state want next."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _is_rule_state(node: Any) -> bool:
    # Any NamedTuple with a ``batch_size`` field counts, so rules defined outside this
    # package (following the same convention) are found as well.
    return isinstance(node, tuple) and "batch_size" in getattr(node, "_fields", ())


def suggested_batch_size(opt_state) -> jax.Array:
    """The next batch size wanted by the batch-size rules inside an Optax state.

    Searches the whole state, however nested: ``optax.chain`` tuples,
    ``optax.named_chain`` dicts, ``optax.inject_hyperparams`` (its ``inner_state``),
    ``optax.MultiSteps`` (its ``inner_opt_state``), ``optax.apply_if_finite`` and any
    other pytree. A rule's state is any NamedTuple with a ``batch_size`` field (every
    rule of this package: `norm_test`, `inner_product_test`,
    `augmented_inner_product_test`, `coordinate_norm_test`, `cabs_rule`, and the
    optimizers `cabs`, `adadagrad`, `adadagrad_norm` that contain one).

    If several rules are present the **largest** batch size is returned: each rule's
    size is the smallest batch that satisfies it, so the largest satisfies all.

    Works inside ``jax.jit`` (it returns an array; no host transfer). Call ``int()`` on
    the result on the host.

    Args:
      opt_state: the state returned by ``tx.init`` / ``tx.update``.

    Returns:
      An int32 scalar array.

    Raises:
      ValueError: the state holds no batch-size rule.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adaptive_batch as ab
      >>> tx = optax.chain(ab.norm_test(0.2, initial_batch_size=32), optax.adam(1e-3))
      >>> int(ab.suggested_batch_size(tx.init(jnp.zeros(3))))
      32
    """
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_rule_state)
    sizes = [jnp.asarray(node.batch_size, jnp.int32) for node in nodes if _is_rule_state(node)]
    if not sizes:
        raise ValueError(
            "suggested_batch_size found no batch-size rule in this optimizer state "
            f"(a {type(opt_state).__name__} with no NamedTuple field named 'batch_size'). "
            "Chain a rule in front of the optimizer, e.g. optax.chain(adaptive_batch."
            "norm_test(0.1), optax.adam(1e-3)), or use adaptive_batch.cabs / adadagrad / "
            "adadagrad_norm, and pass the state that tx.init / tx.update returned."
        )
    return jnp.max(jnp.stack(sizes))
