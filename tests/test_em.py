"""Tests of the pure EM maths in ``segment._em`` and the k-means initialisation in ``_kmeans``.

The engine works on component-major (K, N) arrays and centred sufficient statistics; every
result here is checked against an independent estimator: scipy's densities, numpy's variance,
the dense textbook EM of ``tests/reference_em.py``, or numbers worked out by hand.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference_em as ref
from scipy.stats import multivariate_normal

from segment import ConvergenceWarning, GaussianMixtureEM, _em, _kernels, _kmeans

#: The compiled module, or None when it was not built (then the numpy twins run everywhere).
_estep = _kernels.compiled
needs_compiled = pytest.mark.skipif(
    _estep is None, reason=f"compiled kernels off: {_kernels.why_not_compiled}"
)


def _random_spd(rng, n_components, n_features, scale=1.0):
    """(K, D, D) well-conditioned symmetric positive-definite matrices."""
    A = rng.normal(size=(n_components, n_features, n_features))
    return scale * (A @ np.swapaxes(A, 1, 2) + n_features * np.eye(n_features))


def _mixture_sample(rng, means, sds, counts):
    """Concatenated 1-D Gaussian samples as an (N, 1) array, shuffled."""
    X = np.concatenate([rng.normal(m, s, n) for m, s, n in zip(means, sds, counts)])
    return rng.permutation(X)[:, None]


def _stats_of_pieces(X, params, bounds, sample_weight=None):
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        w = None if sample_weight is None else sample_weight[lo:hi]
        parts.append(_em.chunk_statistics(X[lo:hi], *params, sample_weight=w))
    return _em.combine_statistics(parts)


def _assert_stats_equal(a, b, rtol):
    for key in ("nk", "sum_centered", "scatter"):
        scale = np.abs(b[key]).max()
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol * scale, err_msg=key)
    for key in ("log_likelihood", "n_samples"):
        assert a[key] == pytest.approx(b[key], rel=rtol), key


# ----------------------------------------------------------------------------- log densities
@pytest.mark.parametrize("n_features", [1, 3])
def test_log_gaussian_prob_matches_scipy(rng, n_features):
    K, N = 4, 257
    means = rng.normal(0, 5, size=(K, n_features))
    covariances = _random_spd(rng, K, n_features, scale=2.0)
    X = rng.normal(0, 6, size=(N, n_features))

    log_prob = _em.estimate_log_gaussian_prob(X, means, _em.precision_cholesky(covariances))

    assert log_prob.shape == (K, N)  # component-major
    for k in range(K):
        expected = multivariate_normal(means[k], covariances[k]).logpdf(X)
        np.testing.assert_allclose(log_prob[k], expected, rtol=1e-12, atol=1e-12)


def test_normalize_log_prob_far_away_voxels_are_finite_and_sum_to_one():
    X = np.array([[0.0], [1e6], [-1e6], [3.0]])
    means = np.array([[0.0], [5.0]])
    precisions_chol = _em.precision_cholesky(np.array([[[1.0]], [[4.0]]]))
    weighted = _em.estimate_log_gaussian_prob(X, means, precisions_chol)
    weighted += np.log([0.3, 0.7])[:, None]
    expected_log_norm = np.logaddexp(weighted[0], weighted[1])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resp, log_norm = _em.normalize_log_prob(weighted.copy())

    assert np.all(np.isfinite(resp)) and np.all(np.isfinite(log_norm))
    np.testing.assert_allclose(resp.sum(axis=0), 1.0, rtol=1e-14)
    np.testing.assert_allclose(log_norm, expected_log_norm, rtol=1e-14)
    # far to the right the wider component takes the voxel, far to the left too
    assert resp[1, 1] == pytest.approx(1.0) and resp[1, 2] == pytest.approx(1.0)
    assert log_norm[1] < -1e10


def test_e_step_matches_reference(rng):
    K, D, N = 3, 2, 300
    weights = np.array([0.2, 0.5, 0.3])
    means = rng.normal(0, 3, size=(K, D))
    covariances = _random_spd(rng, K, D)
    X = rng.normal(0, 4, size=(N, D))

    resp, log_norm = _em.e_step(X, weights, means, _em.precision_cholesky(covariances))
    ref_resp, ref_log_norm = ref.e_step(X, weights, means, covariances)

    np.testing.assert_allclose(resp.T, ref_resp, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(log_norm, ref_log_norm, rtol=1e-12)


# ----------------------------------------------------------------------------- statistics + M-step
def test_one_iteration_matches_reference_1d_large_intensities(rng):
    """Intensities ~3000 with sd ~20: the centred statistics must not lose digits."""
    X = _mixture_sample(rng, [2950.0, 3000.0, 3080.0], [20.0, 15.0, 25.0], [4000, 5000, 3500])
    weights = np.array([0.3, 0.4, 0.3])
    means = np.array([[2940.0], [3010.0], [3070.0]])
    covariances = np.array([[[300.0]], [[200.0]], [[700.0]]])
    floor = np.array([1e-6])
    params = (weights, means, _em.precision_cholesky(covariances))

    stats = _stats_of_pieces(X, params, [0, 997, 5000, 9001, len(X)])
    new_weights, new_means, new_covariances = _em.m_step(stats, means, floor)
    ref_weights, ref_means, ref_covariances = ref.one_iteration(
        X, weights, means, covariances, floor
    )

    np.testing.assert_allclose(new_weights, ref_weights, rtol=1e-10)
    np.testing.assert_allclose(new_means, ref_means, rtol=1e-10)
    np.testing.assert_allclose(new_covariances, ref_covariances, rtol=1e-10)
    assert stats["log_likelihood"] == pytest.approx(
        ref.log_likelihood(X, weights, means, covariances), rel=1e-12
    )
    assert stats["n_samples"] == len(X)
    # the M-step really moved the parameters (the test is not comparing the input twice)
    assert np.abs(new_means - means).max() > 1.0


def test_one_iteration_matches_reference_2d_full_covariance(rng):
    K, D, N = 3, 2, 9000
    true_means = np.array([[1000.0, 400.0], [1100.0, 700.0], [1300.0, 500.0]])
    true_covs = np.array(
        [
            [[400.0, 150.0], [150.0, 300.0]],
            [[900.0, -200.0], [-200.0, 500.0]],
            [[250.0, 0.0], [0, 600.0]],
        ]
    )
    labels = rng.integers(0, K, N)
    X = np.empty((N, D))
    for k in range(K):
        members = labels == k
        X[members] = rng.multivariate_normal(true_means[k], true_covs[k], members.sum())
    weights = np.array([0.25, 0.35, 0.4])
    means = true_means + np.array([[20.0, -10.0], [-15.0, 30.0], [10.0, 10.0]])
    covariances = 1.5 * true_covs
    floor = np.array([1e-6, 1e-6])
    params = (weights, means, _em.precision_cholesky(covariances))

    stats = _stats_of_pieces(X, params, [0, 1, 4099, N])
    new = _em.m_step(stats, means, floor)
    expected = ref.one_iteration(X, weights, means, covariances, floor)

    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert new[2].shape == (K, D, D)
    assert np.abs(new[2][:, 0, 1]).min() > 1.0  # real off-diagonal terms were estimated


def test_statistics_of_uneven_pieces_equal_the_whole(rng):
    X = rng.normal(500, 80, size=(20_000, 2))
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[450.0, 500.0], [550.0, 480.0], [500.0, 600.0]])
    params = (weights, means, _em.precision_cholesky(_random_spd(rng, 3, 2, scale=2000.0)))

    whole = _em.chunk_statistics(X, *params)
    # pieces smaller than, equal to and crossing the inner BLOCK of the engine
    pieces = _stats_of_pieces(X, params, [0, 1, 8, 8192, 8193, 17_001, 20_000])

    _assert_stats_equal(pieces, whole, rtol=1e-12)
    assert whole["n_samples"] == 20_000


def test_sample_weight_counts_equal_repeated_rows(rng):
    X = rng.normal(0, 3, size=(500, 1))
    counts = rng.integers(0, 5, size=500)  # includes zeros
    weights = np.array([0.6, 0.4])
    means = np.array([[-1.0], [2.0]])
    params = (weights, means, _em.precision_cholesky(np.array([[[2.0]], [[3.0]]])))

    weighted = _em.chunk_statistics(X, *params, sample_weight=counts.astype(float))
    repeated = _em.chunk_statistics(np.repeat(X, counts, axis=0), *params)

    _assert_stats_equal(weighted, repeated, rtol=1e-12)
    assert weighted["n_samples"] == counts.sum()


def test_m_step_with_sample_weight_matches_reference(rng):
    X = rng.normal(0, 3, size=(400, 2))
    sample_weight = rng.uniform(0, 3, size=400)
    weights = np.array([0.5, 0.5])
    means = np.array([[-1.0, 0.0], [2.0, 1.0]])
    covariances = _random_spd(rng, 2, 2)
    floor = np.array([1e-8, 1e-8])
    stats = _em.chunk_statistics(
        X, weights, means, _em.precision_cholesky(covariances), sample_weight
    )

    got = _em.m_step(stats, means, floor)
    want = ref.one_iteration(X, weights, means, covariances, floor, sample_weight)

    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def _general_statistics(X, params, sample_weight=None):
    """The statistics by the general path: ``e_step`` then ``moments`` on the whole array."""
    X = np.asarray(X, dtype=np.float64)
    resp, log_norm = _em.e_step(X, *params)
    if sample_weight is None:
        return _em.moments(X, resp, params[1], log_norm.sum(), len(X))
    resp *= sample_weight
    return _em.moments(X, resp, params[1], log_norm @ sample_weight, sample_weight.sum())


#: The one-channel statistics: the compiled kernel that chunk_statistics uses, and the numpy
#: function that stays its reference.
ONE_CHANNEL = {
    "compiled": lambda X, *params, sample_weight=None: _em.chunk_statistics(
        X, *params, sample_weight=sample_weight
    ),
    "numpy": lambda X, *params, sample_weight=None: _em.reference_statistics(
        X, *params, sample_weight
    ),
}


@pytest.fixture(params=sorted(ONE_CHANNEL))
def one_channel(request):
    return ONE_CHANNEL[request.param]


@pytest.mark.parametrize("n_voxels", [0, 1, 7, _em.BLOCK, _em.BLOCK + 1, 3 * _em.BLOCK - 5])
def test_one_channel_kernel_matches_general_e_step_and_moments(rng, n_voxels, one_channel):
    """Both one-channel kernels give the statistics of e_step + _moments, blocks or not."""
    X = _mixture_sample(rng, [2950.0, 3000.0, 3080.0], [20.0, 15.0, 25.0], [n_voxels, 0, 0])
    X[: n_voxels // 3] += 100.0 * rng.normal(size=(n_voxels // 3, 1))  # spread the voxels out
    weights = np.array([0.3, 0.4, 0.3])
    means = np.array([[2940.0], [3010.0], [3070.0]])
    params = (weights, means, _em.precision_cholesky(np.array([[[300.0]], [[200.0]], [[700.0]]])))

    fused = one_channel(X, *params)

    _assert_stats_equal(fused, _general_statistics(X, params), rtol=1e-12)
    assert fused["nk"].shape == (3,) and fused["sum_centered"].shape == (3, 1)
    assert fused["scatter"].shape == (3, 1, 1) and fused["n_samples"] == n_voxels


def test_one_channel_kernel_float32_and_sample_weight(rng, one_channel):
    """float32 voxels are read exactly (as float64) and weights multiply each voxel's share."""
    X32 = _mixture_sample(rng, [10.0, 60.0, 150.0], [3.0, 8.0, 12.0], [9000, 6000, 5000])
    X32 = X32.astype(np.float32)
    sample_weight = rng.uniform(0, 3, size=len(X32))
    params = (
        np.array([0.5, 0.2, 0.3]),
        np.array([[12.0], [55.0], [140.0]]),
        _em.precision_cholesky(np.array([[[16.0]], [[90.0]], [[100.0]]])),
    )

    fused = one_channel(X32, *params, sample_weight=sample_weight)
    general = _general_statistics(X32.astype(np.float64), params, sample_weight)

    _assert_stats_equal(fused, general, rtol=1e-12)


