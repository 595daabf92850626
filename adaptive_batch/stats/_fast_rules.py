"""Layer rules of the ``"fast"`` backend: statistics of gᵢ(W) from layer inputs and δᵢ.

Every rule receives, for one site (see `_fast_analysis`), the site's other operands
``records`` and the backprop signals ``delta`` = ∂ℓᵢ/∂y, each with a leading batch
axis and already masked (padding rows are zero), and returns

    (Σᵢ gᵢ, Σᵢ ‖gᵢ‖², Σᵢ gᵢ⊙gᵢ or None)

for the parameter leaf, without holding all gᵢ at once.

* Dense, ``y = a·W`` with P positions sharing W (P = 1 for an MLP):
  gᵢ = Σₚ aᵢₚ ⊗ δᵢₚ. With P = 1: ‖gᵢ‖² = ‖aᵢ‖²‖δᵢ‖² and Σᵢ gᵢ⊙gᵢ = (a⊙a)ᵀ(δ⊙δ),
  the latter summed over blocks of rows when B·(K+N) squares would outgrow the K·N
  result (XLA:CPU cannot square inside a matrix product).
  With P > 1: the Gram form ‖gᵢ‖² = Σₚ,q (aᵢₚ·aᵢq)(δᵢₚ·δᵢq), cost ~B·P²·(K+N), or
  per-example products, cost ~B·P·K·N, whichever is cheaper.
* Embedding lookup ``y = E[ids]``: gᵢ = rows of δᵢ summed per distinct id; positions
  with equal ids are grouped by segment sums within each example (`_fast_embedding`).
* Convolutions: per-example products on unfolded patches (`_fast_conv`).
* Everything else linear in W (elementwise scale and bias, dense layers
  seen through a broadcast): per-example products gᵢ = (∂y/∂W)ᵀδᵢ, one ``jax.vjp`` of
  the site equation vmapped over a chunk of examples, chunks summed in a ``lax.scan``
  so memory stays at chunk × |W|.

References: Dangel, Kunstner, Hennig, "BackPACK: Packing more into backprop", ICLR 2020,
https://arxiv.org/abs/1912.10985; Goodfellow, "Efficient per-example gradient
computations", https://arxiv.org/abs/1510.01799; Rochette, Manoel, Tramel, "Efficient
per-example gradient computations in convolutional neural networks",
https://arxiv.org/abs/1912.06015.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaptive_batch.stats._fast_analysis import Site, bind, transpose_views
from adaptive_batch.stats._fast_conv import conv_unfold, is_plain_conv
from adaptive_batch.stats._fast_embedding import embedding_stats, is_embedding
from adaptive_batch.stats._manual_axes import vary_like
from adaptive_batch.stats._row_sums import on_cpu, row_block, row_sums


def choose_rule(site: Site, batch_size: int, coordinates: bool) -> str:
    """The rule a site uses, decided from static shapes only."""
    name = site.eqn.primitive.name
    if site.shared:
        return "shared-products"
    if site.view.scan is not None and site.view.scan.shared:
        return "scan-constant"  # `_fast_scan_constant`
    if name == "dot_general" and site.view.bijective:
        _, _, positions, k, n = _dense_sizes(site)
        return dense_rule(positions, k, n, coordinates)
    if name == "gather" and is_embedding(site):
        return "embedding"
    if name == "conv_general_dilated":
        return "conv" if is_plain_conv(site) else "conv-products"
    if name == "dot_general":
        return "dense-products"
    return "elementwise" if name in ("mul", "add", "add_any", "sub", "div") else "products"


def site_stats(site: Site, records, delta, *, leaf_aval, coordinates: bool):
    """(Σ gᵢ, Σ ‖gᵢ‖², Σ gᵢ⊙gᵢ | None) of the site's parameter leaf."""
    rule = site.rule
    if rule in ("dense", "dense-gram", "dense-products"):
        out = dense_stats(site, rule, *dense_canonical(site, records[0], delta), coordinates)
    elif rule == "conv":
        unfold, to_weight, patch_size = conv_unfold(site)
        a = records[0]
        out = chunked_sums(
            lambda a, d: _grouped_products("bgkp,bgpn->bgkn", *unfold(a, d)),
            (a, delta),
            a.size + delta.size,
            coordinates,
            extra_per_row=patch_size,
            slice_in_place=True,
        )
        out = tuple(to_weight(x) if x is not None and x.ndim else x for x in out)
    elif rule == "embedding":
        out = embedding_stats(site, records[0], delta, coordinates)
    else:  # per-example products, already mapped to the leaf example by example
        return _products(site, records, delta, leaf_aval, coordinates)
    grad_sum, sq_norm, sq_sum = out
    grad_sum = chain_transpose(site, leaf_aval, grad_sum)
    if sq_sum is not None:  # the rules above need a bijective view: squares follow entries
        sq_sum = chain_transpose(site, leaf_aval, sq_sum)
    return grad_sum, sq_norm, sq_sum


