"""Built-in data sets: shapes, splits, determinism, the on-disk cache, no network."""

from __future__ import annotations

import random
import socket
import urllib.request

import numpy as np
import pytest

from adaptive_batch.datasets import (
    DATASETS,
    _mnist1d,
    cache_path,
    load_dataset,
    load_digits,
    load_mnist1d,
    make_synthetic,
)

SMALL = 200  # MNIST-1D examples for the fast tests (20 per class)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory for each test (never the user's ~/.cache)."""
    monkeypatch.setenv("ADAPTIVE_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_network(monkeypatch):
    """Every way the mnist1d package (requests) or we could reach the network raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import requests

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


def _reference_mnist1d(num_samples):
    """The arrays straight from the package's own generator, float64."""
    from mnist1d import data

    args = data.get_dataset_args()
    args.num_samples = num_samples
    made = data.make_dataset(args)
    return made["x"], made["y"], made["x_test"], made["y_test"]


def test_mnist1d_published_split(cache, no_network):
    ds = load_mnist1d()
    assert (ds.num_train, ds.num_test) == (4000, 1000)
    assert ds.input_shape == (40,) and ds.num_classes == 10
    assert ds.train["x"].shape == (4000, 40) and ds.test["x"].shape == (1000, 40)
    assert ds.train["x"].dtype == np.float32 and ds.train["y"].dtype == np.int32
    # 400 per class in the whole set; the shuffled split leaves every class in both parts.
    labels = np.concatenate([ds.train["y"], ds.test["y"]])
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
    assert set(np.unique(ds.test["y"])) == set(range(10))


def test_mnist1d_matches_package_generator(cache, no_network):
    ds = load_mnist1d(SMALL)
    x, y, x_test, y_test = _reference_mnist1d(SMALL)
    np.testing.assert_allclose(ds.train["x"], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.train["y"], y)
    np.testing.assert_allclose(ds.test["x"], x_test, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.test["y"], y_test)
    assert (ds.num_train, ds.num_test) == (160, 40)


def test_mnist1d_cache_written_once_and_reused(cache, monkeypatch):
    first = load_mnist1d(SMALL)
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".npz"]  # no temporary file left behind

    def must_not_generate(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(_mnist1d, "_generate", must_not_generate)
    second = load_mnist1d(SMALL)
    np.testing.assert_array_equal(first.train["x"], second.train["x"])
    np.testing.assert_array_equal(first.test["y"], second.test["y"])
    # Another size or seed is another file, never the stale one.
    with pytest.raises(AssertionError, match="regenerated"):
        load_mnist1d(SMALL, seed=7)


def test_mnist1d_cache_key_and_corrupt_file(cache):
    a = load_mnist1d(SMALL)
    path = next(cache.iterdir())
    path.write_bytes(b"truncated")  # a broken file is rebuilt, not trusted
    b = load_mnist1d(SMALL)
    np.testing.assert_array_equal(a.train["x"], b.train["x"])
    with np.load(path) as stored:
        assert stored["x"].shape == (SMALL, 40)
    assert cache_path("mnist1d", {"a": 1}) != cache_path("mnist1d", {"a": 2})


def test_mnist1d_deterministic_and_seeded(cache):
    a = load_mnist1d(SMALL, cache=False)
    b = load_mnist1d(SMALL, cache=False)
    c = load_mnist1d(SMALL, seed=1, cache=False)
    np.testing.assert_array_equal(a.train["x"], b.train["x"])
    assert not np.allclose(a.train["x"], c.train["x"])
    assert not cache.exists()  # cache=False touches no disk


def test_mnist1d_leaves_global_rng_alone(cache):
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(SMALL, cache=False)
    assert (np.random.rand(), random.random()) == expected


@pytest.mark.parametrize("num_samples", [15, 205, 2.5])
def test_mnist1d_bad_size(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        load_mnist1d(num_samples)


def test_digits_split_is_a_permutation_of_sklearn(no_network):
    from sklearn.datasets import load_digits as sk_digits

    ds = load_digits()
    assert (ds.num_train, ds.num_test) == (1438, 359)
    assert ds.input_shape == (64,) and ds.num_classes == 10
    x = np.concatenate([ds.train["x"], ds.test["x"]])
    assert x.min() == 0.0 and x.max() == 1.0
    reference = sk_digits()
    # Every image exactly once across the two parts, with its own label.
    labels = np.concatenate([ds.train["y"], ds.test["y"]]).tolist()
    ours = sorted(zip(map(bytes, (x * 16).astype(np.uint8)), labels, strict=True))
    theirs = sorted(
        zip(map(bytes, reference.data.astype(np.uint8)), reference.target.tolist(), strict=True)
    )
    assert ours == theirs
    again = load_digits()
    np.testing.assert_array_equal(again.train["y"], ds.train["y"])
    assert not np.array_equal(load_digits(seed=1).train["y"], ds.train["y"])


def test_synthetic_shapes_and_seed():
    ds = make_synthetic(num_train=300, num_test=50, dim=6, num_classes=3, seed=2)
    assert ds.train["x"].shape == (300, 6) and ds.test["x"].shape == (50, 6)
    assert set(np.unique(ds.train["y"])) == {0, 1, 2}
    again = make_synthetic(num_train=300, num_test=50, dim=6, num_classes=3, seed=2)
    np.testing.assert_array_equal(ds.train["x"], again.train["x"])
    other = make_synthetic(num_train=300, num_test=50, dim=6, num_classes=3, seed=3)
    assert not np.allclose(ds.train["x"], other.train["x"])


def test_synthetic_is_learnable_but_not_trivial():
    """Nearest class mean (estimated on train) beats chance clearly, and is not perfect."""
    ds = make_synthetic()
    means = np.stack([ds.train["x"][ds.train["y"] == k].mean(0) for k in range(4)])
    distances = ((ds.test["x"][:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = np.mean(distances.argmin(1) == ds.test["y"])
    assert 0.5 < accuracy < 0.97


def test_load_dataset_by_name(cache):
    assert set(DATASETS) == {"mnist1d", "digits", "synthetic"}
    assert load_dataset("synthetic", num_train=10, num_test=5).num_test == 5
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'.*mnist1d, digits, synthetic"):
        load_dataset("mnist")
