"""Tests for the host-side `BatchSizeController` (pure Python; JAX only as an input type)."""

import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_batch import BatchPlan, BatchSizeController

# ---------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"min_batch_size": 16, "max_batch_size": 4096},
            (16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        ),
        ({"min_batch_size": 10, "max_batch_size": 100}, (16, 32, 64, 100)),
        ({"min_batch_size": 10, "max_batch_size": 12}, (12,)),
        ({"min_batch_size": 10, "max_batch_size": 100, "multiple_of": 3}, (18, 33, 66, 102)),
        ({"min_batch_size": 1, "max_batch_size": 40, "multiple_of": 8}, (8, 16, 32, 40)),
        ({"min_batch_size": 5, "max_batch_size": 5}, (5,)),
        (
            {"min_batch_size": 20, "max_batch_size": 300, "buckets": [8, 16, 50, 200, 400, 800]},
            (50, 200, 400),
        ),
        ({"min_batch_size": 3, "max_batch_size": 30, "buckets": None}, None),
    ],
)
def test_bucket_ladders(kwargs, expected):
    assert BatchSizeController(**kwargs).buckets == expected


def test_pow2_from_16_to_4096_visits_nine_shapes():
    ctrl = BatchSizeController(16, 4096)
    shapes = {ctrl.next(b).padded_size for b in range(16, 4097)}
    assert len(shapes) == 9


def test_plans_by_hand():
    ctrl = BatchSizeController(16, 4096, max_microbatch_size=512, multiple_of=8, fill_buckets=False)
    assert ctrl.plan_for(17) == BatchPlan(17, 32, 1, 32)
    assert ctrl.plan_for(513) == BatchPlan(513, 1024, 2, 512)
    assert ctrl.plan_for(4000) == BatchPlan(4000, 4096, 8, 512)
    exact = BatchSizeController(
        1, 1000, buckets=None, multiple_of=4, max_microbatch_size=40, fill_buckets=False
    )
    # 99 -> 100 rows -> 3 micro-batches of ceil(100/3)=34 -> 36 (multiple of 4): 108 rows.
    assert exact.plan_for(99) == BatchPlan(99, 108, 3, 36)
    assert exact.plan_for(7) == BatchPlan(7, 8, 1, 8)


def test_filled_plans_by_hand():
    ctrl = BatchSizeController(16, 4000, max_microbatch_size=512, multiple_of=8)
    assert ctrl.plan_for(17) == BatchPlan(32, 32, 1, 32)
    assert ctrl.plan_for(513) == BatchPlan(1024, 1024, 2, 512)
    # Filled to the bucket (4000 = max); the split into 8 x 504 keeps 32 padding rows.
    assert ctrl.plan_for(2100) == BatchPlan(4000, 4032, 8, 504)
    # buckets=None: only rounding to multiple_of is filled.
    exact = BatchSizeController(1, 1000, buckets=None, multiple_of=4, max_microbatch_size=40)
    assert exact.plan_for(99) == BatchPlan(100, 108, 3, 36)
    assert exact.plan_for(998) == BatchPlan(1000, 1000, 25, 40)
    # A padded shape above max_batch_size keeps its padding.
    capped = BatchSizeController(10, 100, multiple_of=3)  # buckets 18, 33, 66, 102
    assert capped.plan_for(70) == BatchPlan(100, 102, 1, 102)
    assert BatchSizeController(10, 100).plan.batch_size == 16  # the initial plan too


def test_bucket_plans_cover_every_bucket():
    ctrl = BatchSizeController(10, 100, multiple_of=4, max_microbatch_size=32)
    plans = ctrl.bucket_plans()
    assert [p.batch_size for p in plans] == [16, 32, 64, 100]
    # 100 rows in 4 micro-batches of ceil(100 / 4) = 25 -> 28 (multiple of 4) rows.
    assert [p.padded_size for p in plans] == [16, 32, 64, 112]
    assert [p.num_microbatches for p in plans] == [1, 1, 2, 4]
    with pytest.raises(ValueError, match="buckets=None"):
        BatchSizeController(1, 8, buckets=None).bucket_plans()


# ---------------------------------------------------------------------------- stepping


