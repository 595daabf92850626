"""Sums over the rows (leading axis) of an array, and the platform switch they use.

    row_sums(x) = (Σᵢ xᵢ, Σᵢ xᵢ⊙xᵢ)   over i, the leading axis of x.

Per-example gradients, and the per-step values of a loop, are summed this way: rows of
up to millions of entries, often few of them. XLA:CPU (jax 0.10) runs a reduction over
the leading axis of rows of more than 16384 entries an order of magnitude slower
than the memory it reads allows: Σxᵢ and Σxᵢ⊙xᵢ of 64 rows of 262144 entries took
217 ms, against 7.1 ms adding the rows one after the other, and of 16 rows of 32768
entries 2.9 ms against 0.22 ms (2-core CPU, `benchmarks/row_sums.py`). On XLA:CPU wide
rows are therefore added one at a time in a loop, squares in the same pass, or, for Σxᵢ
alone, summed as the product of a row of ones with x; no other platform needs it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from adaptive_batch.stats._manual_axes import vary_like


def on_cpu(looped, whole_batch, *args):
    """``looped(*args)`` when compiled for XLA:CPU, ``whole_batch(*args)`` for any other
    platform.

    XLA:CPU does not square inside a product or a reduction, so squares are summed over
    blocks of rows there rather than materialised for the whole batch; it runs
    batched products of many small matrices slowly, so per-example products go example by
    example (`_fast_rules._dense_products_by_example`); and its reductions over a leading
    axis are slow (`row_sums`). Each block, example or row is an iteration of a ``while``
    loop, though, and on a GPU the iterations cost more than the squares: measured on an
    H100 (MLP 40-512-512-10 with coordinates, time / plain gradient's, B = 64 / 256 /
    1024): 3.09 / 2.61 / 2.28x by blocks, 1.51 / 1.33 / 1.31x whole; the NNX transformer
    block at B = 64: 2.66x -> 1.36x. XLA:GPU fuses the squaring into the reduction. The
    CPU program is unchanged by the switch.
    """
    return lax.platform_dependent(*args, cpu=looped, default=whole_batch)


# Rows of more entries than this are added one at a time on XLA:CPU. The reduction's
# cliff is sharp: Σxᵢ and Σxᵢ⊙xᵢ of 256 rows took 2.0 ms at 16384 entries and 24.5 ms
# at 16640, the loop 1.6 ms (`benchmarks/row_sums.py`). Up to it the reduction fuses
# with the computation of x, which the loop, reading x row by row, must materialise
# first: the benchmark MLP's temporary memory went from 1.03x to 1.53x a plain
# gradient's at B = 64 when its biases took the loop, and the benchmark CNN with
# coordinates, whose widest weight has 9216 entries, ran at 1.43 / 1.16x a plain
# gradient (B = 64 / 256) with a loop from 8192 entries on, 1.41 / 1.09x with this
# bound (interleaved in one process).
_WIDEST_REDUCED_ROW = 16384


def row_sums(x, *, squares: bool = True, mask=None, square_blocks: bool = True):
    """``(Σᵢ xᵢ, Σᵢ xᵢ⊙xᵢ)`` over the rows i of ``x`` (its leading axis) where ``mask``
    (a boolean per row, None for all rows) holds; the second is None without
    ``squares``. Accumulated in at least float32. Masked rows may hold NaN.

    The mask and the widening are applied row by row: applied to x first, they would
    make on XLA:CPU one more array the size of x (B per-example gradients, say).

    On XLA:CPU the squares of rows of up to `_WIDEST_REDUCED_ROW` entries are summed by
    blocks of rows (`_square_sums_by_blocks`), as a reduction there materialises the
    squares of its whole input: keep ``square_blocks`` for an x as large as the batch.
    ``square_blocks=False`` sums them in one reduction, which was faster where x is a
    chunk of per-example gradients that its caller sized with room for the squares:
    benchmark CNN with coordinates, 1.41 / 1.09x -> 1.33 / 0.98x a plain gradient at
    B = 64 / 256 (interleaved in one process), same compiled memory."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    def whole(x):
        x = _masked_rows(x.astype(dtype), mask)
        return jnp.sum(x, 0), (jnp.sum(x * x, 0) if squares else None)

    def on_xla_cpu(x):
        if math.prod(x.shape[1:]) <= _WIDEST_REDUCED_ROW:
            if not (squares and square_blocks):
                return whole(x)
            total = jnp.sum(_masked_rows(x.astype(dtype), mask), 0)
            return total, _square_sums_by_blocks(x, mask, dtype)
        if squares or mask is not None:
            return _row_by_row(x, squares, mask, dtype)
        return _sum_by_product(x.astype(dtype)), None

    return on_cpu(on_xla_cpu, whole, x)


def _row_by_row(x, squares: bool, mask, dtype):
    def add_row(i, sums):
        row = x[i].astype(dtype)
        if mask is not None:
            row = jnp.where(mask[i], row, 0)
        total, square_total = sums
        return total + row, (square_total + row * row if squares else None)

    zeros = vary_like(jnp.zeros(x.shape[1:], dtype), x)  # typed like x in shard_map
    return lax.fori_loop(0, x.shape[0], add_row, (zeros, zeros if squares else None))


def _sum_by_product(x):
    """Σᵢ xᵢ as the product of a row of ones with x: no loop, which would hold its own
    copy of an x that other operations read too."""
    ones = jnp.ones(x.shape[:1], x.dtype)
    return jnp.tensordot(ones, x, 1, precision=lax.Precision.HIGHEST)


def _square_sums_by_blocks(x, mask, dtype):
    """Σᵢ xᵢ⊙xᵢ over blocks of rows: XLA:CPU materialises the squares of a whole
    reduction's input, one more array the size of x."""
    rows = row_block(x.shape[0], math.prod(x.shape[1:]), math.prod(x.shape[1:]))

    def block(k, total):
        x_k = lax.dynamic_slice_in_dim(x, k * rows, rows).astype(dtype)
        if mask is not None:
            x_k = _masked_rows(x_k, lax.dynamic_slice_in_dim(mask, k * rows, rows))
        return total + jnp.sum(x_k * x_k, 0)

    zeros = vary_like(jnp.zeros(x.shape[1:], dtype), x)
    return lax.fori_loop(0, x.shape[0] // rows, block, zeros)


def _masked_rows(x, mask):
    """x with the rows where mask is False set to 0 (``where``: NaN there cannot leak)."""
    if mask is None:
        return x
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0)


def row_block(batch: int, row_size: int, result_size: int, max_blocks: int = 4) -> int:
    """Rows per block: the whole batch when its squares are no larger than the result,
    else the smallest divisor of the batch giving at most ``max_blocks`` blocks.

    Four blocks rather than eight: each block adds its product onto the K×N sum, and
    fewer of them were faster at the same compiled memory (MLP 40-512-512-10 with
    coordinates, interleaved in one process, time / plain gradient's at B = 64 / 256 /
    1024: 1.45 / 1.45 / 1.44x with 8, 1.39 / 1.43 / 1.41x with 4; memory 1.28 / 1.31 /
    1.40x with either; the whole batch at once: 1.53x at B = 1024)."""
    if batch * row_size <= result_size:
        return batch
    return min(c for c in range(1, batch + 1) if batch % c == 0 and c * max_blocks >= batch)
