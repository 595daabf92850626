"""`EpochOrder`: the stream of example indices, one fresh permutation per epoch.

The loader reads the infinite stream

    π₀(0), π₀(1), ..., π₀(N−1), π₁(0), ..., π₁(N−1), π₂(0), ...

where πₑ is the permutation of epoch e, drawn by ``np.random.default_rng((seed, e))``
(the identity with ``shuffle=False``). A batch of n examples is the next n entries, so
every epoch visits each example exactly once whatever the batch sizes, a batch that
crosses an epoch boundary continues in the next epoch's permutation, and a position is
one integer g = e·N + i (epoch e, index i within it). Everything is a pure function of
(seed, g, n): a resumed or prefetching loader reads the same stream.
"""

from __future__ import annotations

import threading

import numpy as np


class EpochOrder:
    """Indices of the example stream for ``num_examples`` examples (thread-safe)."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool):
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}  # the last two epochs' permutations
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """πₑ, the order of the examples in epoch ``epoch``."""
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                if self.shuffle:
                    perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
                else:
                    perm = np.arange(self.num_examples)
                if len(self._cache) >= 2:
                    del self._cache[min(self._cache)]
                self._cache[epoch] = perm
            return perm

    def take(self, position: int, count: int, *, span_epochs: bool = True) -> np.ndarray:
        """Up to ``count`` indices of the stream from ``position`` on.

        With ``span_epochs=False`` it stops at the end of the current epoch (so it may
        return fewer than ``count``); otherwise it continues into the following epochs.
        """
        n = self.num_examples
        epoch, index = divmod(position, n)
        if not span_epochs:
            count = min(count, n - index)
        parts = []
        while count > 0:
            part = self.permutation(epoch)[index : index + count]
            parts.append(part)
            count -= len(part)
            epoch, index = epoch + 1, 0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
