"""Every bad input to ``GaussianMixtureEM`` raises ``SegmentError`` with a message saying what is
wrong, what was received and, where there is one, the fix."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from segment import GaussianMixtureEM, SegmentError


@pytest.fixture
def X1(rng):
    """(600, 1) features: two well-separated classes."""
    return np.concatenate([rng.normal(0, 1, 300), rng.normal(10, 1, 300)])[:, None]


@pytest.fixture
def X2(rng):
    """(600, 2) features."""
    return np.concatenate([rng.normal(0, 1, (300, 2)), rng.normal(10, 1, (300, 2))])


def test_segment_error_is_a_value_error():
    assert issubclass(SegmentError, ValueError)


# ----------------------------------------------------------------------------- the data
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_features(X1, bad):
    X1[[5, 17]] = bad
    with pytest.raises(SegmentError, match=r"X contains 2 voxels with non-finite values.*mask"):
        GaussianMixtureEM(2).fit(X1)


def test_nonfinite_features_in_dask_array(X2):
    X2[123, 1] = np.nan
    with pytest.raises(SegmentError, match=r"X contains 1 voxels with non-finite values"):
        GaussianMixtureEM(2, chunk_size=100).fit(da.from_array(X2, chunks=(77, 2)))


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_fewer_distinct_values_than_components(dtype):
    X = np.repeat([10, 20, 30], 100).astype(dtype)
    with pytest.raises(
        SegmentError, match=r"only 3 distinct intensities but n_components=6; lower n_components"
    ):
        GaussianMixtureEM(6).fit(X)


def test_constant_data():
    with pytest.raises(SegmentError, match=r"the data are constant \(every voxel is \[7\.0\]\)"):
        GaussianMixtureEM(2).fit(np.full(50, 7.0))


@pytest.mark.parametrize("shape", [(4, 5, 6), (2, 3, 4, 5)])
def test_features_with_too_many_dimensions(shape):
    with pytest.raises(SegmentError, match=r"X must be \(n_voxels,\) or \(n_voxels, n_channels\)"):
        GaussianMixtureEM(2).fit(np.ones(shape))


@pytest.mark.parametrize("shape", [(0,), (0, 2), (10, 0)])
def test_empty_features(shape):
    with pytest.raises(SegmentError, match=r"X is empty \(shape"):
        GaussianMixtureEM(2).fit(np.empty(shape))


def test_features_that_are_not_numbers():
    with pytest.raises(SegmentError, match=r"X must hold numbers, got dtype <U"):
        GaussianMixtureEM(2).fit(np.array(["a", "b", "c"]))


@pytest.mark.parametrize(
    ("sample_weight", "match"),
    [
        (np.ones(5), r"sample_weight must have shape \(600,\), got \(5,\)"),
        (-np.ones(600), r"sample_weight must be finite and >= 0"),
        (np.full(600, np.nan), r"sample_weight must be finite and >= 0"),
    ],
)
def test_bad_sample_weight(X1, sample_weight, match):
    with pytest.raises(SegmentError, match=match):
        GaussianMixtureEM(2).fit(X1, sample_weight=sample_weight)


# ----------------------------------------------------------------------------- the parameters
@pytest.mark.parametrize("n_components", [0, 1.5, True, -3, 256, "3", None])
def test_bad_n_components(X1, n_components):
    with pytest.raises(
        SegmentError, match=r"n_components must be an integer between 1 and 255, got "
    ):
        GaussianMixtureEM(n_components).fit(X1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_iter=0), r"max_iter must be an integer > 0, got 0"),
        (dict(max_iter=2.5), r"max_iter must be an integer > 0, got 2\.5"),
        (dict(tol=-1e-3), r"tol must be a number >= 0, got -0\.001"),
        (dict(tol=np.nan), r"tol must be a number >= 0, got nan"),
        (dict(chunk_size=0), r"chunk_size must be an integer > 0, got 0"),
        (dict(init_sample_size=-5), r"init_sample_size must be an integer > 0, got -5"),
        (dict(distinct_values="yes"), r"distinct_values must be 'auto', True or False, got 'yes'"),
    ],
)
def test_bad_numeric_options(X1, kwargs, match):
    with pytest.raises(SegmentError, match=match):
        GaussianMixtureEM(2, **kwargs).fit(X1)


@pytest.mark.parametrize("floor", [-1.0, 0.0, np.inf, [1.0, 2.0, 3.0]])
def test_bad_variance_floor(X2, floor):
    with pytest.raises(
        SegmentError, match=r"variance_floor must be a positive number or 2 positive numbers"
    ):
        GaussianMixtureEM(2, variance_floor=floor).fit(X2)


@pytest.mark.parametrize("scheduler", ["gpu", "thread", 3])
def test_bad_scheduler(X1, scheduler):
    with pytest.raises(SegmentError, match=rf"scheduler={scheduler!r} is not"):
        GaussianMixtureEM(2, scheduler=scheduler).fit(X1)


def test_bad_scheduler_string_lists_the_choices(X1):
    with pytest.raises(SegmentError, match=r"threads, processes, synchronous or the address"):
        GaussianMixtureEM(2, scheduler="gpu").fit(X1)


@pytest.mark.slow  # the connection attempt times out after 10 s
def test_unreachable_scheduler_address(X1):
    with pytest.raises(ValueError, match=r"cannot connect to the dask scheduler at tcp://"):
        GaussianMixtureEM(2, scheduler="tcp://127.0.0.1:1").fit(X1)


# ----------------------------------------------------------------------------- initial parameters
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(means_init=np.zeros((3, 2))), r"means_init must have shape \(2, 2\) .*got \(3, 2\)"),
        (dict(means_init=np.zeros(2)), r"means_init must have shape \(2, 2\) .*got \(2,\)"),
        (
            dict(covariances_init=np.stack([np.eye(2)] * 3)),
            r"covariances_init must have shape \(2, 2, 2\) .*got \(3, 2, 2\)",
        ),
        (
            dict(covariances_init=np.ones((2, 2))),
            r"covariances_init must have shape \(2, 2, 2\) .*got \(2, 2\)",
        ),
        (dict(weights_init=[0.2, 0.3, 0.5]), r"weights_init must have shape \(2,\) .*got \(3,\)"),
        (dict(means_init=[[0.0, np.nan], [1.0, 1.0]]), r"means_init contains non-finite values"),
    ],
)
def test_initial_parameters_with_wrong_shapes(X2, kwargs, match):
    with pytest.raises(SegmentError, match=match):
        GaussianMixtureEM(2, **kwargs).fit(X2)


def test_initial_parameters_1d_accept_flat_shapes_but_not_others(X1):
    gm = GaussianMixtureEM(
        2, max_iter=5, means_init=[0.0, 10.0], covariances_init=[1.0, 1.0],
        weights_init=[0.5, 0.5],
    ).fit(X1)  # fmt: skip
    assert gm.means_.shape == (2, 1) and gm.covariances_.shape == (2, 1, 1)
    with pytest.raises(SegmentError, match=r"means_init must have shape \(2, 1\) or \(2,\)"):
        GaussianMixtureEM(2, means_init=[0.0, 5.0, 10.0]).fit(X1)


@pytest.mark.parametrize(
    "covariance",
    [
        [[1.0, 2.0], [2.0, 1.0]],  # indefinite
        [[1.0, 0.0], [0.0, 0.0]],  # singular
        [[1.0, 0.5], [0.0, 1.0]],  # not symmetric
        [[-1.0, 0.0], [0.0, 1.0]],
    ],
)
def test_covariances_init_not_positive_definite(X2, covariance):
    covariances = np.stack([np.eye(2), covariance])
    with pytest.raises(
        SegmentError, match=r"covariances_init\[1\] is not symmetric positive-definite"
    ):
        GaussianMixtureEM(2, covariances_init=covariances).fit(X2)


def test_negative_variance_init_1d(X1):
    with pytest.raises(SegmentError, match=r"covariances_init\[0\] is not symmetric positive"):
        GaussianMixtureEM(2, covariances_init=[-1.0, 1.0]).fit(X1)


@pytest.mark.parametrize("weights", [[0.5, 0.6], [0.2, 0.2], [1.5, -0.5]])
def test_weights_init_not_summing_to_one(X1, weights):
    with pytest.raises(SegmentError, match=r"weights_init must be > 0 and sum to 1, got \["):
        GaussianMixtureEM(2, weights_init=weights).fit(X1)


def test_weights_init_with_a_zero_is_refused(X1):
    gm = GaussianMixtureEM(
        2, max_iter=5, means_init=[0.0, 10.0], covariances_init=[1.0, 1.0],
        weights_init=[1.0, 0.0],
    )  # fmt: skip
    with pytest.raises(SegmentError, match=r"weights_init must be > 0 .* weight 0 could never"):
        gm.fit(X1)


def test_one_constant_channel_is_refused(X1):
    X = np.column_stack([X1[:, 0], np.full(len(X1), 3.0)])
    with pytest.raises(SegmentError, match=r"channel 1 is constant \(every voxel is 3\)"):
        GaussianMixtureEM(2, max_iter=5).fit(X)


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("method", ["predict", "predict_proba", "score"])
def test_predict_before_fit(X1, method):
    with pytest.raises(SegmentError, match=r"not fitted yet; call fit\(X\) first"):
        getattr(GaussianMixtureEM(2), method)(X1)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score"])
def test_predict_with_wrong_number_of_channels(X2, method):
    gm = GaussianMixtureEM(2, max_iter=20).fit(X2)
    X3 = np.ones((10, 3))
    with pytest.raises(SegmentError, match=r"X has 3 channels but the mixture was fitted on 2"):
        getattr(gm, method)(X3)
    with pytest.raises(SegmentError, match=r"X has 1 channels but the mixture was fitted on 2"):
        getattr(gm, method)(np.ones(10))


def test_predict_with_3d_features(X1):
    gm = GaussianMixtureEM(2, max_iter=20).fit(X1)
    with pytest.raises(SegmentError, match=r"X must be \(n_voxels,\) or"):
        gm.predict(np.ones((2, 3, 4)))