def dense_stats(site: Site, rule: str, a, d, coordinates: bool):
    """A dense site's statistics in the layout of its viewed weight, from its inputs
    (B, H, P, K) and signals (B, H, P, N) (`dense_canonical`) by ``rule``."""
    if rule == "dense":
        out = _dense_outer(a, d, coordinates)
    elif rule == "dense-gram":
        out = _dense_gram(a, d)
    else:
        out = _dense_products(a, d, coordinates)
    return tuple(_dense_to_weight(site, x) if x is not None and x.ndim else x for x in out)


# Weights from this size on take their per-example products one example at a time on
# XLA:CPU. Σgᵢ⊙gᵢ of P = 16 positions by examples / by chunks of them, ms (B, K = N):
# (256, 16) 0.62 / 0.46, (256, 64) 1.8 / 1.6, (256, 128) 4.7 / 5.7, (256, 256) 27 / 186,
# (64, 512) 15 / 178 (`benchmarks/products.py`): about even at 64·64 (1.8 / 2.0 in an
# earlier run), and the batched products fall off a cliff from 256·256 on.
_BY_EXAMPLE_MIN_SIZE = 64 * 64


def _dense_products(a, d, coordinates: bool):
    """Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ (or None) of per-example products gᵢ = Σₚ aᵢₚ⊗dᵢₚ: example by
    example on XLA:CPU for weights of at least `_BY_EXAMPLE_MIN_SIZE` entries
    (`_dense_products_by_example`), else batched products of chunks of examples.

    A chunk's per-example gradients may take twice the layer's inputs and signals.
    Measured on XLA:CPU (NNX transformer block with coordinates, each in a fresh
    process, time / temporary memory of a plain gradient at B = 64 / 256 / 1024): once
    their size, 1.84 / 1.25 / 1.23x and 1.16 / 1.17 / 1.17x; twice, 1.26 / 1.19 / 1.22x
    and 1.28 / 1.20 / 1.19x. Once, B = 64 ran in two chunks, and glibc mapped their
    buffers fresh from the OS on every call (with MALLOC_MMAP_THRESHOLD_=4294967296 it
    was 1.3x).
    """
    budget = 2 * max(a.size + d.size, a.shape[2] * d.shape[2])

    def by_chunks(a, d):
        def products(a, d):
            return _grouped_products("bhpk,bhpn->bhkn", a, d)

        return chunked_sums(products, (a, d), budget, coordinates)

    if a.shape[1] * a.shape[3] * d.shape[3] < _BY_EXAMPLE_MIN_SIZE:
        return by_chunks(a, d)
    by_example = functools.partial(_dense_products_by_example, coordinates=coordinates)
    return on_cpu(by_example, by_chunks, a, d)


def _dense_products_by_example(a, d, *, coordinates: bool):
    """Σgᵢ, Σ‖gᵢ‖², Σgᵢ⊙gᵢ (or None) of gᵢ = Σₚ aᵢₚ⊗dᵢₚ, one example per iteration of a
    loop: on XLA:CPU a plain matrix product per example.

    XLA:CPU runs the batched product ``"bpk,bpn->bkn"`` of a chunk of examples an order
    of magnitude slower than the same products one by one (B = 64, P = 16, K = N = 256:
    26 ms batched, in chunks or whole, against 3.0–3.7 ms in a loop, for 1.3 ms of the
    summed product aᵀd). The loop also holds one gᵢ at a time, not a chunk of them.
    """
    heads, k, n = a.shape[1], a.shape[3], d.shape[3]

    def product(a_i, d_i):  # (H, P, K), (H, P, N) -> (H, K, N); (K, N) for one head
        if heads == 1:  # as `_grouped_products`
            return a_i[0].T @ d_i[0]
        return jnp.einsum("hpk,hpn->hkn", a_i, d_i)

    def step(i, sums):
        g = product(a[i], d[i])
        grad_sum, sq_norm, sq_sum = sums
        sq_sum = sq_sum + g * g if coordinates else None
        return grad_sum + g, sq_norm + jnp.vdot(g, g), sq_sum

    shape = (k, n) if heads == 1 else (heads, k, n)
    zeros = vary_like(jnp.zeros(shape, a.dtype), a)
    init = (zeros, vary_like(jnp.zeros((), a.dtype), a), zeros if coordinates else None)
    return lax.fori_loop(0, a.shape[0], step, init)