def test_clamp_and_monotone():
    ctrl = BatchSizeController(16, 256, fill_buckets=False)
    sizes = [ctrl.next(s).batch_size for s in [0, 40, 20, 10_000, 5]]
    assert sizes == [16, 40, 40, 256, 256]
    filled = BatchSizeController(16, 256)
    assert [filled.next(s).batch_size for s in [0, 40, 20, 10_000, 5]] == [16, 64, 64, 256, 256]
    free = BatchSizeController(16, 256, monotone=False, initial_batch_size=100, fill_buckets=False)
    assert free.plan.batch_size == 100
    assert [free.next(s).batch_size for s in [0, 40, 20, 10_000, None]] == [16, 40, 20, 256, 256]
    assert free.history == ((0, 100), (1, 16), (2, 40), (3, 20), (4, 256))
    assert free.step == 5


def test_lag_delays_suggestions():
    ctrl = BatchSizeController(
        1, 1000, lag=2, monotone=False, initial_batch_size=7, fill_buckets=False
    )
    assert [ctrl.next(s).batch_size for s in [10, 20, 30, 40]] == [7, 7, 10, 20]


def test_lag_reads_device_scalars_only_when_applied():
    class Lazy:
        """A device-scalar stand-in that records when its value is read."""

        shape, dtype = (), np.dtype("int32")

        def __init__(self, value):
            self.value, self.read = value, False

        def __index__(self):
            self.read = True
            return self.value

    ctrl = BatchSizeController(1, 1000, lag=1, fill_buckets=False)
    first, second = Lazy(50), Lazy(60)
    ctrl.next(first)
    assert not first.read
    assert ctrl.next(second).batch_size == 50
    assert first.read and not second.read


@pytest.mark.parametrize(
    "value",
    [np.int64(300), np.int32(300), np.float32(300.0), jnp.int32(300), jnp.float32(300), 300.0],
)
def test_numpy_and_jax_scalars(value):
    for lag in (0, 1):
        ctrl = BatchSizeController(16, 4096, lag=lag, fill_buckets=False)
        plans = [ctrl.next(value) for _ in range(lag + 1)]
        assert plans[-1] == BatchPlan(300, 512, 1, 512)
        assert type(plans[-1].batch_size) is int


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-3, ValueError, r"got -3.*clamped"),
        (np.int32(-3), ValueError, "got -3"),
        (12.5, ValueError, "whole number, got 12.5"),
        (np.float32(np.nan), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (jnp.float32(jnp.inf), ValueError, "finite"),
        (True, TypeError, "got True"),
        ("64", TypeError, "scalar integer"),
        (np.arange(2), TypeError, r"shape \(2,\)"),
        (jnp.arange(2), TypeError, "scalar integer"),
        (jnp.array(True), TypeError, "scalar integer"),
    ],
)
def test_bad_suggestions(value, error, match):
    with pytest.raises(error, match=match):
        BatchSizeController(1, 10).next(value)


