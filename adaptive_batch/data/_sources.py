"""Data sources: gather rows by index into stacked, zero-padded NumPy batches.

Two kinds, chosen by `as_source`:

* `ArraySource` — a dict or tuple (or NamedTuple, or nesting of them) of NumPy arrays
  sharing a leading example axis, or one array. A batch is one ``np.take`` per array.
* `ItemSource` — any random-access source: ``len(source)`` examples and
  ``source[i]`` one example (the Grain ``RandomAccessDataSource`` protocol, so
  ``grain.MapDataset`` and ``tfds.data_source`` objects work, as does a list). An
  example is a nesting of dicts, tuples and lists of arrays or scalars; the examples
  are stacked leaf by leaf. A source with ``__getitems__(indices)`` (a batched read)
  is called once per batch instead of once per example.

Both return ``gather(indices, padded_size)``: the structure of one example, each leaf
of shape ``(padded_size, ...)`` with rows ``len(indices):`` zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PyTree = Any

# ------------------------------------------------------------------ tiny pytree helpers
# A structure is described by a hashable "treedef" so that examples can be compared.


def flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """Leaves in a fixed order and a hashable description of the containers."""
    leaves: list[Any] = []
    return leaves, _flatten(tree, leaves)


def _flatten(tree, leaves):
    if isinstance(tree, dict):
        keys = tuple(tree)
        return (type(tree), keys, tuple(_flatten(tree[k], leaves) for k in keys))
    if isinstance(tree, (tuple, list)):
        return (type(tree), len(tree), tuple(_flatten(t, leaves) for t in tree))
    leaves.append(tree)
    return None


def unflatten(treedef, leaves: list[Any]) -> PyTree:
    return _unflatten(treedef, iter(leaves))


def _unflatten(treedef, leaves):
    if treedef is None:
        return next(leaves)
    kind, keys, children = treedef
    values = [_unflatten(c, leaves) for c in children]
    if issubclass(kind, dict):
        return kind(zip(keys, values, strict=True))
    if hasattr(kind, "_fields"):  # NamedTuple
        return kind(*values)
    return kind(values)


def leaf_names(treedef, prefix: str = "") -> list[str]:
    """Readable paths of the leaves (``["x"]``, ``[1]``), in `flatten` order."""
    if treedef is None:
        return [prefix]
    kind, keys, children = treedef
    labels = [repr(k) for k in keys] if issubclass(kind, dict) else [str(i) for i in range(keys)]
    return [
        n
        for lab, c in zip(labels, children, strict=True)
        for n in leaf_names(c, f"{prefix}[{lab}]")
    ]


# ------------------------------------------------------------------ sources


class ArraySource:
    """Examples stored as the rows of NumPy arrays; gathers with one ``np.take`` per array."""

    def __init__(self, arrays: PyTree):
        leaves, self.treedef = flatten(arrays)
        names = leaf_names(self.treedef)
        if not leaves:
            raise ValueError(
                "the source has no arrays. Pass a dict or tuple of NumPy arrays with one row "
                "per example, for example {'x': x, 'y': y}."
            )
        self.leaves = []
        for name, leaf in zip(names, leaves, strict=True):
            array = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
            if array.ndim == 0:
                raise ValueError(
                    f"source{name} is a scalar, but every array needs a leading example axis. "
                    "Keep constants out of the source."
                )
            self.leaves.append(array)
        sizes = {name: a.shape[0] for name, a in zip(names, self.leaves, strict=True)}
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"source{n}: {s}" for n, s in sizes.items())
            raise ValueError(
                f"the source's arrays have different numbers of rows ({listing}); each array "
                "needs exactly one row per example."
            )
        self.num_examples = self.leaves[0].shape[0]

    def __len__(self) -> int:
        return self.num_examples

    @property
    def row_nbytes(self) -> int:
        """Bytes of one example in a batch (all arrays' rows)."""
        return sum(leaf.dtype.itemsize * math.prod(leaf.shape[1:]) for leaf in self.leaves)

    def gather(self, indices: np.ndarray, padded_size: int) -> PyTree:
        out = []
        n = len(indices)
        for leaf in self.leaves:
            batch = np.empty((padded_size, *leaf.shape[1:]), leaf.dtype)
            # mode="clip" skips the bounds-check buffer of mode="raise"; indices are valid.
            np.take(leaf, indices, axis=0, out=batch[:n], mode="clip")
            batch[n:] = 0
            out.append(batch)
        return unflatten(self.treedef, out)


class ItemSource:
    """A random-access source (``len`` + ``source[i]``); examples stacked leaf by leaf."""

    def __init__(self, source: Any):
        self.source = source
        self.num_examples = len(source)
        # Structure, shapes and dtypes of the first example read; every batch keeps them,
        # so batch shapes and dtypes never change (which would recompile the step).
        self.treedef = self._leaf_shapes = self._leaf_dtypes = None
        self._first_index: int | None = None

    def __len__(self) -> int:
        return self.num_examples

    @property
    def row_nbytes(self) -> int | None:
        """Bytes of one example in a batch; None before the first example is read."""
        if self._leaf_dtypes is None:  # set last by `_check_first` (maybe on another thread)
            return None
        return sum(
            dtype.itemsize * math.prod(shape)
            for shape, dtype in zip(self._leaf_shapes, self._leaf_dtypes, strict=True)
        )

    def _read(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            items = list(getitems(indices))
            if len(items) != len(indices):
                raise ValueError(
                    f"source.__getitems__ returned {len(items)} examples for {len(indices)} "
                    "indices; it must return one example per index."
                )
            return items
        return [self.source[i] for i in indices]

    def gather(self, indices: np.ndarray, padded_size: int) -> PyTree:
        index_list = indices.tolist()  # plain ints: some sources reject NumPy integers
        items = self._read(index_list)
        columns = None
        for i, item in zip(index_list, items, strict=True):
            leaves, treedef = flatten(item)
            if self._first_index is None:
                self._check_first(i, leaves, treedef)
            if treedef != self.treedef:
                raise ValueError(
                    f"source[{i}] has structure {_describe(treedef)}, but source["
                    f"{self._first_index}] has {_describe(self.treedef)}; every example "
                    "must have the same structure."
                )
            if columns is None:
                columns = [[] for _ in leaves]
            for column, leaf in zip(columns, leaves, strict=True):
                column.append(leaf)
        out = []
        names = leaf_names(self.treedef)
        for name, shape, dtype, column in zip(
            names, self._leaf_shapes, self._leaf_dtypes, columns, strict=True
        ):
            bad = next(
                (
                    (i, np.shape(v))
                    for i, v in zip(index_list, column, strict=True)
                    if np.shape(v) != shape
                ),
                None,
            )
            if bad is not None:
                raise ValueError(
                    f"cannot stack the examples: source[{bad[0]}]{name} has shape {bad[1]}, "
                    f"but source[{self._first_index}]{name} has shape {shape}. Every "
                    "example's leaves must have the same shapes (pad or crop them in the "
                    "source, or give the loader a source that does)."
                )
            batch = np.empty((padded_size, *shape), dtype)
            try:
                np.stack(column, out=batch[: len(column)])
            except TypeError as error:
                raise TypeError(
                    f"cannot stack source{name} of the examples into dtype {dtype} (the "
                    f"dtype of source[{self._first_index}]{name}): {error}. Give every "
                    "example the same dtype."
                ) from error
            batch[len(column) :] = 0
            out.append(batch)
        return unflatten(self.treedef, out)

    def _check_first(self, i, leaves, treedef):
        if not leaves:
            raise ValueError(f"source[{i}] has no leaves; an example needs at least one array.")
        self.treedef, self._first_index = treedef, i
        self._leaf_shapes = [np.shape(leaf) for leaf in leaves]
        self._leaf_dtypes = [np.asarray(leaf).dtype for leaf in leaves]


def _describe(treedef) -> str:
    return "{" + ", ".join(leaf_names(treedef)) + "}"


def as_source(source: Any) -> ArraySource | ItemSource:
    """Wrap ``source`` as an `ArraySource` (arrays) or `ItemSource` (random access)."""
    if isinstance(source, (ArraySource, ItemSource)):
        return source
    if isinstance(source, (dict, tuple, np.ndarray)):
        wrapped = ArraySource(source)
    elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        wrapped = ItemSource(source)
    else:
        raise TypeError(
            f"cannot read examples from a {type(source).__name__}. Pass a dict or tuple of "
            "NumPy arrays (one row per example), or a random-access source with __len__ and "
            "__getitem__ (a list of examples, grain.MapDataset, tfds.data_source)."
        )
    if len(wrapped) == 0:
        raise ValueError("the source is empty (0 examples); a loader needs at least one.")
    return wrapped
