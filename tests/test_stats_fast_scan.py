"""The "fast" backend on layers run by ``lax.scan`` and ``jax.checkpoint``.

A leaf that a scan slices (stacked layers: Flax ``nn.scan``, ``nnx.scan``, a loop written
with ``lax.scan``) gets the layer rules slice by slice; a leaf that every iteration reads
whole as a constant of the loop (a recurrent weight) sums every step's share
(``scan-constant``); a weight carried through the loop falls back to exact per-example
gradients. Every model is checked field by field against ``backend="vmap"``, as in
test_stats_fast.py.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec
from test_stats_fast import assert_stats_close, both_backends, keys, summed_over_shard_map

import adaptive_batch.stats._fast as fast_module
from adaptive_batch.stats import fast_stats_report, per_example_stats

LAYERS, WIDTH = 3, 6


def stacked_params():
    ks = keys(4)
    return {
        "layers": {
            "w": jax.random.normal(ks[0], (LAYERS, WIDTH, WIDTH)) / np.sqrt(WIDTH),
            "b": 0.1 * jax.random.normal(ks[1], (LAYERS, WIDTH)),
        },
        "head": jax.random.normal(ks[2], (WIDTH, 3)),
    }


def stacked_loss(reverse=False):
    def loss_fn(params, batch):
        def layer(h, weights):
            return jnp.tanh(h @ weights["w"] + weights["b"]), None

        h, _ = lax.scan(layer, batch["x"], params["layers"], reverse=reverse)
        logits = h @ params["head"]
        return (
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], 1)[:, 0]
        )

    return loss_fn


def batch_of(n):
    k1, k2 = keys(2)
    return {"x": jax.random.normal(k1, (n, WIDTH)), "y": jax.random.randint(k2, (n,), 0, 3)}


def assert_fast_without_fallback(loss_fn, params, batch, mask=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        for coordinates in (False, True):
            vmap, fast = both_backends(
                loss_fn, params, batch, mask, coordinates=coordinates, **kwargs
            )
            assert_stats_close(vmap, fast)
    report = fast_stats_report(loss_fn, params, batch, coordinates=True)
    assert not [path for path, rule in report.items() if rule.startswith("fallback")], report
    return report


def test_stacked_layers_seen_through_a_transpose_before_the_scan():
    params = stacked_params()
    # Stored layer axis last; the loss moves it to the front for the scan.
    params["layers"]["w"] = jnp.moveaxis(params["layers"]["w"], 0, -1)

    def loss_fn(p, batch):
        moved = {"w": jnp.moveaxis(p["layers"]["w"], -1, 0), "b": p["layers"]["b"]}
        return stacked_loss()({"layers": moved, "head": p["head"]}, batch)

    assert_fast_without_fallback(loss_fn, params, batch_of(7))


def test_all_padding_batch_with_scanned_layers_is_zero_even_with_nan():
    params, batch = stacked_params(), batch_of(4)
    batch["x"] = batch["x"].at[0].set(jnp.nan)
    stats = per_example_stats(stacked_loss(), backend="fast", coordinates=True)(
        params, batch, jnp.zeros(4)
    )
    for leaf in jax.tree.leaves(stats):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


class LinenBlock(linen.Module):
    @linen.compact
    def __call__(self, h, _):
        h = linen.LayerNorm()(linen.Dense(WIDTH)(h))
        return jnp.tanh(h), None


class LinenStack(linen.Module):
    @linen.compact
    def __call__(self, x):
        block = linen.scan(
            linen.remat(LinenBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        h, _ = block()(x, None)
        return linen.Dense(3)(h)


def test_linen_scan_of_rematerialised_blocks():
    model = LinenStack()
    batch = batch_of(8)
    params = model.init(jax.random.key(0), batch["x"])

    def loss_fn(p, b):
        logits = model.apply(p, b["x"])
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["y"][:, None], 1)[:, 0]

    report = assert_fast_without_fallback(loss_fn, params, batch, jnp.ones(8).at[5].set(0))
    assert report["['params']['ScanCheckpointLinenBlock_0']['Dense_0']['kernel']"] == "dense"


class NNXBlock(nnx.Module):
    """Self-attention and a dense layer over a sequence, like a transformer layer."""

    def __init__(self, rngs):
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=WIDTH, decode=False, rngs=rngs
        )
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.dense = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm(x))
        return x + nnx.gelu(self.dense(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NNXBlock(rngs)

        self.blocks = create(rngs)
        self.head = nnx.Linear(WIDTH, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def forward(x, block):
            return block(x)

        return self.head(jnp.mean(forward(x, self.blocks), axis=1))


def test_nnx_scan_over_transformer_layers():
    graphdef, params = nnx.split(NNXStack(nnx.Rngs(0)))
    ks = keys(2)
    batch = {
        "x": jax.random.normal(ks[0], (6, 5, WIDTH)),
        "y": jax.random.randint(ks[1], (6,), 0, 3),
    }

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b["x"])
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["y"][:, None], 1)[:, 0]

    report = assert_fast_without_fallback(loss_fn, params, batch, jnp.ones(6).at[2].set(0))
    assert report["['blocks']['attention']['query']['kernel'].value"].startswith("dense-")
    assert report["['blocks']['norm']['scale'].value"] == "elementwise"


def test_checkpointed_layers_without_scan():
    stacked, batch = stacked_params(), batch_of(6)
    params = {
        "w": list(stacked["layers"]["w"]),
        "b": list(stacked["layers"]["b"]),
        "head": stacked["head"],
    }

    def loss_fn(p, b):
        h = b["x"]
        for w, c in zip(p["w"], p["b"], strict=True):
            h = jax.checkpoint(lambda h, w, c: jnp.tanh(h @ w + c))(h, w, c)
        return jnp.sum((h @ p["head"]) ** 2, -1)

    report = assert_fast_without_fallback(loss_fn, params, batch, jnp.ones(6).at[0].set(0))
    assert report["['w'][0]"] == "dense"


def test_checkpointed_scan_body_is_still_rematerialised():
    """Re-run under ``jax.checkpoint``, the body's activations are recomputed in the
    reverse pass rather than kept for every layer (compiled memory, not timed)."""
    layers, width, n = 8, 128, 64
    ks = keys(2)
    params = {
        "w": jax.random.normal(ks[0], (layers, width, width)) / width,
        "v": jax.random.normal(ks[1], (layers, width, width)) / width,
    }
    batch = jnp.ones((n, width))

    def loss_with(remat):
        def block(h, w):
            return jnp.tanh(jnp.tanh(h @ w["w"]) @ w["v"])

        block = jax.checkpoint(block) if remat else block

        def loss_fn(p, x):
            h, _ = lax.scan(lambda h, w: (block(h, w), None), x, p)
            return jnp.sum(h**2, axis=-1)

        return loss_fn

    def temp_bytes(loss_fn):
        stats_fn = per_example_stats(loss_fn, backend="fast", coordinates=True)
        compiled = stats_fn.lower(params, batch, jnp.ones(n)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert fast_stats_report(loss_with(True), params, batch) == {"['v']": "dense", "['w']": "dense"}
    # The inner activations of all 8 layers: 8 · n · width · 4 bytes, kept only without.
    saved = layers * n * width * 4
    assert temp_bytes(loss_with(True)) < temp_bytes(loss_with(False)) - saved // 2


def rnn_params(width=WIDTH, inputs=4):
    ks = keys(4)
    return {
        "wx": jax.random.normal(ks[0], (inputs, width)) / 2,
        "wh": jax.random.normal(ks[1], (width, width)) / np.sqrt(width),
        "b": 0.1 * jax.random.normal(ks[2], (width,)),
        "head": jax.random.normal(ks[3], (width, 3)),
    }


def rnn_loss(reverse=False):
    """An Elman RNN: wx, wh and b are constants of the loop, read by every step."""

    def loss_fn(p, batch):
        def step(h, x_t):
            h = jnp.tanh(x_t @ p["wx"] + h @ p["wh"] + p["b"])
            return h, None

        # Zeros typed like the batch, so that inside shard_map they vary as h will.
        h0 = jnp.zeros_like(batch["x"][:, 0, :1]) * jnp.zeros(p["wh"].shape[0])
        h, _ = lax.scan(step, h0, jnp.swapaxes(batch["x"], 0, 1), reverse=reverse)
        logits = h @ p["head"]
        return (
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], 1)[:, 0]
        )

    return loss_fn


def rnn_batch(n, steps=5, inputs=4):
    k1, k2 = keys(2)
    return {
        "x": jax.random.normal(k1, (n, steps, inputs)),
        "y": jax.random.randint(k2, (n,), 0, 3),
    }


SCAN_CASES = {  # params, loss, batch, the report's rules, a micro-batch size
    # Stacked layers, sliced by the scan: the layer rules slice by slice.
    "stacked": (
        stacked_params,
        stacked_loss,
        batch_of,
        {"['head']": "dense", "['layers']['b']": "elementwise", "['layers']['w']": "dense"},
        4,
    ),
    # Recurrent weights, read whole by every step: gᵢ = Σₜ gᵢᵗ from every step's inputs
    # and signals (rule ``scan-constant``).
    "recurrent": (
        rnn_params,
        rnn_loss,
        rnn_batch,
        {
            "['b']": "scan-constant",
            "['head']": "dense",
            "['wh']": "scan-constant",
            "['wx']": "scan-constant",
        },
        5,
    ),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_scan_rules_with_masked_nan_padding_and_microbatches(case, reverse):
    make_params, make_loss, make_batch, rules, microbatch = SCAN_CASES[case]
    params, batch = make_params(), make_batch(10)
    batch["x"] = batch["x"].at[3].set(jnp.nan)
    mask = jnp.ones(10).at[3].set(0)
    report = assert_fast_without_fallback(make_loss(reverse), params, batch, mask)
    assert report == rules
    assert_fast_without_fallback(
        make_loss(reverse), params, batch, mask, microbatch_size=microbatch
    )


@pytest.mark.devices(8)
def test_recurrent_weights_on_an_all_padding_batch_and_sharded():
    params, batch = rnn_params(), rnn_batch(8)
    assert_fast_without_fallback(rnn_loss(), params, batch, jnp.zeros(8))
    stats_fn = per_example_stats(rnn_loss(), backend="fast", coordinates=True)
    vmap = per_example_stats(rnn_loss(), backend="vmap", coordinates=True)(params, batch)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert_stats_close(vmap, stats_fn(params, sharded))
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert_stats_close(vmap, summed_over_shard_map(stats_fn, mesh)(params, sharded))


class LinenLSTM(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(linen.RNN(linen.LSTMCell(7))(x)[:, -1])


def test_linen_lstm_has_no_fallback():
    """``nn.RNN`` passes its cell's parameters to the loop as constants."""
    batch = rnn_batch(6)
    model = LinenLSTM()
    params = model.init(jax.random.key(0), batch["x"])

    def loss_fn(p, b):
        logits = model.apply(p, b["x"])
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["y"][:, None], 1)[:, 0]

    report = assert_fast_without_fallback(loss_fn, params, batch, jnp.ones(6).at[2].set(0))
    assert {r for path, r in report.items() if "LSTMCell" in path} == {"scan-constant"}


