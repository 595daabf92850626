"""The mark of a complete optimizer (`cabs`, `adadagrad`, `adadagrad_norm`).

A complete optimizer returns the final updates (its learning rate applied), so in an
``optax.chain`` nothing may follow it: ``chain(cabs(0.1), optax.adam(1e-2))`` runs Adam
on SGD's steps, not on gradients, and trains badly without any error. The chain hides
its parts, but not its state: each complete optimizer ends with `end_mark`, an
identity whose state is an empty NamedTuple of a type of its own. The type is the
mark: it holds no arrays (nothing to checkpoint, nothing for ``jit``), it survives
``optax.inject_hyperparams`` and any other wrapper, and `misplaced_optimizer` finds it
in the state a train step sees.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax


class CompleteOptimizerState(NamedTuple):
    """Ends the state of a complete optimizer; no arrays.

    Subclasses set class attributes (not fields, so the state stays empty):
    ``optimizer``, the public name; ``instead``, the rule to chain in front of another
    optimizer in its place; ``parts``, the transforms it chains.
    """


def end_mark(state_type: type[CompleteOptimizerState]) -> optax.GradientTransformationExtraArgs:
    """The identity transform a complete optimizer chains last; its state marks it."""

    def init_fn(params):
        del params
        return state_type()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _marks(tree) -> list[CompleteOptimizerState]:
    def is_mark(node):
        return isinstance(node, CompleteOptimizerState)

    return [leaf for leaf in jax.tree.leaves(tree, is_leaf=is_mark) if is_mark(leaf)]


def misplaced_optimizer(opt_state) -> tuple[CompleteOptimizerState, int] | None:
    """A complete optimizer that an ``optax.chain`` follows with more transforms: its
    mark and how many transforms follow; None if there is none.

    An ``optax.chain`` state is a plain tuple of its transforms' states, in order, so
    an element holding a mark that is not the last element is the misplaced one.
    (``optax.named_chain``'s dict is not checked: ``optax.multi_transform`` keeps its
    parallel states in a dict too.)
    """
    if isinstance(opt_state, CompleteOptimizerState):
        return None
    if isinstance(opt_state, dict):
        children = list(opt_state.values())
    elif isinstance(opt_state, tuple | list):
        children = list(opt_state)
    else:
        return None
    if type(opt_state) is tuple:
        for position, child in enumerate(children[:-1]):
            marks = _marks(child)
            if marks:
                return marks[-1], len(children) - 1 - position
    for child in children:
        found = misplaced_optimizer(child)
        if found is not None:
            return found
    return None
