"""GaussianMixtureEM under scikit-learn's estimator contract (scikit-learn is a test dependency)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError as SklearnNotFittedError  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

from segment import GaussianMixtureEM, NotFittedError, SegmentError  # noqa: E402
from segment._estimator import n_parameters  # noqa: E402

#: The checks of ``check_estimator`` that cannot apply, with the reason.
EXPECTED_FAILED_CHECKS = {
    "check_fit1d": "a 1-D X is one channel (a flattened one-channel scan), by design",
    "check_sample_weight_equivalence_on_dense_data": (
        "k-means++ draws differ between weighted and repeated rows, so 15 points in 30 "
        "dimensions reach another local optimum; from the same initial parameters weights "
        "and repeats agree (test_sample_weight_two_equals_repeat)"
    ),
}


def blobs(rng, n=300, D=2, centres=(0.0, 6.0, 12.0)):
    return np.concatenate([rng.normal(c, 1.0, (n, D)) for c in centres])


def test_check_estimator_fails_only_the_listed_checks():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(GaussianMixtureEM(n_components=2), on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    passed = {r["check_name"] for r in results if r["status"] == "passed"}
    assert failed == set(EXPECTED_FAILED_CHECKS)
    assert len(passed) >= 40


def test_get_set_params_and_repr():
    gm = GaussianMixtureEM(3, tol=1e-3)
    params = gm.get_params()
    assert params["n_components"] == 3 and params["tol"] == 1e-3 and params["max_iter"] == 300
    assert "mrf_beta" in params and "callback" in params
    assert repr(gm) == "GaussianMixtureEM(n_components=3, tol=0.001)"
    assert repr(GaussianMixtureEM()) == "GaussianMixtureEM()"
    assert gm.set_params(max_iter=7) is gm and gm.max_iter == 7
    with pytest.raises(ValueError, match="invalid parameter 'nope'"):
        gm.set_params(nope=1)


def test_clone_keeps_parameters_not_fit(rng):
    X = blobs(rng)
    gm = GaussianMixtureEM(3, means_init=np.array([[0.0, 0], [6, 6], [12, 12]])).fit(X)
    copy = clone(gm)
    assert copy.get_params()["n_components"] == 3
    assert copy.means_init is gm.means_init or np.array_equal(copy.means_init, gm.means_init)
    assert not hasattr(copy, "means_")
    np.testing.assert_allclose(copy.fit(X).means_, gm.means_)


def test_not_fitted_error():
    gm = GaussianMixtureEM(2)
    for method in (gm.predict, gm.predict_proba, gm.score, gm.score_samples, gm.bic, gm.aic):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            method(np.zeros((3, 1)))
    with pytest.raises(SklearnNotFittedError):  # scikit-learn is imported here: its class too
        gm.predict(np.zeros((3, 1)))
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(gm)
    assert issubclass(NotFittedError, (SegmentError)) and issubclass(NotFittedError, AttributeError)
    assert not hasattr(gm, "bias_field_") or gm.bias_field_ is None


def test_pipeline_and_grid_search_pick_k_by_mean_log_likelihood(rng):
    X = blobs(rng, n=200, D=1)[:, 0].reshape(-1, 1)
    pipe = Pipeline([("scale", StandardScaler()), ("gm", GaussianMixtureEM(2))])
    labels = pipe.fit(X).predict(X)
    assert set(np.unique(labels)) == {0, 1}
    search = GridSearchCV(
        GaussianMixtureEM(), {"n_components": [1, 2, 3]}, cv=KFold(3, shuffle=True, random_state=0)
    )
    search.fit(X)
    assert search.best_params_ == {"n_components": 3}
    assert search.best_score_ == pytest.approx(
        np.mean([search.cv_results_[f"split{i}_test_score"][2] for i in range(3)])
    )


def test_score_samples_bic_aic_equal_sklearn(rng):
    X = blobs(rng, D=2)
    gm = GaussianMixtureEM(3, tol=1e-6).fit(X)
    ref = GaussianMixture(3, covariance_type="full").fit(X)
    ref.weights_, ref.means_ = gm.weights_, gm.means_
    ref.covariances_, ref.precisions_cholesky_ = gm.covariances_, gm.precisions_cholesky_
    np.testing.assert_allclose(gm.score_samples(X), ref.score_samples(X), rtol=1e-10)
    assert gm.score(X) == pytest.approx(ref.score(X), rel=1e-10)
    assert gm.bic(X) == pytest.approx(ref.bic(X), rel=1e-10)
    assert gm.aic(X) == pytest.approx(ref.aic(X), rel=1e-10)
    assert n_parameters(3, 2) == ref._n_parameters() == 17


def test_sklearn_fit_and_ours_agree_on_bic(rng):
    """Both fitted from the same start reach the same optimum and the same BIC."""
    X = blobs(rng, D=1)
    means = np.array([[1.0], [5.0], [11.0]])
    gm = GaussianMixtureEM(3, means_init=means, tol=1e-9, max_iter=1000).fit(X)
    ref = GaussianMixture(3, means_init=means, tol=1e-12, max_iter=1000, reg_covar=0).fit(X)
    assert gm.bic(X) == pytest.approx(ref.bic(X), rel=1e-6)


def test_sample(rng):
    gm = GaussianMixtureEM(3).fit(blobs(rng, D=2))
    X, y = gm.sample(3000)
    assert X.shape == (3000, 2) and y.shape == (3000,)
    for k in range(3):
        np.testing.assert_allclose(X[y == k].mean(axis=0), gm.means_[k], atol=0.15)
    np.testing.assert_allclose(np.bincount(y) / 3000, gm.weights_, atol=0.04)
    np.testing.assert_array_equal(gm.sample(10)[0], gm.sample(10)[0])  # seeded
    with pytest.raises(SegmentError, match="n_samples must be an integer >= 1"):
        gm.sample(0)


def test_sample_weight_two_equals_repeat(rng):
    X = blobs(rng, n=100, D=2)
    weight = np.ones(len(X))
    weight[::3] = 2
    repeated = np.concatenate([X, X[::3]])
    init = {
        "means_init": np.array([[0.5, 0], [5, 6], [12, 11]]),
        "covariances_init": np.stack([np.eye(2)] * 3),
        "weights_init": np.full(3, 1 / 3),
    }
    a = GaussianMixtureEM(3, tol=1e-10, **init).fit(X, sample_weight=weight)
    b = GaussianMixtureEM(3, tol=1e-10, **init).fit(repeated)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.weights_, b.weights_, rtol=1e-9)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-12)


def test_pickle_round_trip(rng):
    X = blobs(rng, D=1)
    gm = GaussianMixtureEM(3).fit(X)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(gm)).predict(X), gm.predict(X))


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.zeros((4, 0)), r"0 feature\(s\)"),
        (np.zeros((0, 2)), r"0 sample\(s\)"),
        (np.ones((3, 1)) * 1j, "Complex data not supported"),
        (np.array([["a"], ["b"]], dtype=object), "non-numeric"),
    ],
)
def test_bad_inputs(X, match):
    with pytest.raises(SegmentError, match=match):
        GaussianMixtureEM(2).fit(X)


def test_predict_checks_channels_and_finiteness(rng):
    gm = GaussianMixtureEM(2).fit(blobs(rng, D=2, centres=(0, 6)))
    with pytest.raises(
        SegmentError, match="X has 1 features, but GaussianMixtureEM is expecting 2"
    ):
        gm.predict(np.zeros(4))
    with pytest.raises(SegmentError, match="NaN or inf"):
        gm.predict(np.array([[0.0, np.nan]]))


# ------------------------------------------------------------------------------ K by BIC
def test_segment_array_auto_picks_k_by_bic(rng):
    from segment import segment_array

    image = np.full((30, 40), 100.0)
    image[5:25, 10:30] = 500.0
    image[10:20, 15:25] = 900.0
    image = (image + rng.normal(0, 15, image.shape)).round().astype(np.int16)
    result = segment_array(image, n_components=range(1, 6))
    selection = result.model_selection
    assert selection["n_components"] == 3 == result.estimator.n_components
    assert selection["tried"] == [1, 2, 3, 4, 5]
    # each BIC equals GaussianMixtureEM.bic on the flat voxels for that K
    for row in selection["curve"]:
        gm = GaussianMixtureEM(row["n_components"]).fit(image.reshape(-1, 1))
        assert row["bic"] == pytest.approx(gm.bic(image.reshape(-1, 1)), rel=1e-9)
    assert result.sidecar()["model_selection"] == selection
    assert segment_array(image, n_components="auto").model_selection["tried"] == list(range(2, 9))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("auto:4-4", "fewer than two values"),
        ([3], "fewer than two values"),
        ("auto:0-3", "between 1 and 255"),
        ("guess", "'auto' or 'auto:A-B'"),
    ],
)
def test_auto_range_bad_values(value, match):
    from segment import segment_array

    with pytest.raises(SegmentError, match=match):
        segment_array(np.arange(100.0).reshape(10, 10), n_components=value)