class NNXLSTM(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(4, 7, rngs=rngs))
        self.head = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        # An explicit initial carry: without it nnx.RNN draws one from its Rngs, a state
        # update that a pure loss (split/merge under jit) cannot make.
        carry = (jnp.zeros((x.shape[0], 7)), jnp.zeros((x.shape[0], 7)))
        return self.head(self.rnn(x, initial_carry=carry)[:, -1])


def test_nnx_lstm_with_an_initial_carry_has_no_fallback():
    """``nnx.RNN`` runs its cell under a Flax NNX scan (``nnx.compat.scan``): the cell's
    weights are constants of the loop there too."""
    batch = rnn_batch(6)
    graphdef, params, rest = nnx.split(NNXLSTM(nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p, rest)(b["x"])
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["y"][:, None], 1)[:, 0]

    report = assert_fast_without_fallback(loss_fn, params, batch, jnp.ones(6).at[2].set(0))
    assert {r for path, r in report.items() if "'rnn'" in path} == {"scan-constant"}


def test_recurrent_weights_use_less_memory_than_per_example_gradients():
    """The steps' inputs and signals (T·B·(K + N)) instead of B per-example gradients of
    a 256 × 256 recurrent weight (compiled temporary memory, not timed)."""
    width, n = 256, 64
    params, batch = rnn_params(width, inputs=8), rnn_batch(n, steps=8, inputs=8)
    stats_fn = per_example_stats(rnn_loss(), backend="fast", coordinates=True)
    temp = stats_fn.lower(params, batch, jnp.ones(n)).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * width * width * 4 / 4  # a quarter of the per-example gradients of wh