def dense_rule(positions: int, k: int, n: int, coordinates: bool) -> str:
    """The dense rule for P positions sharing a K × N weight (see `choose_rule`)."""
    if positions == 1:
        return "dense"
    if not coordinates and positions * (k + n) < k * n:
        return "dense-gram"
    return "dense-products"


def _grouped_products(spec: str, x, y):
    """``jnp.einsum(spec, x, y)`` for per-example products ``"bg..,bg..->bg.."`` with a
    group (or shared batch) axis second; with one group, that axis is left out of the
    operands and of the result (the callers reshape to the weight anyway).

    Kept in, XLA:CPU copied every chunk's products into a new layout before summing them
    (benchmark CNN at B = 64, norms, interleaved in one process: 1.28x -> 1.18x a plain
    gradient).
    """
    if x.shape[1] == y.shape[1] == 1:
        return jnp.einsum(spec.replace(spec[1], ""), x[:, 0], y[:, 0])
    return jnp.einsum(spec, x, y)


def chain_transpose(site: Site, leaf_aval, cotangent):
    """Map a cotangent of the viewed weight back to the leaf (`transpose_views`)."""
    return transpose_views(site.view.chain, leaf_aval, cotangent)


# ----------------------------------------------------------------------------- dense


def dense_dims(site: Site):
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    if site.weight_pos == 1:
        return tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    return tuple(rc), tuple(lc), tuple(rb), tuple(lb)


def _dense_sizes(site: Site):
    ac, wc, ab, wb = dense_dims(site)
    a_shape = site.eqn.invars[1 - site.weight_pos].aval.shape
    w_shape = site.eqn.invars[site.weight_pos].aval.shape
    af = [d for d in range(len(a_shape)) if d not in ac and d not in ab]
    wf = [d for d in range(len(w_shape)) if d not in wc and d not in wb]
    sizes = lambda shape, dims: math.prod(shape[d] for d in dims)  # noqa: E731
    return af, wf, sizes(a_shape, af), sizes(a_shape, ac), sizes(w_shape, wf)


def dense_canonical(site: Site, a, delta):
    """Inputs as (B, H, P, K) and signals as (B, H, P, N): H shared batch dims of the
    contraction, P positions, K contracted, N output features."""
    ac, _, ab, _ = dense_dims(site)
    af, wf, positions, k, n = _dense_sizes(site)
    batch, heads = a.shape[0], math.prod(a.shape[1 + d] for d in ab)
    a = jnp.transpose(a, [0] + [1 + d for d in (*ab, *af, *ac)])
    nb = len(ab)
    a_out = list(range(nb, nb + len(af)))
    w_out = list(range(nb + len(af), nb + len(af) + len(wf)))
    if site.weight_pos == 0:  # dot_general puts lhs free dims first
        w_out = list(range(nb, nb + len(wf)))
        a_out = list(range(nb + len(wf), nb + len(wf) + len(af)))
    delta = jnp.transpose(delta, [0] + [1 + d for d in (*range(nb), *a_out, *w_out)])
    return a.reshape(batch, heads, positions, k), delta.reshape(batch, heads, positions, n)


def _dense_to_weight(site: Site, x):
    """(H, K, N) back to the layout of the viewed weight."""
    _, wc, _, wb = dense_dims(site)
    _, wf, *_ = _dense_sizes(site)
    w_shape = site.eqn.invars[site.weight_pos].aval.shape
    order = (*wb, *wc, *wf)
    x = x.reshape([w_shape[d] for d in order])
    return jnp.transpose(x, np.argsort(order))


