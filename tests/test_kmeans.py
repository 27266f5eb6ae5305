"""Deterministic weighted k-means (segment._kmeans): seeds, clusters, weights."""

from __future__ import annotations

import numpy as np
import pytest

from segment import _kmeans


def _clusters(rng, centres, spread, sizes):
    """Separated Gaussian clusters in len(centres[0]) dimensions, and their true labels."""
    X = np.concatenate([rng.normal(c, spread, (n, len(c))) for c, n in zip(centres, sizes)])
    return X, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("n_features", [1, 2])
def test_kmeans_finds_separated_clusters(n_features):
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 10.0], [100.0, -30.0]])[:, :n_features]
    X, truth = _clusters(rng, centres, 1.0, [300, 500, 200])
    found, labels = _kmeans.kmeans(X, np.ones(len(X)), 3, np.random.default_rng(1))
    order = np.argsort(found[:, 0])
    np.testing.assert_allclose(found[order], centres, atol=0.3)
    # the same partition as the truth, up to the names of the clusters
    renamed = np.argsort(order)[labels]
    np.testing.assert_array_equal(renamed, truth)


@pytest.mark.parametrize("n_features", [1, 2])
def test_kmeans_is_deterministic_for_a_seed(n_features):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(2_000, n_features)) * 10 + rng.integers(0, 5, (2_000, 1)) * 7
    weights = rng.uniform(0.5, 2.0, len(X))
    runs = [_kmeans.kmeans(X, weights, 4, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    seeds = [_kmeans.kmeans_plusplus(X, weights, 4, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(seeds[0], seeds[1])


def test_kmeans_plusplus_picks_one_seed_per_separated_cluster():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0], [1000.0], [2000.0], [3000.0]])
    X, _ = _clusters(rng, centres, 1.0, [100, 100, 100, 100])
    for seed in range(5):
        seeds = _kmeans.kmeans_plusplus(X, np.ones(len(X)), 4, np.random.default_rng(seed))
        assert sorted(np.round(seeds[:, 0] / 1000).astype(int)) == [0, 1, 2, 3]
        assert all(np.any(np.all(X == s, axis=1)) for s in seeds)  # seeds are data rows


def test_weights_are_counts():
    """Distinct values with counts give the clusters of the repeated values."""
    rng = np.random.default_rng(4)
    values = np.arange(0, 200, dtype=np.float64)[:, None]
    counts = rng.integers(1, 6, len(values)).astype(np.float64)
    counts[90:110] = 0  # a gap: two clusters
    repeated = np.repeat(values, counts.astype(int), axis=0)
    weighted, labels = _kmeans.kmeans(values, counts, 2, np.random.default_rng(0))
    plain, _ = _kmeans.kmeans(repeated, np.ones(len(repeated)), 2, np.random.default_rng(0))
    np.testing.assert_allclose(np.sort(weighted[:, 0]), np.sort(plain[:, 0]), rtol=1e-12)
    w, means, covariances = _kmeans.parameters_from_clusters(values, counts, labels, 2)
    rows = labels[np.repeat(np.arange(len(values)), counts.astype(int))]
    for k in range(2):
        members = repeated[rows == k, 0]
        assert w[k] == pytest.approx(len(members) / len(repeated), rel=1e-12)
        assert means[k, 0] == pytest.approx(members.mean(), rel=1e-12)
        assert covariances[k, 0, 0] == pytest.approx(members.var(), rel=1e-10)


def test_parameters_from_clusters_multichannel_match_numpy():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(500, 3))
    labels = rng.integers(0, 3, len(X))
    weights, means, covariances = _kmeans.parameters_from_clusters(X, np.ones(len(X)), labels, 4)
    assert weights[3] == 0 and np.all(means[3] == 0) and np.all(covariances[3] == 0)
    for k in range(3):
        members = X[labels == k]
        assert weights[k] == pytest.approx(len(members) / len(X))
        np.testing.assert_allclose(means[k], members.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(covariances[k], np.cov(members.T, bias=True), atol=1e-12)


def test_stratified_indices_one_per_stratum():
    rng = np.random.default_rng(8)
    indices = _kmeans.stratified_indices(1_003, 10, rng)
    bounds = np.arange(11) * 1_003 // 10
    assert len(indices) == 10 and np.all(np.diff(indices) > 0)
    assert np.all((indices >= bounds[:-1]) & (indices < bounds[1:]))
    np.testing.assert_array_equal(
        indices, _kmeans.stratified_indices(1_003, 10, np.random.default_rng(8))
    )
    with pytest.raises(ValueError, match="n_sample"):
        _kmeans.stratified_indices(5, 6, rng)


def test_count_distinct_stops_at_the_limit():
    X = np.array([[1.0], [2.0], [1.0], [3.0], [2.0]])
    assert _kmeans.count_distinct(X, 10) == 3
    assert _kmeans.count_distinct(X, 2) == 2
    big = np.tile(np.arange(2000.0)[:, None], (2, 1))
    assert _kmeans.count_distinct(big, 5) == 5