def elman_cell(x_t, h, p):
    return jnp.tanh(x_t @ p["wx"] + h @ p["wh"] + p["b"])


def cell_with_a_subtracted_site(x_t, h, p):
    """h·Wh enters as the second operand of a subtraction: its δ is −δ of the sum."""
    return jnp.tanh(x_t @ p["wx"] - h @ p["wh"] + p["b"])


def cell_with_a_reused_site(x_t, h, p):
    """x·Wx is used twice: its δ is δ of the sum plus that of its second use."""
    z = x_t @ p["wx"]
    return jnp.tanh(z + h @ p["wh"] + p["b"]) + 0.5 * jnp.sin(z)


def rnn_loss_of(cell):
    def loss_fn(p, batch):
        def step(h, x_t):
            return cell(x_t, h, p), None

        h0 = jnp.zeros_like(batch["x"][:, 0, :1]) * jnp.zeros(p["wh"].shape[0])
        h, _ = lax.scan(step, h0, jnp.swapaxes(batch["x"], 0, 1))
        return jnp.sum(jnp.sin(h @ p["head"]), -1)

    return loss_fn


@pytest.mark.parametrize("cell", [elman_cell, cell_with_a_subtracted_site, cell_with_a_reused_site])
def test_recurrent_sites_share_a_signal_only_where_it_is_the_same(cell):
    """Sites whose outputs reach one variable through additions alone pass one δ out of
    the loop for all of them; a subtracted or reused output keeps its own."""
    params, batch = rnn_params(), rnn_batch(6)
    assert_fast_without_fallback(rnn_loss_of(cell), params, batch, jnp.ones(6).at[4].set(0))
    plan = fast_module.build_plan(rnn_loss_of(cell), params, batch, coordinates=True)
    by_leaf = {s.view.leaf: s for s in plan.sites.values()}
    b, _, wh, wx = (by_leaf[i] for i in range(4))  # leaves in sorted order of the names
    owners = {name: s.loop_sources.delta for name, s in [("wx", wx), ("wh", wh), ("b", b)]}
    if cell is elman_cell:
        assert len(set(owners.values())) == 1, owners
    else:
        differs = "wh" if cell is cell_with_a_subtracted_site else "wx"
        assert owners[differs] != owners["b"], owners
        assert len(set(owners.values())) == 2, owners
    assert b.loop_sources.records == (None,)  # a bias reads no other operand


