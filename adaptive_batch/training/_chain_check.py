"""Refuse an ``optax.chain`` that puts a transform after a complete optimizer.

`cabs`, `adadagrad` and `adadagrad_norm` return the final updates. Chained before
another optimizer (``optax.chain(cabs(0.1), optax.adam(1e-2))``), that optimizer runs
on their steps instead of on gradients, and training goes wrong with no error. The
chain hides its parts, but a train step sees its state, where each complete optimizer
leaves a mark (`adaptive_batch.transforms.CompleteOptimizerState`).
"""

from __future__ import annotations

from adaptive_batch.transforms._complete import misplaced_optimizer


def refuse_misplaced_optimizer(opt_state) -> None:
    """A TypeError naming the rule to chain instead, if ``opt_state`` shows a complete
    optimizer with transforms after it in an ``optax.chain``."""
    found = misplaced_optimizer(opt_state)
    if found is None:
        return
    mark, following = found
    name = mark.optimizer
    raise TypeError(
        f"adaptive_batch.{name} is a complete optimizer (it returns the final updates), "
        f"but an optax.chain puts {following} more transform(s) after it: a second "
        f"optimizer there runs on {name}'s steps instead of on the gradients. To set the "
        "batch size for another optimizer, chain the rule in front of it: "
        f"optax.chain({mark.instead}, optax.adam(...)). To change {name}'s updates on "
        f"purpose, chain its parts: optax.chain({mark.parts}, ...)."
    )