def test_bad_jax_value_is_reported_when_applied_with_lag():
    ctrl = BatchSizeController(1, 10, lag=1)
    ctrl.next(jnp.int32(-5))  # the value is not read yet
    with pytest.raises(ValueError, match="got -5"):
        ctrl.next(3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"min_batch_size": 0, "max_batch_size": 8},
            ValueError,
            "min_batch_size must be .* >= 1, got 0",
        ),
        ({"min_batch_size": 8, "max_batch_size": 4}, ValueError, "max_batch_size .* >= 8, got 4"),
        ({"min_batch_size": 2.5, "max_batch_size": 4}, ValueError, "whole number"),
        (
            {"min_batch_size": 2, "max_batch_size": 8, "initial_batch_size": 9},
            ValueError,
            r"\[2, 8\]",
        ),
        ({"min_batch_size": 2, "max_batch_size": 8, "initial_batch_size": 1}, ValueError, ">= 2"),
        ({"min_batch_size": 2, "max_batch_size": 8, "monotone": 1}, TypeError, "monotone"),
        ({"min_batch_size": 2, "max_batch_size": 8, "multiple_of": 0}, ValueError, "multiple_of"),
        ({"min_batch_size": 2, "max_batch_size": 8, "lag": -1}, ValueError, "lag"),
        ({"min_batch_size": 2, "max_batch_size": 8, "buckets": "log"}, ValueError, "'pow2'"),
        (
            {"min_batch_size": 2, "max_batch_size": 8, "buckets": [4, 2, 8]},
            ValueError,
            "increasing",
        ),
        ({"min_batch_size": 2, "max_batch_size": 8, "buckets": []}, ValueError, "non-empty"),
        (
            {"min_batch_size": 2, "max_batch_size": 8, "buckets": [2, 4]},
            ValueError,
            "add a bucket >= 8",
        ),
        ({"min_batch_size": 2, "max_batch_size": 8, "buckets": 4}, TypeError, "sorted list"),
        (
            {"min_batch_size": 2, "max_batch_size": 8, "buckets": [4, 6, 10], "multiple_of": 4},
            ValueError,
            r"\[6, 10\] are not multiples .* \[8, 12\]",
        ),
        (
            {
                "min_batch_size": 2,
                "max_batch_size": 64,
                "multiple_of": 8,
                "max_microbatch_size": 12,
            },
            ValueError,
            "use 8 or 16",
        ),
        (
            {"min_batch_size": 2, "max_batch_size": 64, "multiple_of": 8, "max_microbatch_size": 4},
            ValueError,
            "max_microbatch_size must be .* >= 8",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchSizeController(**kwargs)


def test_plan_for_and_batch_plan_checks():
    ctrl = BatchSizeController(4, 64)
    with pytest.raises(ValueError, match=r"\[4, 64\]"):
        ctrl.plan_for(65)
    with pytest.raises(ValueError, match="batch_size <= padded_size"):
        BatchPlan(batch_size=9, padded_size=8)
    with pytest.raises(ValueError, match="num_microbatches"):
        BatchPlan(batch_size=8, padded_size=8, num_microbatches=3, microbatch_size=3)
    assert BatchPlan(5, 8, 2).microbatch_size == 4
    assert BatchPlan(5, 8).num_padding == 3


# ---------------------------------------------------------------------------- checkpoints


def test_state_round_trip_through_json():
    ctrl = BatchSizeController(8, 512, lag=2, monotone=False)
    for s in [20, 300, 9]:
        ctrl.next(s)
    state = json.loads(json.dumps(ctrl.state_dict()))
    clone = BatchSizeController(8, 512, lag=2, monotone=False)
    clone.load_state_dict(state)
    assert clone.plan == ctrl.plan and clone.history == ctrl.history and clone.step == 3
    assert [clone.next(s) for s in [40, 50, 60]] == [ctrl.next(s) for s in [40, 50, 60]]


def test_state_dict_reads_pending_jax_scalars():
    ctrl = BatchSizeController(8, 512, lag=1)
    ctrl.next(jnp.int32(100))
    assert ctrl.state_dict()["pending"] == [100]


def test_load_state_dict_errors():
    state = BatchSizeController(8, 512, lag=1).state_dict()
    with pytest.raises(ValueError, match="lag=1"):
        BatchSizeController(8, 512).load_state_dict(state)
    with pytest.raises(ValueError, match=r"outside this controller's bounds .* \[8, 16\]"):
        BatchSizeController(8, 16, lag=1).load_state_dict({**state, "batch_size": 100})
    with pytest.raises(ValueError, match="missing"):
        BatchSizeController(8, 512).load_state_dict({"batch_size": 8})


def test_control_needs_neither_jax_nor_numpy():
    package = pathlib.Path(__file__).parents[1] / "adaptive_batch"
    code = f"""
import sys, types
sys.modules["jax"] = sys.modules["numpy"] = None  # any import of them fails
pkg = types.ModuleType("adaptive_batch")  # skip the top-level __init__ (it needs JAX)
pkg.__path__ = [{str(package)!r}]
sys.modules["adaptive_batch"] = pkg
from adaptive_batch.control import BatchSizeController
print(BatchSizeController(16, 4096, max_microbatch_size=512).next(3000).num_microbatches)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"


# ---------------------------------------------------------------------------- properties


@st.composite
def controllers(draw):
    lo = draw(st.integers(1, 300))
    hi = lo + draw(st.integers(0, 5000))
    mult = draw(st.sampled_from([1, 2, 3, 8]))
    kind = draw(st.sampled_from(["pow2", None, "list"]))
    if kind == "list":
        inner = draw(st.lists(st.integers(1, hi), max_size=6, unique=True))
        top = hi + draw(st.integers(0, 50))
        buckets = sorted({-(-b // mult) * mult for b in [*inner, top]})
    else:
        buckets = kind
    cap = draw(st.none() | st.integers(1, 64).map(lambda k: k * mult))
    return {
        "min_batch_size": lo,
        "max_batch_size": hi,
        "initial_batch_size": draw(st.integers(lo, hi)),
        "monotone": draw(st.booleans()),
        "buckets": buckets,
        "multiple_of": mult,
        "max_microbatch_size": cap,
        "lag": draw(st.integers(0, 3)),
        "fill_buckets": draw(st.booleans()),
    }


suggestions = st.lists(st.none() | st.integers(0, 20_000), max_size=30)


def _reference_filled(kwargs, size):
    """``size`` grown to its padded shape (capped at max) when the controller fills."""
    if not kwargs["fill_buckets"]:
        return size
    mult, buckets = kwargs["multiple_of"], kwargs["buckets"]
    if buckets is None:
        bucket = -(-size // mult) * mult
    elif buckets == "pow2":
        lo, hi = kwargs["min_batch_size"], kwargs["max_batch_size"]
        ladder = [2**k for k in range(20) if lo <= 2**k < hi] + [hi]
        if lo & (lo - 1) and lo < hi:  # a min that is not a power of two: next one
            ladder = [b for b in ladder if b > lo] or [hi]
        bucket = min(-(-b // mult) * mult for b in ladder if -(-b // mult) * mult >= size)
    else:
        bucket = min(b for b in buckets if b >= size)
    return max(size, min(bucket, kwargs["max_batch_size"]))


def _reference_sizes(kwargs, seq):
    """Batch sizes the rule in the controller's docstring gives, written out directly."""
    size, out = _reference_filled(kwargs, kwargs["initial_batch_size"]), []
    delayed = [None] * kwargs["lag"] + list(seq)
    for s in delayed[: len(seq)]:
        if s is not None:
            s = min(max(s, kwargs["min_batch_size"]), kwargs["max_batch_size"])
            s = _reference_filled(kwargs, s)
            size = max(s, size) if kwargs["monotone"] else s
        out.append(size)
    return out


@settings(max_examples=150, deadline=None)
@given(controllers(), suggestions)
def test_plans_follow_the_rule(kwargs, seq):
    ctrl = BatchSizeController(**kwargs)
    plans = [ctrl.next(s) for s in seq]
    assert [p.batch_size for p in plans] == _reference_sizes(kwargs, seq)
    buckets, mult, cap = ctrl.buckets, kwargs["multiple_of"], kwargs["max_microbatch_size"]
    for p in [
        ctrl.plan_for(kwargs["min_batch_size"]),
        ctrl.plan_for(kwargs["max_batch_size"]),
        *plans,
    ]:
        assert kwargs["min_batch_size"] <= p.batch_size <= kwargs["max_batch_size"]
        assert p.padded_size == p.num_microbatches * p.microbatch_size >= p.batch_size
        assert p.microbatch_size % mult == 0
        if buckets is None:
            bucket = -(-p.batch_size // mult) * mult
        else:
            # The smallest bucket that holds the batch, found by scanning.
            bucket = min(b for b in buckets if b >= p.batch_size)
        if cap is None:
            assert (p.num_microbatches, p.padded_size) == (1, bucket)
        else:
            assert p.microbatch_size <= cap
            assert p.num_microbatches == math.ceil(bucket / cap)  # as few as the cap allows
            assert bucket <= p.padded_size < bucket + p.num_microbatches * mult
    if kwargs["monotone"]:
        sizes = [p.batch_size for p in plans]
        assert sizes == sorted(sizes)
    if buckets is not None:
        assert {p.padded_size for p in plans} <= {q.padded_size for q in ctrl.bucket_plans()}


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 2000),
    st.integers(0, 100_000),
    st.sampled_from([1, 2, 4, 8, 3, 6]),
    st.lists(st.integers(0, 200_000), max_size=20),
)
def test_pow2_ladder_is_short_and_wastes_under_half(lo, extra, mult, seq):
    hi = lo + extra
    ctrl = BatchSizeController(lo, hi, multiple_of=mult, monotone=False, fill_buckets=False)
    n = len(ctrl.buckets)
    assert n <= max(1, math.floor(math.log2(hi)) - math.ceil(math.log2(lo)) + 2)
    assert ctrl.buckets[-1] == -(-hi // mult) * mult
    for p in (ctrl.next(s) for s in seq):
        assert p.padded_size < 2 * p.batch_size + mult


@settings(max_examples=100, deadline=None)
@given(controllers(), suggestions, suggestions)
def test_resume_mid_run_gives_the_same_plans(kwargs, before, after):
    ctrl = BatchSizeController(**kwargs)
    for s in before:
        ctrl.next(s)
    clone = BatchSizeController(**kwargs)
    clone.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert clone.plan == ctrl.plan
    assert [clone.next(s) for s in after] == [ctrl.next(s) for s in after]
    assert clone.state_dict() == ctrl.state_dict()
