"""Tests for `adaptive_batch.data.Loader`: epochs, padding, resume, prefetch, sharding."""

import gc
import json
import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adaptive_batch import BatchPlan, BatchSizeController
from adaptive_batch.data import Batch, Loader


def make_arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "id": np.arange(n),
        "x": rng.normal(size=(n, 3)).astype(np.float32),
        "t": (np.arange(n) % 7,),
    }


class Items:
    """A random-access source with only __len__ and __getitem__ (the Grain protocol)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays["id"])

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError(f"index must be an int, got {type(i)}")
        a = self.arrays
        return {"id": a["id"][i], "x": a["x"][i], "t": (int(a["t"][0][i]),)}


def real_ids(batches):
    return np.concatenate([b.data["id"][: b.batch_size] for b in batches])


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.batch_size, a.epoch, a.index) == (b.batch_size, b.epoch, b.index)
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        jax.tree.map(
            lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a.data, b.data
        )


sizes_st = st.lists(st.integers(1, 90), min_size=1, max_size=25)


# ---------------------------------------------------------------------------- epochs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), sizes_st, st.integers(0, 2**31 - 1))
def test_every_epoch_sees_each_example_exactly_once(n, sizes, seed):
    loader = Loader(make_arrays(n), seed=seed)
    batches = [loader.next(s) for s in sizes]
    ids = real_ids(batches)
    assert len(ids) == sum(sizes)
    full, rest = divmod(len(ids), n)
    for e in range(full):
        assert sorted(ids[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert len(set(ids[full * n :].tolist())) == rest  # the epoch in progress repeats nothing
    # Positions are the running sums of the sizes.
    starts = np.cumsum([0, *sizes[:-1]])
    assert [(b.epoch, b.index) for b in batches] == [divmod(int(s), n) for s in starts]
    assert (loader.epoch, loader.index) == divmod(sum(sizes), n)
    # Deterministic from the seed.
    again = Loader(make_arrays(n), seed=seed)
    assert_same_batches([again.next(s) for s in sizes], batches)


def test_epochs_are_reshuffled_and_seeds_differ():
    n = 50
    ids = real_ids([Loader(make_arrays(n), seed=3).next(3 * n)])
    epochs = ids.reshape(3, n)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    other = real_ids([Loader(make_arrays(n), seed=4).next(n)])
    assert not np.array_equal(other, epochs[0])
    ordered = real_ids([Loader(make_arrays(n), shuffle=False).next(2 * n)])
    np.testing.assert_array_equal(ordered, np.tile(np.arange(n), 2))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), sizes_st)
def test_span_epochs_false_stops_at_the_epoch_end(n, sizes):
    loader = Loader(make_arrays(n), seed=1, span_epochs=False)
    batches = [loader.next(s) for s in sizes]
    by_epoch = {}
    for b, s in zip(batches, sizes, strict=True):
        assert b.batch_size == min(s, n - b.index)  # truncated only at the end of an epoch
        assert b.mask.sum() == b.batch_size and b.mask.shape == (s,)
        by_epoch.setdefault(b.epoch, []).extend(b.data["id"][: b.batch_size].tolist())
    for e, ids in by_epoch.items():
        assert len(ids) == len(set(ids))
        if e < loader.epoch:
            assert sorted(ids) == list(range(n))


# ---------------------------------------------------------------------------- padding


@pytest.mark.parametrize("kind", ["arrays", "items"])
def test_padding_mask_and_rows(kind):
    arrays = make_arrays(23)
    source = arrays if kind == "arrays" else Items(arrays)
    loader = Loader(source, seed=7)
    for plan in [BatchPlan(5, 8), BatchPlan(13, 16, 2), 4, BatchPlan(30, 32)]:
        b = loader.next(plan)
        padded = getattr(plan, "padded_size", plan)
        real = getattr(plan, "batch_size", plan)
        assert isinstance(b, Batch) and b.batch_size == real
        np.testing.assert_array_equal(b.mask, np.arange(padded) < real)
        assert b.mask.dtype == bool
        ids = b.data["id"][:real]
        np.testing.assert_array_equal(b.data["x"][:real], arrays["x"][ids])
        np.testing.assert_array_equal(b.data["t"][0][:real], arrays["t"][0][ids])
        for leaf in (b.data["id"], b.data["x"], b.data["t"][0]):
            assert leaf.shape[0] == padded and not leaf[real:].any()
        assert b.data["x"].dtype == np.float32 and isinstance(b.data["t"], tuple)


def test_item_and_array_sources_give_the_same_batches():
    arrays = make_arrays(37)
    sizes = [5, 11, 40, 2, 19]
    from_arrays = [Loader(arrays, seed=2).next(s) for s in sizes]
    a, b = Loader(arrays, seed=2), Loader(Items(arrays), seed=2)
    assert_same_batches([b.next(s) for s in sizes], [a.next(s) for s in sizes])
    assert len(from_arrays) == 5


def test_single_array_list_and_getitems_sources():
    x = np.arange(12.0).reshape(6, 2)
    b = Loader(x, shuffle=False).next(BatchPlan(4, 5))
    np.testing.assert_array_equal(b.data, np.vstack([x[:4], np.zeros((1, 2))]))
    items = [(np.full(2, i), i) for i in range(6)]  # a list is a list of examples
    b = Loader(items, shuffle=False).next(3)
    np.testing.assert_array_equal(b.data[1], [0, 1, 2])

    class Batched(Items):
        calls = 0

        def __getitems__(self, indices):
            Batched.calls += 1
            return [self[i] for i in indices]

    Loader(Batched(make_arrays(10)), seed=0).next(7)
    assert Batched.calls == 1


# ---------------------------------------------------------------------------- resume


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), sizes_st, sizes_st, st.booleans())
def test_resume_gives_identical_batches(n, before, after, span):
    arrays = make_arrays(n)
    loader = Loader(arrays, seed=11, span_epochs=span)
    for s in before:
        loader.next(s)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = Loader(arrays, seed=11, span_epochs=span)
    resumed.load_state_dict(state)
    assert_same_batches([resumed.next(s) for s in after], [loader.next(s) for s in after])


def test_load_state_dict_checks_and_drops_requests():
    loader = Loader(make_arrays(10), seed=1, prefetch=2)
    loader.request(3)
    state = {**loader.state_dict(), "epoch": 2, "index": 4}
    loader.load_state_dict(state)
    assert loader.pending == 0 and (loader.epoch, loader.index) == (2, 4)
    with pytest.raises(ValueError, match="seed=5"):
        loader.load_state_dict({**state, "seed": 5})
    with pytest.raises(ValueError, match="num_examples=11"):
        loader.load_state_dict({**state, "num_examples": 11})
    with pytest.raises(ValueError, match="not below num_examples=10"):
        loader.load_state_dict({**state, "index": 10})
    with pytest.raises(ValueError, match="missing"):
        loader.load_state_dict({"epoch": 0})
    loader.close()


# ---------------------------------------------------------------------------- prefetch


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), sizes_st, st.integers(1, 3), st.integers(0, 3))
def test_prefetch_gives_the_sync_batches(n, sizes, depth, ahead):
    arrays = make_arrays(n)
    sync = Loader(Items(arrays), seed=5)
    want = [sync.next(BatchPlan(s, s + 3)) for s in sizes]
    with Loader(Items(arrays), seed=5, prefetch=depth) as loader:
        got, queued = [], 0
        for i in range(len(sizes)):
            # Keep `ahead` requests in flight beyond the one taken now.
            while queued < min(i + 1 + ahead, len(sizes)):
                loader.request(BatchPlan(sizes[queued], sizes[queued] + 3))
                queued += 1
            got.append(loader.next())
            if i == len(sizes) // 2:  # the state counts taken batches, not prefetched ones
                mid = Loader(Items(arrays), seed=5)
                for t in sizes[: i + 1]:
                    mid.next(t)
                assert loader.state_dict() == mid.state_dict()
        assert_same_batches(got, want)
    with Loader(arrays, seed=5, prefetch=depth) as loader:
        assert_same_batches(list(loader.iterate(BatchPlan(s, s + 3) for s in sizes)), want)


def test_iterate_stopped_early_keeps_the_position():
    arrays = make_arrays(20)
    loader = Loader(arrays, seed=0, prefetch=3)
    for i, _ in enumerate(loader.iterate([4, 5, 6, 7, 8])):
        if i == 1:
            break
    assert loader.pending == 0 and loader.index == 9
    reference = Loader(arrays, seed=0)
    reference.next(9)
    assert_same_batches([loader.next(6)], [reference.next(6)])
    loader.close()


def test_controller_with_lag_and_prefetch_loop():
    """The host loop of lag=1: request plan t+1 while step t would run."""
    arrays = make_arrays(100)
    ctrl = BatchSizeController(4, 64, lag=1, max_microbatch_size=16)
    suggestions = [7, 20, 3, 50, 64, 64, 9]
    with Loader(arrays, seed=0, prefetch=2) as loader:
        loader.request(ctrl.plan)
        batches = []
        for s in suggestions:
            batches.append(loader.next())
            loader.request(ctrl.next(s))  # applies the previous step's suggestion
        assert loader.pending == 1
    # Filled to the buckets (the controller's default): no padding rows.
    assert [b.batch_size for b in batches] == [4, 4, 8, 32, 32, 64, 64]
    assert [b.mask.shape[0] for b in batches] == [4, 4, 8, 32, 32, 64, 64]
    assert sorted(real_ids(batches)[:100].tolist()) == list(range(100))


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "adaptive_batch-prefetch"]


def test_threads_stop_on_close_exit_and_garbage_collection():
    before = len(_prefetch_threads())
    loader = Loader(make_arrays(10), prefetch=1)
    for _ in range(3):
        loader.request(4)  # the thread blocks on the full result queue
    assert len(_prefetch_threads()) == before + 1
    loader.close()
    assert len(_prefetch_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        loader.next(2)
    with Loader(make_arrays(10), prefetch=2) as loader:
        loader.next(3)
    assert len(_prefetch_threads()) == before
    forgotten = Loader(make_arrays(10), prefetch=2)
    forgotten.request(3)
    del forgotten
    gc.collect()
    assert len(_prefetch_threads()) == before


def test_errors_in_the_prefetch_thread_reach_the_caller():
    class Broken(Items):
        def __getitem__(self, i):
            if i == 3:
                raise KeyError("example 3 is corrupt")
            return super().__getitem__(i)

    with Loader(Broken(make_arrays(10)), shuffle=False, prefetch=2) as loader:
        loader.request(2)
        loader.request(4)  # reads example 3
        loader.request(2)
        assert loader.next().batch_size == 2
        with pytest.raises(KeyError, match="corrupt"):
            loader.next()
        assert loader.pending == 0 and loader.index == 2  # the failed batch was not taken


# ---------------------------------------------------------------------------- placement


@pytest.mark.devices(8)
@pytest.mark.parametrize("prefetch", [0, 2])
def test_sharded_placement_over_eight_devices(prefetch):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    arrays = make_arrays(50)
    host = Loader(arrays, seed=3)
    with Loader(arrays, seed=3, prefetch=prefetch, sharding=sharding) as loader:
        for plan in [BatchPlan(5, 8), BatchPlan(30, 32), BatchPlan(64, 64)]:
            b, want = loader.next(plan), host.next(plan)
            for leaf in [b.mask, *jax.tree.leaves(b.data)]:
                assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(
                    sharding, leaf.ndim
                )
                assert len(leaf.addressable_shards) == 8
            assert_same_batches([b], [want])
        with pytest.raises(ValueError, match=r"12 rows .* 8 shards .* multiple_of=8"):
            loader.next(BatchPlan(10, 12))


@pytest.mark.devices(8)
def test_two_dimensional_mesh_shards_the_batch_axis_only():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, P("data", None))
    b = Loader(make_arrays(20), sharding=sharding).next(BatchPlan(10, 12))
    assert b.data["x"].sharding.shard_shape((12, 3)) == (3, 3)
    assert b.mask.sharding.shard_shape((12,)) == (3,)
    with pytest.raises(ValueError, match="4 shards"):
        Loader(make_arrays(20), sharding=sharding).next(6)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ({"x": np.zeros((0, 3))}, ValueError, "empty"),
        ([], ValueError, "empty"),
        ({}, ValueError, "no arrays"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4)}, ValueError, r"\['x'\]: 5, source\['y'\]: 4"),
        ((np.zeros(3), np.float32(1.0)), ValueError, r"source\[1\] is a scalar"),
        (42, TypeError, "cannot read examples from a int"),
    ],
)
def test_bad_sources(source, error, match):
    with pytest.raises(error, match=match):
        Loader(source)


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        (
            [np.zeros(3), np.zeros(3), np.zeros(4)],
            ValueError,
            r"source\[2\] has shape \(4,\).*\(3,\)",
        ),
        ([{"a": 1}, {"a": 2}, {"b": 3}], ValueError, r"source\[2\] has structure \{\['b'\]\}"),
        ([np.zeros(2), np.zeros(2), np.array(["a", "b"])], TypeError, "same dtype"),
    ],
)
def test_bad_items(items, error, match):
    with pytest.raises(error, match=match):
        Loader(items, shuffle=False).next(3)


@pytest.mark.parametrize(
    ("request_", "error", "match"),
    [
        (0, ValueError, "batch size must be an integer >= 1, got 0"),
        (-2, ValueError, "got -2"),
        (2.5, ValueError, "whole number"),
        (np.int64(0), ValueError, "got 0"),
        ("8", TypeError, "integer"),
    ],
)
def test_bad_requests(request_, error, match):
    with pytest.raises(error, match=match):
        Loader(make_arrays(10)).next(request_)


def test_item_batches_keep_the_first_examples_dtypes():
    items = [np.int32(1), np.int32(2), np.int8(3), np.int8(4)]
    loader = Loader(items, shuffle=False)
    assert loader.next(2).data.dtype == loader.next(2).data.dtype == np.int32
    with pytest.raises(TypeError, match="same dtype"):
        Loader([np.int32(1), np.float32(2.5)], shuffle=False).next(2)


def test_bad_plans_settings_and_call_order():
    class Plan:
        batch_size, padded_size = 9, 8

    loader = Loader(make_arrays(10))
    with pytest.raises(ValueError, match=r"batch_size=9 is above plan\.padded_size=8"):
        loader.next(Plan())
    with pytest.raises(RuntimeError, match="no batch was requested"):
        loader.next()
    loader.request(2)
    with pytest.raises(RuntimeError, match="1 requested batch"):
        loader.next(3)
    assert loader.next().batch_size == 2
    assert loader.next(np.int64(3)).batch_size == 3
    for kwargs, match in [
        ({"seed": -1}, "seed"),
        ({"prefetch": -1}, "prefetch"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"sharding": "data"}, "jax.sharding.Sharding"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            Loader(make_arrays(4), **kwargs)


def test_big_batches_span_several_epochs():
    b = Loader(make_arrays(4), seed=0).next(10)
    ids = b.data["id"]
    assert sorted(ids[:4].tolist()) == sorted(ids[4:8].tolist()) == [0, 1, 2, 3]
    assert len(set(ids[8:].tolist())) == 2


def test_grain_map_dataset_interoperates():
    """Grain's own MapDataset (the protocol itself is tested above without Grain)."""
    grain = pytest.importorskip("grain", reason="grain is not installed (optional)")
    arrays = make_arrays(20)
    dataset = grain.MapDataset.range(20).map(lambda i: {"id": arrays["id"][i], "x": arrays["x"][i]})
    ours = Loader({"id": arrays["id"], "x": arrays["x"]}, seed=4)
    theirs = Loader(dataset, seed=4)
    assert_same_batches([theirs.next(s) for s in (3, 9, 15)], [ours.next(s) for s in (3, 9, 15)])


def test_loader_needs_no_jax_without_sharding():
    package = pathlib.Path(__file__).parents[1] / "adaptive_batch"
    code = f"""
import sys, types
import numpy as np
sys.modules["jax"] = None  # any import of JAX fails
pkg = types.ModuleType("adaptive_batch")  # skip the top-level __init__ (it needs JAX)
pkg.__path__ = [{str(package)!r}]
sys.modules["adaptive_batch"] = pkg
from adaptive_batch.data import Loader
with Loader({{"x": np.arange(10)}}, prefetch=1) as loader:
    print(loader.next(4).mask.sum())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


def test_batch_carries_its_plan_and_passes_through_jit():
    import jax
    import jax.numpy as jnp

    from adaptive_batch import BatchPlan

    source = {"x": np.arange(20.0).reshape(10, 2)}
    with Loader(source, seed=0) as loader:
        batch = loader.next(BatchPlan(5, 8, num_microbatches=2))
        plain = loader.next(3)
    assert batch.plan == BatchPlan(5, 8, num_microbatches=2) and batch.num_microbatches == 2
    assert plain.plan == BatchPlan(3, 3)
    assert int(jax.jit(lambda b: jnp.sum(b.mask))(batch)) == 5  # a pytree of arrays and ints