def _dense_outer(a, d, coordinates):
    a, d = a[:, :, 0], d[:, :, 0]  # one position
    if a.shape[1] == 1:  # no shared batch dims: plain matrix products, no transposed copies
        a, d = a[:, 0], d[:, 0]
        rows = "bk,bk->b"
    else:
        rows = "bhk,bhk->bh"
    # Row norms as contractions: XLA then does not materialise the squares.
    sq_norm = jnp.sum(jnp.einsum(rows, a, a) * jnp.einsum(rows, d, d))
    # The contractions over the batch put the narrower operand first and transpose the
    # (small) result: XLA:CPU ran (B×N)ᵀ(B×K) about 2x faster than (B×K)ᵀ(B×N) for
    # N = 10, K = 512 (MLP with coordinates, interleaved in one process: 1.55 / 1.53 /
    # 1.54x -> 1.48 / 1.49 / 1.47x a plain gradient at B = 64 / 256 / 1024).
    narrow_first = d.shape[-1] < a.shape[-1]
    first, second = (d, a) if narrow_first else (a, d)
    spec = "bk,bn->kn" if a.ndim == 2 else "bhk,bhn->hkn"

    def oriented(x):
        return jnp.swapaxes(x, -1, -2) if narrow_first else x

    grad_sum = oriented(jnp.einsum(spec, first, second))
    sq_sum = oriented(_squares_product(spec, first, second)) if coordinates else None
    return (
        grad_sum.reshape(-1, *grad_sum.shape[-2:]),
        sq_norm,
        (None if sq_sum is None else sq_sum.reshape(-1, *sq_sum.shape[-2:])),
    )


def _squares_product(spec, a, d):
    """Σᵢ aᵢ²⊗dᵢ² as (a⊙a)ᵀ(d⊙d); on XLA:CPU summed over blocks of rows when the squared
    copies of the whole batch would outgrow the result (`on_cpu`)."""
    return on_cpu(
        functools.partial(_squares_product_by_blocks, spec),
        lambda a, d: jnp.einsum(spec, a * a, d * d),
        a,
        d,
    )