def test_lstm_gates_pass_their_shared_inputs_out_of_the_loop_once():
    """Linen's LSTMCell has eight dense sites on x and h: one copy of each leaves the loop,
    and one δ per gate for its two dense sites and its bias."""
    batch = rnn_batch(6)
    model = LinenLSTM()
    params = model.init(jax.random.key(0), batch["x"])
    plan = fast_module.build_plan(
        lambda p, b: jnp.sum(model.apply(p, b["x"]), -1), params, batch, coordinates=True
    )
    cell_sites = [s for s in plan.sites.values() if s.rule == "scan-constant"]
    assert len(cell_sites) == 12
    passed_records = {src for s in cell_sites for src in s.loop_sources.records if src}
    assert len(passed_records) == 2  # x and h
    assert len({s.loop_sources.delta for s in cell_sites}) == 4  # one per gate


@pytest.mark.xla_cpu
def test_an_rnn_cell_passes_one_signal_out_of_the_loop():
    """Memory of the Elman RNN, norms only: x, h and one δ of every step leave the loop,
    not the bias's other operand and three δ. Measured as the compiled temporary memory
    above a plain gradient's, against the bytes of those records (a plain gradient's own
    memory moves between XLA versions: 3.8 MB with JAX 0.10.2, 2.7 MB with 0.12.1, while
    the statistics' excess stays near the records': 0.84x and 1.19x of them; three δ
    would be 1.9x)."""
    width, n, steps, inputs = 256, 64, 16, 32
    params, batch = rnn_params(width, inputs=inputs), rnn_batch(n, steps=steps, inputs=inputs)
    records = n * steps * (inputs + width + width) * 4  # x, h, one δ: float32

    def mean_loss(p, b, mask):
        return jnp.sum(mask * rnn_loss()(p, b)) / jnp.sum(mask)

    def temp(fn):
        compiled = fn.lower(params, batch, jnp.ones(n)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(jax.jit(jax.value_and_grad(mean_loss)))
    assert temp(per_example_stats(rnn_loss(), backend="fast")) - plain < 1.3 * records
    # With coordinates, one example's gᵢ of wh at a time (`_dense_products_by_example`),
    # not chunks of them (2.37x a plain gradient's memory before, with JAX 0.10.2).
    coordinates = per_example_stats(rnn_loss(), backend="fast", coordinates=True)
    assert temp(coordinates) - plain < 1.3 * records


def test_weights_the_rule_cannot_take_fall_back_with_a_reason():
    """A weight carried through the loop and changed by it, and a table looked up inside
    it (its integer ids cannot leave the loop as a cotangent), fall back, exactly. (A
    carry returned unchanged is moved to the constants by ``lax.scan`` itself.)"""
    ks = keys(3)
    params = {
        "w": jax.random.normal(ks[0], (WIDTH, WIDTH)) / 2,
        "table": jax.random.normal(ks[1], (11, WIDTH)),
    }
    batch = {"ids": jax.random.randint(ks[2], (6, 4), 0, 11)}

    def loss_fn(p, b):
        def step(carry, ids_t):
            h, w = carry
            return (jnp.tanh(h @ w + p["table"][ids_t]), jnp.tanh(w)), None

        h0 = jnp.zeros((b["ids"].shape[0], WIDTH))
        (h, _), _ = lax.scan(step, (h0, p["w"]), jnp.swapaxes(b["ids"], 0, 1))
        return jnp.sum(h**2, axis=-1)

    assert fast_stats_report(loss_fn, params, batch) == {
        "['table']": "fallback: a constant of `scan` read by `gather` of integer operands",
        "['w']": "fallback: a carry of `scan`, shared by its iterations",
    }
    fast_module._WARNED.clear()
    with pytest.warns(UserWarning, match="shared by its iterations"):
        vmap, fast = both_backends(loss_fn, params, batch, coordinates=True)
    assert_stats_close(vmap, fast)


def test_leaf_sliced_by_nested_scans_falls_back():
    params = {"w": jax.random.normal(keys(1)[0], (2, 3, WIDTH, WIDTH)) / 3}
    batch = jax.random.normal(keys(2)[1], (5, WIDTH))

    def loss_fn(p, x):
        def outer(h, w_group):
            h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w_group)
            return h, None

        h, _ = lax.scan(outer, x, p["w"])
        return jnp.sum(h**2, axis=-1)

    assert fast_stats_report(loss_fn, params, batch) == {
        "['w']": "fallback: sliced by nested `scan`s"
    }
    fast_module._WARNED.clear()
    with pytest.warns(UserWarning, match="nested"):
        vmap, fast = both_backends(loss_fn, params, batch, coordinates=True)
    assert_stats_close(vmap, fast)


@pytest.mark.devices(8)
def test_scanned_layers_batch_sharded_and_inside_shard_map():
    params, batch = stacked_params(), batch_of(16)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    stats_fn = per_example_stats(stacked_loss(), backend="fast", coordinates=True)
    vmap = per_example_stats(stacked_loss(), backend="vmap", coordinates=True)(params, batch)
    assert_stats_close(vmap, stats_fn(params, sharded))

    assert_stats_close(vmap, summed_over_shard_map(stats_fn, mesh)(params, sharded))
