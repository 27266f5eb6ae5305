"""The Dask layer (segment._chunked): every reduction equals its in-memory result, whatever the
chunks (including chunkings that do not divide N) and the scheduler."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from segment import _chunked, _em

CHUNKINGS = [10_000, 1_237, 97]  # one chunk, uneven chunks, many chunks


@pytest.fixture
def X():
    rng = np.random.default_rng(11)
    n = 5_003
    return np.concatenate(
        [rng.normal(100.0, 10.0, (n // 2, 2)), rng.normal(400.0, 30.0, (n - n // 2, 2))]
    )


@pytest.fixture
def params():
    covariances = np.array([[[100.0, 5.0], [5.0, 80.0]], [[900.0, -40.0], [-40.0, 700.0]]])
    return (
        np.array([0.4, 0.6]),
        np.array([[95.0, 102.0], [390.0, 405.0]]),
        (_em.precision_cholesky(covariances)),
    )


def test_as_feature_array_cuts_views_in_order(X):
    """Chunks along voxels only, in order, sharing memory with the numpy input."""
    array = _chunked.as_feature_array(X, 1_237)
    assert array.chunks[0] == (1_237,) * 4 + (5_003 - 4 * 1_237,)
    assert array.chunks[1] == (2,)
    np.testing.assert_array_equal(array.compute(scheduler="synchronous"), X)
    rechunked = _chunked.as_feature_array(da.from_array(X, chunks=(500, 2)), 1_237)
    assert rechunked.chunks == array.chunks


@pytest.mark.parametrize("chunk_size", CHUNKINGS)
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_statistics_do_not_depend_on_the_chunks(X, params, chunk_size, scheduler):
    """The summed sufficient statistics equal the dense reference to 1e-12 relative."""
    want = _em.reference_statistics(X, *params)
    got = _chunked.statistics(
        _chunked.as_feature_array(X, chunk_size), params, None, {"scheduler": scheduler}
    )
    for key in ("nk", "sum_centered", "scatter"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-9)
    assert got["log_likelihood"] == pytest.approx(want["log_likelihood"], rel=1e-12)
    assert got["n_samples"] == len(X)
    assert got["nk"].sum() == pytest.approx(len(X), rel=1e-12)


@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_weighted_statistics_equal_repeated_rows(X, params, chunk_size):
    """A row of weight w counts as w copies of it: the weighted pass equals the repeated one."""
    counts = np.random.default_rng(3).integers(0, 4, len(X))
    repeated = np.repeat(X, counts, axis=0)
    weights = da.from_array(counts.astype(np.float64), chunks=(chunk_size,))
    got = _chunked.statistics(_chunked.as_feature_array(X, chunk_size), params, weights)
    want = _em.reference_statistics(repeated, *params)
    np.testing.assert_allclose(got["nk"], want["nk"], rtol=1e-11)
    np.testing.assert_allclose(got["scatter"], want["scatter"], rtol=1e-11)
    assert got["n_samples"] == counts.sum()


@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_moments_match_numpy(X, chunk_size):
    moments = _chunked.moments(_chunked.as_feature_array(X, chunk_size))
    assert moments["n"] == len(X) and moments["n_nonfinite"] == 0
    np.testing.assert_allclose(moments["mean"], X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments["m2"] / len(X), X.var(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(moments["minimum"], X.min(axis=0))
    np.testing.assert_array_equal(moments["maximum"], X.max(axis=0))


@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_histogram_matches_numpy_and_counts_every_voxel(X, chunk_size):
    x = X[:, :1].astype(np.float32)
    low, high = float(x.min()), float(x.max())
    counts = _chunked.histogram(_chunked.as_feature_array(x, chunk_size), low, high, 64)
    want, _ = np.histogram(x[:, 0].astype(np.float64), bins=64, range=(low, high))
    assert counts.sum() == len(x)
    # a value on a bin edge may fall either side in float32; nowhere else
    assert np.abs(counts - want).sum() <= 2


@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_distinct_rows_and_counts(chunk_size):
    rng = np.random.default_rng(5)
    X = rng.integers(0, 50, (4_001, 1)).astype(np.int16)
    values, counts = _chunked.distinct_rows(_chunked.as_feature_array(X, chunk_size), 1000)
    want_values, want_counts = np.unique(X[:, 0], return_counts=True)
    np.testing.assert_array_equal(values[:, 0], want_values)
    np.testing.assert_array_equal(counts, want_counts)
    assert _chunked.distinct_rows(_chunked.as_feature_array(X, chunk_size), 10) is None


def test_take_rows_and_map_rows(X, params):
    array = _chunked.as_feature_array(X, 1_237)
    indices = np.array([0, 1, 1_236, 1_237, 5_002])
    np.testing.assert_array_equal(_chunked.take_rows(array, indices), X[indices])
    proba = _chunked.map_rows(array, _em.responsibilities, 2, np.float64, params).compute()
    np.testing.assert_allclose(proba, _em.responsibilities(X, *params), rtol=1e-14)


@pytest.mark.parametrize("chunk_size", [10_000, 333, 50])
def test_grid_reduction_sees_each_block_once_with_its_offset(chunk_size):
    """map_reduce_grid hands every block with its offset: sums of index-weighted values agree."""
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(13, 11, 7))
    chunks = _chunked.grid_chunks(grid.shape, chunk_size)
    array = _chunked.as_grid_array(grid, chunks)

    def block(values, offset):
        index = np.indices(values.shape) + np.array(offset)[:, None, None, None]
        return np.array([values.sum(), (values * index[0]).sum(), values.size])

    total = _chunked.map_reduce_grid(
        block, lambda parts: np.sum(parts, axis=0), [array], 3, (), {}, with_offset=True
    )
    index = np.indices(grid.shape)[0]
    np.testing.assert_allclose(total, [grid.sum(), (grid * index).sum(), grid.size], rtol=1e-12)
    # the in-memory loop over the same blocks gives the same parts in the same order
    blocks = _chunked.grid_blocks([grid], chunks)
    assert len(blocks) == array.numblocks[0]
    looped = _chunked.reduce_grid_blocks(
        block, lambda parts: np.sum(parts, axis=0), blocks, with_offset=True
    )
    np.testing.assert_array_equal(looped, total)