def _squares_product_by_blocks(spec, a, d):
    result = jax.eval_shape(lambda a, d: jnp.einsum(spec, a, d), a, d)
    chunk = row_block(a.shape[0], a[0].size + d[0].size, math.prod(result.shape))
    if chunk == a.shape[0]:
        return _product_of_squares(spec, a, d)

    def block(k, total):
        a_k, d_k = (lax.dynamic_slice_in_dim(x, k * chunk, chunk) for x in (a, d))
        return total + _product_of_squares(spec, a_k, d_k)

    zeros = vary_like(jnp.zeros(result.shape, a.dtype), a)  # typed like a under shard_map
    return lax.fori_loop(0, a.shape[0] // chunk, block, zeros)


def _product_of_squares(spec, a, d):
    """einsum(spec, a⊙a, d⊙d); without shared batch dims, as (a⊙a)ᵀ written out, times
    d⊙d.

    XLA:CPU runs (K×B)·(B×N) with its YNN matrix kernel but (B×K)ᵀ(B×N), the form of
    the einsum, with Eigen. The squares are a new array anyway, so writing them
    transposed costs little; the barrier keeps XLA from folding the transpose back
    into the product. Measured (MLP 40-512-512-10 with coordinates, interleaved in one
    process, time / plain gradient's at B = 64 / 256 / 1024): 1.41 / 1.45 / 1.43x ->
    1.40 / 1.40 / 1.43x, same compiled memory. The gradient's own product aᵀd is left
    as it is: there a transposed copy of a is a pass of its own (1.50x at B = 256).
    """
    if a.ndim == 2:
        # XLA squares and transposes in one loop. A second barrier between the two
        # changed nothing in the compiled program (MLP at B = 64, 256 and 1024).
        return jnp.dot(lax.optimization_barrier((a * a).T), d * d)
    return jnp.einsum(spec, a * a, d * d)


def _dense_gram(a, d):
    grad_sum = jnp.einsum("bhpk,bhpn->hkn", a, d)
    gram_a = jnp.einsum("bhpk,bhqk->bhpq", a, a)
    gram_d = jnp.einsum("bhpn,bhqn->bhpq", d, d)
    return grad_sum, jnp.sum(gram_a * gram_d), None


# ----------------------------------------------------------------------------- products


def _products(site: Site, records, delta, leaf_aval, coordinates):
    """Per-example gᵢ(W) = Vᵀ(∂y/∂Wv)ᵀδᵢ by a vjp of the site equation and of the view
    chain V (a broadcast view sums over positions, so it is undone before squaring),
    in chunks."""
    per_example = jax.vmap(per_example_grad(site, leaf_aval))
    w_size = site.eqn.invars[site.weight_pos].aval.size
    budget = max(delta.size, w_size, math.prod(leaf_aval.shape))
    return chunked_sums(lambda r, d: per_example(r, d), (records, delta), budget, coordinates)


def per_example_grad(site: Site, leaf_aval):
    """``grad(records, delta)``: one example's gᵢ(W) at the site, shaped like the leaf."""
    eqn, pos = site.eqn, site.weight_pos
    w_aval = eqn.invars[pos].aval
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    others = [v.aval for i, v in enumerate(eqn.invars) if i != pos]
    out_dtype = eqn.outvars[0].aval.dtype

    def grad(recs, d):
        # Back to the traced dtypes: the records were widened for the sums.
        recs = [r.astype(aval.dtype) for r, aval in zip(recs, others, strict=True)]

        def site_fn(w):
            operands = list(recs)
            operands.insert(pos, w)
            return bind(eqn, *operands, params=bind_params)

        w = vary_like(jnp.zeros(w_aval.shape, w_aval.dtype), d)
        g = jax.vjp(site_fn, w)[1](d.astype(out_dtype))[0]
        return chain_transpose(site, leaf_aval, g.astype(d.dtype))

    return grad


def chunked_sums(
    per_example_grads, inputs, budget: int, coordinates: bool, extra_per_row=0, slice_in_place=False
):
    """Σ g, Σ‖g‖², [Σ g⊙g] of per-example grads, ≤ budget elements of them (and of
    ``extra_per_row`` intermediates per example) at a time."""
    batch = jax.tree.leaves(inputs)[0].shape[0]
    one_row = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), inputs)
    g_shape = jax.eval_shape(per_example_grads, *one_row)
    per_row = math.prod(g_shape.shape[1:]) + extra_per_row
    fits = [c for c in range(2, batch + 1) if batch % c == 0 and c * per_row <= budget]
    chunk = max(fits, default=1)

    def sums(args, square_blocks=False):
        g = per_example_grads(*args)
        if coordinates:
            total, squares = row_sums(g, square_blocks=square_blocks)
            return total, jnp.sum(squares), squares
        # A whole reduction fuses the squares, and a narrow g's computation too.
        return row_sums(g, squares=False)[0], jnp.sum(jnp.square(g)), None

    if chunk == batch:
        # g of the whole batch (one row per example, like a bias): its squares would be
        # one more batch-sized temporary (the MLP's biases: 1.28x -> 1.52x a plain
        # gradient's memory at B = 64). A chunk's budget has room for them.
        return sums(inputs, square_blocks=True)
    if slice_in_place:
        # Chunks sliced from the leading axis where they lie: a reshape to (chunks, chunk,
        # ...) for lax.scan makes XLA copy the inputs into a chunk-major layout first,
        # which for convolution records cost more time than the patches themselves.

        def step(k, carry):
            args = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, k * chunk, chunk), inputs)
            return jax.tree.map(jnp.add, carry, sums(args))

        first = jax.tree.map(lambda x: x[:chunk], inputs)
        reference = jax.tree.leaves(inputs)[0]
        init = jax.tree.map(
            lambda s: vary_like(jnp.zeros(s.shape, s.dtype), reference),
            jax.eval_shape(sums, first),
        )
        return lax.fori_loop(0, batch // chunk, step, init)
    # Per-example products of dense layers: measured on XLA:CPU, the same loop as above
    # kept a relaid copy of each chunk's products (transformer B=64 with coordinates:
    # 1.40x the plain gradient's temporary memory, 1.16x with scan).
    chunks = jax.tree.map(lambda x: x.reshape((batch // chunk, chunk, *x.shape[1:])), inputs)

    def scan_step(carry, args):
        return jax.tree.map(jnp.add, carry, sums(args)), None

    init = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, jax.tree.map(lambda x: x[0], chunks)))
    return lax.scan(scan_step, init, chunks)[0]