def test_one_channel_kernel_far_away_voxels_stay_finite(one_channel):
    X = np.array([[0.0], [1e6], [-40.0], [3.0]])
    params = (
        np.array([0.3, 0.7]),
        np.array([[0.0], [5.0]]),
        _em.precision_cholesky(np.array([[[1.0]], [[4.0]]])),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = one_channel(X, *params)
    general = _general_statistics(X, params)
    _assert_stats_equal(stats, general, rtol=1e-12)
    assert stats["nk"].sum() == pytest.approx(4.0, rel=1e-14)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_channel_kernel_with_far_away_voxels(rng, weighted, one_channel):
    """Voxels whose density underflows for every component, in one block and the short last
    one: the statistics are still those of the general E-step (log-sum-exp)."""
    n_voxels = 3 * _em.BLOCK + 11
    X = _mixture_sample(rng, [10.0, 50.0], [2.0, 5.0], [n_voxels // 2, n_voxels - n_voxels // 2])
    X[_em.BLOCK + 5] = 1e4  # exp underflows for every component in the second block only
    X[-1] = -3e3  # and in the short last block
    sample_weight = rng.uniform(0, 2, size=n_voxels) if weighted else None
    params = (
        np.array([0.4, 0.6]),
        np.array([[11.0], [48.0]]),
        _em.precision_cholesky(np.array([[[5.0]], [[30.0]]])),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = one_channel(X, *params, sample_weight=sample_weight)
    _assert_stats_equal(stats, _general_statistics(X, params, sample_weight), rtol=1e-12)


def test_one_channel_kernel_far_away_value_with_a_large_count(one_channel):
    """Distinct values with counts: a far value weighing 1e12 voxels raises no warning."""
    X = np.array([[0.0], [1.0], [5000.0], [3.0]])
    sample_weight = np.array([1e6, 3e9, 1e12, 5.0])
    params = (
        np.array([0.3, 0.7]),
        np.array([[0.0], [2.0]]),
        _em.precision_cholesky(np.array([[[1.0]], [[1.0]]])),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = one_channel(X, *params, sample_weight=sample_weight)
    _assert_stats_equal(stats, _general_statistics(X, params, sample_weight), rtol=1e-12)


def test_one_channel_kernel_very_narrow_component(one_channel):
    """A component so narrow that its peak density would overflow exp takes the shifted path."""
    X = np.array([[0.0], [1e-265], [-2e-265], [5e-265]])
    params = (
        np.array([0.5, 0.5]),
        np.array([[0.0], [0.0]]),
        np.array([[[1e265]], [[1.0]]]),  # precisions_chol = 1 / sigma: a_1 > 600
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = one_channel(X, *params)
    assert np.isfinite(stats["log_likelihood"]) and stats["log_likelihood"] > 600
    _assert_stats_equal(stats, _general_statistics(X, params), rtol=1e-12)


def _one_channel_params(rng, n_components, spread=60.0):
    weights = rng.dirichlet(np.ones(n_components))
    means = np.sort(rng.uniform(-spread, spread, n_components))[:, None] + 1000.0
    variances = rng.uniform(4.0, 200.0, n_components)[:, None, None]
    return weights, means, _em.precision_cholesky(variances)


@needs_compiled
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16, np.int64])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_kernel_matches_numpy_reference_and_e_step(rng, dtype, weighted):
    """Random data with far outliers, any dtype, weights, pieces that do not divide N."""
    n_voxels, n_components = 3 * _estep.BLOCK + 77, 5
    X = rng.normal(1000.0, 80.0, size=(n_voxels, 1))
    X[rng.choice(n_voxels, 9, replace=False), 0] = [-3e4, 1e5, 2e4, 5e4, -1e4, 0, 3e3, 9e4, 1]
    X = X.astype(dtype)
    sample_weight = rng.uniform(0, 4, size=n_voxels) if weighted else None
    params = _one_channel_params(rng, n_components)

    compiled = _em.chunk_statistics(X, *params, sample_weight=sample_weight)
    numpy_ref = _em.reference_statistics(X, *params, sample_weight)
    general = _general_statistics(X.astype(np.float64), params, sample_weight)
    pieces = _stats_of_pieces(X, params, [0, 1, 255, 256, 700, n_voxels], sample_weight)

    _assert_stats_equal(compiled, numpy_ref, rtol=1e-12)
    _assert_stats_equal(compiled, general, rtol=1e-12)
    _assert_stats_equal(pieces, compiled, rtol=1e-12)
    assert compiled["n_samples"] == pytest.approx(
        n_voxels if sample_weight is None else sample_weight.sum(), rel=1e-14
    )
    assert np.isfinite(compiled["log_likelihood"]) and compiled["nk"].sum() == pytest.approx(
        compiled["n_samples"], rel=1e-12
    )


@needs_compiled
@pytest.mark.parametrize("n_features", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_multichannel_kernel_matches_numpy_reference(rng, n_features, dtype, weighted):
    """D channels: full covariances, far outliers, weights, pieces that do not divide N."""
    n_voxels, n_components = 2 * _estep.BLOCK + 45, 4
    X = rng.normal(800.0, 60.0, size=(n_voxels, n_features))
    X[rng.choice(n_voxels, 5, replace=False)] = rng.choice([-3e4, 2e4, 9e4], (5, n_features))
    X = X.astype(dtype)
    sample_weight = rng.uniform(0, 4, size=n_voxels) if weighted else None
    weights = rng.dirichlet(np.ones(n_components))
    means = rng.normal(800.0, 50.0, size=(n_components, n_features))
    covariances = _random_spd(rng, n_components, n_features, scale=500.0)
    params = (weights, means, _em.precision_cholesky(covariances))

    compiled = _em.chunk_statistics(X, *params, sample_weight=sample_weight)
    numpy_ref = _em.reference_statistics(X, *params, sample_weight=sample_weight)
    pieces = _stats_of_pieces(X, params, [0, 1, 256, 300, n_voxels], sample_weight)

    _assert_stats_equal(compiled, numpy_ref, rtol=1e-12)
    _assert_stats_equal(pieces, compiled, rtol=1e-12)
    np.testing.assert_array_equal(compiled["scatter"], np.swapaxes(compiled["scatter"], 1, 2))
    assert compiled["scatter"].shape == (n_components, n_features, n_features)


@pytest.mark.parametrize("n_components", [1, 2, 40, 300])
def test_compiled_kernel_with_many_components(rng, n_components):
    """The log-likelihood takes one log per product of totals: no overflow for large K."""
    X = rng.normal(1000.0, 90.0, size=(1000, 1))
    params = _one_channel_params(rng, n_components, spread=200.0)
    _assert_stats_equal(
        _em.chunk_statistics(X, *params), _general_statistics(X, params), rtol=1e-12
    )


@pytest.mark.parametrize("n_features", [1, 2])
def test_compiled_kernel_is_deterministic_and_runs_in_parallel_threads(rng, n_features):
    """The kernels release the GIL: threads give the same bits as one call after another."""
    from concurrent.futures import ThreadPoolExecutor

    X = rng.normal(1000.0, 80.0, size=(50_000, n_features)).astype(np.float32)
    means = rng.normal(1000.0, 60.0, size=(6, n_features))
    covariances = _random_spd(rng, 6, n_features, scale=900.0)
    params = (np.full(6, 1 / 6), means, _em.precision_cholesky(covariances))
    chunks = [X[i : i + 6007] for i in range(0, len(X), 6007)]
    serial = [_em.chunk_statistics(c, *params) for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda c: _em.chunk_statistics(c, *params), chunks))
    for a, b in zip(serial, threaded):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("n_features", [1, 2])
def test_compiled_kernel_propagates_non_finite_voxels(bad, n_features):
    """Like the numpy reference, a non-finite voxel gives NaN sums, not a silent zero."""
    X = np.repeat([[0.0], [1.0], [bad], [3.0]], n_features, axis=1)
    params = (
        np.array([0.5, 0.5]),
        np.repeat([[0.0], [2.0]], n_features, axis=1),
        np.stack([np.eye(n_features)] * 2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = _em.chunk_statistics(X, *params)
    assert np.isnan(stats["log_likelihood"]) and np.isnan(stats["nk"]).all()


@needs_compiled
def test_exp_nonpositive_matches_numpy_exp(rng):
    """The vectorised float64 exponential: about one float64 step from np.exp."""

    def exp_all(t):
        out = np.empty_like(t)
        _estep.exp_nonpositive(t, out)
        return out

    t = np.concatenate([
        -rng.uniform(0, 1e-6, 1000), -rng.uniform(0, 1, 1000), -rng.uniform(0, 708, 10_000),
        [0.0, -0.0, -1e-300, -np.log(2) / 2, -np.log(2), -707.9, -708.0],
    ])  # fmt: skip
    got = exp_all(t)
    np.testing.assert_allclose(got, np.exp(t), rtol=1e-15, atol=0)
    # below MIN_EXPONENT the argument is raised to it: negligible next to exp(0) = 1
    np.testing.assert_allclose(
        exp_all(np.array([-800.0, -np.inf])), np.exp(_estep.MIN_EXPONENT), rtol=1e-15
    )


# ----------------------------------------------------------------------------- covariances
def test_floor_covariances_1d_is_maximum():
    covariances = np.array([[[0.5]], [[2.0]], [[1.0]]])
    floored = _em.floor_covariances(covariances, np.array([1.0]))
    np.testing.assert_array_equal(floored.ravel(), [1.0, 2.0, 1.0])


def test_floor_covariances_2d_whitened_eigenvalues(rng):
    floor = np.array([4.0, 100.0])
    scale = np.sqrt(floor)
    # a near-singular covariance (thin along a diagonal) and a comfortably wide one
    thin = np.array([[5.0, 20.0], [20.0, 81.0]])
    wide = np.array([[50.0, 30.0], [30.0, 900.0]])
    floored = _em.floor_covariances(np.stack([thin, wide]), floor)

    whitened = floored / np.multiply.outer(scale, scale)
    assert np.linalg.eigvalsh(whitened[0]).min() >= 1.0 - 1e-12
    assert np.linalg.eigvalsh(thin / np.multiply.outer(scale, scale)).min() < 1.0
    np.testing.assert_allclose(floored[0], floored[0].T)
    np.testing.assert_allclose(floored[1], wide, rtol=1e-12)  # unchanged when already above
    np.testing.assert_allclose(floored[0], ref.floor_covariances(thin[None], floor)[0], rtol=1e-12)
    # the floor only adds variance: floored - original is positive semi-definite
    assert np.linalg.eigvalsh(floored[0] - thin).min() >= -1e-12


@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_precision_cholesky_round_trip(rng, n_features):
    covariances = _random_spd(rng, 3, n_features, scale=50.0)
    precisions_chol = _em.precision_cholesky(covariances)

    for U, cov in zip(precisions_chol, covariances):
        np.testing.assert_array_equal(np.tril(U, -1), 0.0)  # upper triangular
        np.testing.assert_allclose(U @ U.T, np.linalg.inv(cov), rtol=1e-10, atol=1e-14)
    back = _em.covariances_from_precision_cholesky(precisions_chol)
    np.testing.assert_allclose(back, covariances, rtol=1e-10)


def test_precision_cholesky_refuses_non_positive_definite():
    with pytest.raises(np.linalg.LinAlgError):
        _em.precision_cholesky(np.array([[[1.0, 2.0], [2.0, 1.0]]]))


# ----------------------------------------------------------------------------- data moments
def test_chunk_moments_on_uneven_splits_match_numpy(rng):
    X = rng.normal([3000.0, -5.0], [20.0, 0.1], size=(1001, 2))
    bounds = [0, 1, 2, 500, 999, 1001]
    parts = [_em.chunk_moments(X[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    total = _em.combine_moments(parts)

    assert total["n"] == 1001
    np.testing.assert_allclose(total["mean"], X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(total["m2"] / total["n"], X.var(axis=0), rtol=1e-10)
    np.testing.assert_array_equal(total["minimum"], X.min(axis=0))
    np.testing.assert_array_equal(total["maximum"], X.max(axis=0))
    assert total["n_nonfinite"] == 0


def test_chunk_moments_weighted_matches_numpy(rng):
    X = rng.normal(100.0, 3.0, size=(300, 1))
    w = rng.uniform(0, 2, size=300)
    parts = [_em.chunk_moments(X[:120], w[:120]), _em.chunk_moments(X[120:], w[120:])]
    total = _em.combine_moments(parts)
    mean = np.average(X[:, 0], weights=w)
    assert total["n"] == pytest.approx(w.sum(), rel=1e-14)
    assert total["mean"][0] == pytest.approx(mean, rel=1e-13)
    assert total["m2"][0] == pytest.approx(w @ (X[:, 0] - mean) ** 2, rel=1e-10)


def test_chunk_moments_count_nonfinite_and_skip_them(rng):
    X = rng.normal(0, 1, size=(50, 2))
    X[3, 0] = np.nan
    X[10, 1] = np.inf
    X[40] = -np.inf
    parts = [_em.chunk_moments(X[:7]), _em.chunk_moments(X[7:41]), _em.chunk_moments(X[41:])]
    total = _em.combine_moments(parts)

    finite = X[np.isfinite(X).all(axis=1)]
    assert total["n_nonfinite"] == 3
    assert total["n"] == len(finite) == 47
    np.testing.assert_allclose(total["mean"], finite.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(total["m2"] / total["n"], finite.var(axis=0), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_chunk_moments_of_narrow_dtypes_match_float64(rng, dtype):
    X = rng.normal(120.0, 30.0, size=(5000, 1)).clip(0, 250).astype(dtype)
    parts = [_em.chunk_moments(X[:1234]), _em.chunk_moments(X[1234:])]
    total = _em.combine_moments(parts)
    exact = X.astype(np.float64)
    np.testing.assert_allclose(total["mean"], exact.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(total["m2"] / total["n"], exact.var(axis=0), rtol=1e-10)
    assert total["minimum"].dtype == total["maximum"].dtype == np.float64
    np.testing.assert_array_equal(total["minimum"], exact.min(axis=0))
    np.testing.assert_array_equal(total["maximum"], exact.max(axis=0))


def test_chunk_moments_of_an_all_nonfinite_chunk():
    moments = _em.chunk_moments(np.array([[np.nan], [np.inf]], dtype=np.float32))
    assert moments["n"] == 0 and moments["n_nonfinite"] == 2


def test_combine_moments_with_an_all_nan_chunk(rng):
    X = rng.normal(0, 1, size=(20, 1))
    X[5:9] = np.nan
    parts = [_em.chunk_moments(X[:5]), _em.chunk_moments(X[5:9]), _em.chunk_moments(X[9:])]
    assert parts[1]["n"] == 0
    total = _em.combine_moments(parts)
    finite = X[np.isfinite(X[:, 0])]
    assert total["n_nonfinite"] == 4
    assert total["mean"][0] == pytest.approx(finite.mean(), rel=1e-12)
    assert total["m2"][0] / total["n"] == pytest.approx(finite.var(), rel=1e-10)


# ----------------------------------------------------------------------------- k-means
def _three_blobs(rng):
    centers = np.array([[0.0, 0.0], [50.0, 10.0], [20.0, 80.0]])
    X = np.concatenate([rng.normal(c, 2.0, size=(n, 2)) for c, n in zip(centers, [300, 200, 100])])
    return X, centers


def test_kmeans_deterministic_for_a_seed(rng):
    X, _ = _three_blobs(rng)
    w = np.ones(len(X))
    centers1, labels1 = _kmeans.kmeans(X, w, 3, np.random.default_rng(7))
    centers2, labels2 = _kmeans.kmeans(X, w, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(centers1, centers2)
    np.testing.assert_array_equal(labels1, labels2)


def test_kmeans_recovers_separated_clusters(rng):
    X, centers = _three_blobs(rng)
    truth = np.repeat([0, 1, 2], [300, 200, 100])
    found, labels = _kmeans.kmeans(X, np.ones(len(X)), 3, np.random.default_rng(0))

    order = [int(np.argmin(((found - c) ** 2).sum(axis=1))) for c in centers]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(found[order], centers, atol=0.6)
    np.testing.assert_array_equal(np.asarray(order)[truth], labels)


def test_kmeans_weighted_centers_are_weighted_means():
    values = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [30.0], [31.0]])
    counts = np.array([5.0, 3.0, 1.0, 4.0, 4.0, 2.0, 6.0])
    centers, labels = _kmeans.kmeans(values, counts, 3, np.random.default_rng(1))
    expected = {
        (5 * 0 + 3 * 1 + 1 * 2) / 9,
        (4 * 10 + 4 * 11) / 8,
        (2 * 30 + 6 * 31) / 8,
    }
    assert sorted(centers.ravel()) == pytest.approx(sorted(expected))


@pytest.mark.parametrize("n_total, n_sample", [(10, 10), (11, 10), (1_000_003, 997), (50, 7)])
def test_stratified_indices_one_per_stratum_sorted_distinct(n_total, n_sample):
    indices = _kmeans.stratified_indices(n_total, n_sample, np.random.default_rng(3))

    bounds = np.arange(n_sample + 1) * n_total // n_sample
    assert indices.shape == (n_sample,) and indices.dtype == np.int64
    assert np.all(np.diff(indices) > 0)  # sorted and distinct
    np.testing.assert_array_equal(
        np.searchsorted(bounds, indices, "right") - 1, np.arange(n_sample)
    )
    again = _kmeans.stratified_indices(n_total, n_sample, np.random.default_rng(3))
    np.testing.assert_array_equal(indices, again)
    other = _kmeans.stratified_indices(n_total, n_sample, np.random.default_rng(4))
    assert n_total == n_sample or not np.array_equal(indices, other)
    with pytest.raises(ValueError, match="n_sample <= n_total"):
        _kmeans.stratified_indices(n_sample - 1, n_sample, np.random.default_rng(3))


def test_stratified_indices_are_uniform_within_strata():
    """Each index of a stratum is drawn equally often (chi-square-free check on the means)."""
    rng = np.random.default_rng(5)
    offsets = np.concatenate(
        [_kmeans.stratified_indices(7 * 1000, 1000, rng) % 7 for _ in range(50)]
    )
    counts = np.bincount(offsets, minlength=7)
    assert counts.min() > 0.9 * len(offsets) / 7 and counts.max() < 1.1 * len(offsets) / 7


@pytest.mark.parametrize("n_features", [1, 2])
def test_count_distinct_up_to_a_limit(rng, n_features):
    X = rng.integers(0, 4, size=(500, n_features)).astype(float)
    n_distinct = len(np.unique(X, axis=0))
    assert _kmeans.count_distinct(X, 100) == n_distinct
    assert _kmeans.count_distinct(X, 3) == 3
    assert _kmeans.count_distinct(X[:0], 3) == 0
    assert _kmeans.count_distinct(np.ones((9, n_features)), 6) == 1


@pytest.mark.parametrize("n_features", [1, 2])
def test_nearest_matches_argmin_and_takes_the_first_on_a_tie(rng, n_features):
    X = rng.integers(0, 6, size=(500, n_features)).astype(float)
    centers = np.array([[1.0] * n_features, [3.0] * n_features, [3.0] * n_features])
    distances = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    labels = _kmeans._nearest(X, centers)
    np.testing.assert_array_equal(labels, np.argmin(distances, axis=1))
    assert not np.any(labels == 2)  # centre 2 ties with centre 1 everywhere: 1 wins
    np.testing.assert_array_equal(
        _kmeans._squared_distances(X, centers), distances.T
    )  # bitwise, so k-means++ and Lloyd see the same numbers in 1-D and in D-D


def test_parameters_from_clusters_with_an_empty_cluster(rng):
    X = rng.normal(0, 5, size=(50, 1))
    labels = np.where(X[:, 0] > 0, 2, 0)
    weights, means, covariances = _kmeans.parameters_from_clusters(X, np.ones(50), labels, 3)
    assert weights[1] == 0 and np.all(means[1] == 0) and np.all(covariances[1] == 0)
    assert means[2, 0] == pytest.approx(X[X[:, 0] > 0, 0].mean(), rel=1e-13)


def test_parameters_from_clusters_matches_direct_computation(rng):
    X = rng.normal(0, 5, size=(200, 2))
    w = rng.uniform(0.5, 2.0, size=200)
    labels = rng.integers(0, 3, size=200)

    weights, means, covariances = _kmeans.parameters_from_clusters(X, w, labels, 3)

    for k in range(3):
        members = labels == k
        assert weights[k] == pytest.approx(w[members].sum() / w.sum(), rel=1e-13)
        np.testing.assert_allclose(means[k], np.average(X[members], axis=0, weights=w[members]))
        direct = np.cov(X[members].T, aweights=w[members], bias=True)
        np.testing.assert_allclose(covariances[k], direct, rtol=1e-12)
    assert weights.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- worked example
def test_worked_example_one_iteration_by_hand():
    """x = 1, 2, 3, 8, 9, 10; two components; one EM iteration written out in full."""
    x = [1.0, 2.0, 3.0, 8.0, 9.0, 10.0]
    pi0, mu0, var0 = [0.4, 0.6], [2.0, 7.0], [1.0, 4.0]

    def normal_pdf(value, mean, var):
        return math.exp(-((value - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)

    # E-step: r_nk = pi_k N(x_n | mu_k, s_k^2) / sum_j pi_j N(x_n | mu_j, s_j^2)
    r = []
    for xn in x:
        p = [pi0[k] * normal_pdf(xn, mu0[k], var0[k]) for k in range(2)]
        r.append([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])])
    # M-step
    n_k = [sum(r[n][k] for n in range(6)) for k in range(2)]
    mu = [sum(r[n][k] * x[n] for n in range(6)) / n_k[k] for k in range(2)]
    var = [sum(r[n][k] * (x[n] - mu[k]) ** 2 for n in range(6)) / n_k[k] for k in range(2)]
    pi = [n_k[k] / 6 for k in range(2)]
    log_lik = sum(
        math.log(sum(pi[k] * normal_pdf(xn, mu[k], var[k]) for k in range(2))) for xn in x
    )

    gm = GaussianMixtureEM(
        2, max_iter=1, tol=0.0, means_init=mu0, covariances_init=var0, weights_init=pi0,
        variance_floor=1e-9, chunk_size=4,
    )  # fmt: skip
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        gm.fit(np.array(x))

    # sanity of the hand computation itself: x=3 is shared, the other points are clear-cut
    assert 0.5 < r[2][0] < 0.9 and r[0][0] > 0.98 and r[5][1] > 0.99
    assert gm.n_iter_ == 1
    np.testing.assert_allclose(gm.weights_, pi, rtol=1e-12)
    np.testing.assert_allclose(gm.means_.ravel(), mu, rtol=1e-12)
    np.testing.assert_allclose(gm.covariances_.ravel(), var, rtol=1e-12)
    assert gm.log_likelihood_ == pytest.approx(log_lik, rel=1e-12)
    assert gm.log_likelihood_trace_ == [gm.log_likelihood_]
    initial = sum(
        math.log(sum(pi0[k] * normal_pdf(xn, mu0[k], var0[k]) for k in range(2))) for xn in x
    )
    assert gm.initial_log_likelihood_ == pytest.approx(initial, rel=1e-12)
    assert gm.log_likelihood_ > gm.initial_log_likelihood_


@needs_compiled
def test_compiled_kernels_refuse_wrong_buffers():
    """The C module checks dtypes and sizes itself: a wrong call raises, it does not crash."""
    x, centers, sums = np.zeros(10, np.float32), np.zeros(3), np.zeros((3, 3))
    with pytest.raises(TypeError, match="x: expected a contiguous float32 or float64"):
        _estep.statistics_1d(x.astype(np.int16), np.empty(0), centers, centers, centers, sums)
    with pytest.raises(TypeError, match="sums"):
        _estep.statistics_1d(x, np.empty(0), centers, centers, centers, sums.astype(np.float32))
    with pytest.raises(ValueError, match="sums 3 K"):
        _estep.statistics_1d(x, np.empty(0), centers, centers, centers, np.zeros(8))
    with pytest.raises(ValueError, match="sample_weight"):
        _estep.statistics_1d(x, np.ones(9), centers, centers, centers, sums)
    with pytest.raises(ValueError, match="inconsistent sizes"):
        _estep.statistics_nd(
            np.zeros((10, 2)), np.empty(0), np.zeros((3, 2)), np.zeros((3, 2, 2)), np.zeros(3),
            np.zeros(3), np.zeros((3, 2)), np.zeros((3, 3, 3)),
        )  # fmt: skip
    with pytest.raises(ValueError):  # not contiguous
        _estep.statistics_1d(np.zeros(20)[::2], np.empty(0), centers, centers, centers, sums)


@needs_compiled
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_moments_of_one_channel_match_numpy(rng, dtype):
    """The compiled pass (one float channel, no weights) against the weighted numpy path."""
    X = rng.normal(900.0, 120.0, size=(100_003, 1)).astype(dtype)
    compiled = _em.chunk_moments(X)
    reference = _em.chunk_moments(X, np.ones(len(X)))  # weights take the numpy path
    for key in ("n", "mean", "m2", "minimum", "maximum"):
        np.testing.assert_allclose(compiled[key], reference[key], rtol=1e-12)
    assert compiled["n_nonfinite"] == 0
    minimum, maximum, mean, m2 = _estep.moments_1d(np.array([1.0, np.nan, 3.0]))
    assert np.isnan(minimum) and np.isnan(maximum)  # the caller falls back to the mask path
