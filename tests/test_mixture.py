"""Tests of the ``GaussianMixtureEM`` estimator.

The chunked, scheduled engine is compared iteration by iteration with the dense textbook EM of
``tests/reference_em.py`` and with scikit-learn from identical initial parameters; properties
(normalisation, floor, monotone likelihood, permutation invariance) are checked with
hypothesis; recovery, sorting, the distinct-values fast path, prediction, warnings and
determinism are checked on synthetic mixtures with known parameters.
"""

from __future__ import annotations

import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor

import dask
import dask.array as da
import numpy as np
import pytest
import reference_em as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segment import ConvergenceWarning, DataWarning, GaussianMixtureEM

N_ITER = 5
FLOOR = 1e-6

# ----------------------------------------------------------------------------- data
# 1-D: three overlapping classes, N = 20 000, explicit initial parameters off the truth.
TRUE_1D = dict(means=[100.0, 160.0, 400.0], sds=[15.0, 25.0, 40.0], weights=[0.3, 0.4, 0.3])
INIT_1D = dict(
    means_init=np.array([[90.0], [175.0], [380.0]]),
    covariances_init=np.array([[[300.0]], [[500.0]], [[1200.0]]]),
    weights_init=np.array([0.3, 0.3, 0.4]),
)
# 2-D: three classes with correlated channels, N = 6 000.
TRUE_2D = dict(
    means=np.array([[1000.0, 400.0], [1100.0, 700.0], [1300.0, 500.0]]),
    covs=np.array(
        [
            [[400.0, 150.0], [150.0, 300.0]],
            [[900.0, -200.0], [-200.0, 500.0]],
            [[250.0, 40.0], [40.0, 600.0]],
        ]
    ),
    weights=[0.3, 0.3, 0.4],
)
INIT_2D = dict(
    means_init=TRUE_2D["means"] + np.array([[30.0, -20.0], [-25.0, 30.0], [20.0, 15.0]]),
    covariances_init=1.5 * TRUE_2D["covs"],
    weights_init=np.array([0.25, 0.35, 0.4]),
)


def sample_1d(rng, n, means, sds, weights):
    labels = rng.choice(len(means), size=n, p=weights)
    return rng.normal(np.asarray(means)[labels], np.asarray(sds)[labels]), labels


def sample_nd(rng, n, means, covs, weights):
    labels = rng.choice(len(means), size=n, p=weights)
    X = np.empty((n, means.shape[1]))
    for k in range(len(means)):
        members = labels == k
        X[members] = rng.multivariate_normal(means[k], covs[k], members.sum())
    return X, labels


@pytest.fixture(scope="module")
def data_1d():
    X, _ = sample_1d(np.random.default_rng(1), 20_000, **TRUE_1D)
    return X[:, None]


@pytest.fixture(scope="module")
def data_2d():
    X, _ = sample_nd(np.random.default_rng(2), 6_000, **TRUE_2D)
    return X


@pytest.fixture(scope="module")
def history_1d(data_1d):
    init = INIT_1D
    return ref.run(
        data_1d, init["weights_init"], init["means_init"], init["covariances_init"], N_ITER, FLOOR
    )


@pytest.fixture(scope="module")
def history_2d(data_2d):
    init = INIT_2D
    return ref.run(
        data_2d, init["weights_init"], init["means_init"], init["covariances_init"], N_ITER, FLOOR
    )


def fit_tol0(X, **kwargs):
    """Fit with tol=0 (never converges, so it must warn) and return the estimator."""
    gm = GaussianMixtureEM(kwargs.pop("n_components", 3), tol=0.0, **kwargs)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        gm.fit(X)
    return gm


def assert_close(got, want, rtol, name=""):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)


def assert_matches_history(gm, history, n_iter, rtol):
    weights, means, covariances, log_lik = history[n_iter - 1]
    assert gm.n_iter_ == n_iter
    assert_close(gm.weights_, weights, rtol, "weights")
    assert_close(gm.means_, means, rtol, "means")
    assert_close(gm.covariances_, covariances, rtol, "covariances")
    assert gm.log_likelihood_ == pytest.approx(log_lik, rel=rtol)
    assert_close(gm.log_likelihood_trace_, [h[3] for h in history[:n_iter]], rtol, "trace")


def check_against_reference(X, history, init, **kwargs):
    for n_iter in range(1, N_ITER + 1):
        gm = fit_tol0(
            X, max_iter=n_iter, variance_floor=FLOOR, sort_components=False, **init, **kwargs
        )
        assert_matches_history(gm, history, n_iter, rtol=1e-9)
    # the parameters really moved over the iterations (the comparison is not trivial)
    assert np.abs(history[-1][1] - init["means_init"]).max() > 5.0


# ----------------------------------------------------------------------------- properties
# (before the distributed tests: hypothesis objects to a live cluster's threads using `random`)
#: (seed, n_features, n_components, n_samples, separation in units of the noise)
mixtures = st.tuples(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2]),
    st.integers(2, 4),
    st.integers(100, 1000),
    st.floats(0.5, 6.0),
)


def make_mixture(seed, n_features, n_components, n_samples, separation):
    """(X, init) for a random 1-D or 2-D mixture with explicit, permutation-free init."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, size=(n_components, n_features)) + 500.0
    scales = rng.uniform(0.5, 2.0, size=n_components)
    labels = rng.integers(0, n_components, n_samples)
    X = means[labels] + rng.normal(size=(n_samples, n_features)) * scales[labels, None]
    # initial means: quantiles of the first channel, so they do not depend on voxel order
    order = np.argsort(X[:, 0], kind="stable")
    picks = order[((np.arange(n_components) + 0.5) / n_components * n_samples).astype(int)]
    init = dict(
        means_init=X[picks],
        covariances_init=np.broadcast_to(
            np.cov(X.T).reshape(n_features, n_features), (n_components, n_features, n_features)
        ).copy(),
        weights_init=np.full(n_components, 1.0 / n_components),
    )
    return X, init


def _fit_quietly(X, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = GaussianMixtureEM(**kwargs).fit(X)
    return gm, [w.category for w in caught]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixtures, st.floats(1e-4, 1.0))  # the floor as a fraction of the data's variance
def test_properties_of_a_fit(mixture, floor_fraction):
    X, init = make_mixture(*mixture)
    # a floor the initial covariances (cov(X)) satisfy, so EM must not lower the likelihood
    floor = floor_fraction * np.linalg.eigvalsh(np.atleast_2d(np.cov(X.T))).min()
    K, D = init["means_init"].shape
    gm, caught = _fit_quietly(
        X, n_components=K, max_iter=12, tol=0.0, variance_floor=floor, chunk_size=400,
        scheduler="synchronous", **init,
    )  # fmt: skip
    assert ConvergenceWarning in caught  # tol=0

    proba = gm.predict_proba(X)
    assert proba.shape == (len(X), K)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert gm.weights_.sum() == pytest.approx(1.0, rel=1e-12)
    assert np.all(gm.weights_ > 0)
    whitened = gm.covariances_ / floor
    assert np.linalg.eigvalsh(whitened).min() >= 1.0 - 1e-9
    for cov in gm.covariances_:
        np.testing.assert_allclose(cov, cov.T, rtol=1e-12, atol=1e-12 * np.abs(cov).max())
    assert np.all(np.isfinite(gm.means_)) and np.all(np.isfinite(gm.log_likelihood_trace_))
    if DataWarning not in caught:  # re-seeding a component may lower the likelihood once
        trace = np.array([gm.initial_log_likelihood_, *gm.log_likelihood_trace_])
        slack = 1e-9 * np.abs(trace[:-1])
        assert np.all(np.diff(trace) >= -slack), np.diff(trace)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixtures, st.integers(0, 2**32 - 1))
def test_permuting_voxels_changes_nothing(mixture, perm_seed):
    X, init = make_mixture(*mixture)
    K = init["means_init"].shape[0]
    kwargs = dict(
        n_components=K, max_iter=8, tol=0.0, variance_floor=1e-3, chunk_size=333,
        scheduler="synchronous", **init,
    )  # fmt: skip
    permutation = np.random.default_rng(perm_seed).permutation(len(X))
    gm, _ = _fit_quietly(X, **kwargs)
    gm_perm, _ = _fit_quietly(X[permutation], **kwargs)

    for name in ("weights_", "means_", "covariances_"):
        assert_close(getattr(gm_perm, name), getattr(gm, name), 1e-8, name)
    assert gm_perm.log_likelihood_ == pytest.approx(gm.log_likelihood_, rel=1e-10)
    np.testing.assert_array_equal(gm_perm.predict(X), gm.predict(X))


# ----------------------------------------------------------------------------- engine vs reference
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
@pytest.mark.parametrize("chunk_size", [1_000_000, 997, 4099])
def test_matches_reference_each_iteration_1d(data_1d, history_1d, scheduler, chunk_size):
    check_against_reference(
        data_1d, history_1d, INIT_1D, chunk_size=chunk_size, scheduler=scheduler, n_workers=2
    )


@pytest.mark.parametrize("chunk_size", [1_000_000, 997])
def test_matches_reference_each_iteration_2d(data_2d, history_2d, chunk_size):
    check_against_reference(
        data_2d, history_2d, INIT_2D, chunk_size=chunk_size, scheduler="threads"
    )


@pytest.fixture(scope="module")
def process_pool():
    """One spawn pool reused by dask's "processes" scheduler (a new pool per compute is slow)."""
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    yield pool
    pool.shutdown()


def test_matches_reference_processes_scheduler(data_1d, history_1d, process_pool):
    with dask.config.set(pool=process_pool):
        check_against_reference(
            data_1d, history_1d, INIT_1D, chunk_size=4099, scheduler="processes", n_workers=2
        )


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1_000_000, 997])
def test_matches_reference_processes_scheduler_fresh_pools(data_1d, history_1d, chunk_size):
    check_against_reference(
        data_1d, history_1d, INIT_1D, chunk_size=chunk_size, scheduler="processes", n_workers=2
    )


@pytest.fixture(scope="module")
def thread_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
        dashboard_address=":0",
    ) as cluster:  # fmt: skip
        yield cluster


@pytest.fixture(scope="module")
def process_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, protocol="tcp://",
        dashboard_address=":0",
    ) as cluster:  # fmt: skip
        yield cluster


def test_matches_reference_distributed_address(data_1d, history_1d, thread_cluster):
    address = thread_cluster.scheduler_address
    assert address.startswith("tcp://")
    check_against_reference(data_1d, history_1d, INIT_1D, chunk_size=997, scheduler=address)


def test_matches_reference_distributed_client(data_1d, history_1d, thread_cluster):
    from distributed import Client

    with Client(thread_cluster, set_as_default=False) as client:
        check_against_reference(data_1d, history_1d, INIT_1D, chunk_size=4099, scheduler=client)
        assert client.status == "running"  # a Client passed in is left open


def test_matches_reference_distributed_worker_processes(data_1d, history_1d, process_cluster):
    """Worker processes: the statistics are pickled across processes and still agree."""
    n_iter = 3
    gm = fit_tol0(
        data_1d, max_iter=n_iter, variance_floor=FLOOR, sort_components=False,
        chunk_size=4099, scheduler=process_cluster.scheduler_address, **INIT_1D,
    )  # fmt: skip
    assert_matches_history(gm, history_1d, n_iter, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1_000_000, 997, 4099])
def test_matches_reference_distributed_worker_processes_all_iterations(
    data_1d, history_1d, process_cluster, chunk_size
):
    check_against_reference(
        data_1d, history_1d, INIT_1D, chunk_size=chunk_size,
        scheduler=process_cluster.scheduler_address,
    )  # fmt: skip


# ----------------------------------------------------------------------------- scikit-learn parity
def sklearn_fit(X, init, n_iter):
    from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
    from sklearn.mixture import GaussianMixture

    K, D = init["means_init"].shape
    sk = GaussianMixture(
        K, covariance_type="full", reg_covar=0.0, tol=0.0, max_iter=n_iter,
        means_init=init["means_init"],
        precisions_init=np.linalg.inv(init["covariances_init"].reshape(K, D, D)),
        weights_init=init["weights_init"], random_state=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        sk.fit(X)
    return sk


@pytest.mark.parametrize("n_iter", [1, 4, 25])
@pytest.mark.parametrize("dim", [1, 2])
def test_matches_scikit_learn(data_1d, data_2d, dim, n_iter):
    pytest.importorskip("sklearn")
    X, init = (data_1d, INIT_1D) if dim == 1 else (data_2d, INIT_2D)
    sk = sklearn_fit(X, init, n_iter)
    gm = fit_tol0(X, max_iter=n_iter, variance_floor=1e-12, sort_components=False, **init)

    assert sk.n_iter_ == gm.n_iter_ == n_iter
    assert_close(gm.weights_, sk.weights_, 1e-6, "weights")
    assert_close(gm.means_, sk.means_, 1e-6, "means")
    assert_close(gm.covariances_, sk.covariances_, 1e-6, "covariances")
    assert_close(gm.precisions_cholesky_, sk.precisions_cholesky_, 1e-6, "precisions_cholesky")
    assert gm.log_likelihood_ == pytest.approx(sk.score(X) * len(X), rel=1e-6)
    assert gm.score(X) == pytest.approx(sk.score(X), rel=1e-6)
    np.testing.assert_array_equal(gm.predict(X), sk.predict(X))


# ----------------------------------------------------------------------------- recovery
def test_recovers_six_component_1d_mixture():
    truth = dict(
        means=[30.0, 80.0, 140.0, 200.0, 270.0, 350.0],
        sds=[6.0, 8.0, 10.0, 8.0, 12.0, 10.0],
        weights=[0.1, 0.15, 0.2, 0.25, 0.15, 0.15],
    )
    X, _ = sample_1d(np.random.default_rng(6), 60_000, **truth)
    gm = GaussianMixtureEM(6, max_iter=500, tol=1e-7, chunk_size=16_384).fit(X)

    spread = max(truth["means"]) - min(truth["means"])
    assert gm.converged_
    np.testing.assert_array_less(np.abs(gm.means_.ravel() - truth["means"]), 0.01 * spread)
    np.testing.assert_array_less(np.abs(gm.weights_ - truth["weights"]), 0.02)
    np.testing.assert_allclose(np.sqrt(gm.covariances_.ravel()), truth["sds"], rtol=0.1)


def test_recovers_three_component_2d_mixture(rng):
    X, labels = sample_nd(rng, 30_000, **TRUE_2D)
    gm = GaussianMixtureEM(3, max_iter=500, tol=1e-7, chunk_size=7_001).fit(X)

    spread = np.ptp(TRUE_2D["means"], axis=0)
    assert gm.converged_
    assert np.all(np.abs(gm.means_ - TRUE_2D["means"]) < 0.01 * spread), gm.means_
    np.testing.assert_array_less(np.abs(gm.weights_ - TRUE_2D["weights"]), 0.02)
    np.testing.assert_allclose(gm.covariances_, TRUE_2D["covs"], atol=0.1 * 900)
    assert np.mean(gm.predict(X) == labels) > 0.9


# ----------------------------------------------------------------------------- sorting
def test_components_sorted_by_first_channel_mean(data_1d):
    init = dict(  # deliberately out of order
        means_init=INIT_1D["means_init"][[2, 0, 1]],
        covariances_init=INIT_1D["covariances_init"][[2, 0, 1]],
        weights_init=INIT_1D["weights_init"][[2, 0, 1]],
    )
    gm_sorted = fit_tol0(data_1d, max_iter=3, **init)
    gm_raw = fit_tol0(data_1d, max_iter=3, sort_components=False, **init)

    assert np.all(np.diff(gm_sorted.means_[:, 0]) > 0)
    assert not np.all(np.diff(gm_raw.means_[:, 0]) > 0)
    order = np.argsort(gm_raw.means_[:, 0])
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(gm_sorted, name), getattr(gm_raw, name)[order])
    rank = np.argsort(order)  # raw component -> sorted label
    np.testing.assert_array_equal(gm_sorted.predict(data_1d), rank[gm_raw.predict(data_1d)])
    assert gm_sorted.log_likelihood_ == gm_raw.log_likelihood_


# ----------------------------------------------------------------------------- distinct values
def integer_data(dtype, n=30_000):
    rng = np.random.default_rng(3)
    if dtype == np.uint8:
        X, _ = sample_1d(rng, n, means=[40.0, 110.0, 190.0], sds=[10.0, 15.0, 12.0],
                         weights=[0.3, 0.4, 0.3])  # fmt: skip
        return np.clip(np.round(X), 0, 255).astype(np.uint8), dict(
            means_init=np.array([30.0, 120.0, 180.0]),
            covariances_init=np.array([200.0, 200.0, 200.0]),
            weights_init=np.array([1 / 3, 1 / 3, 1 / 3]),
        )
    X, _ = sample_1d(rng, n, means=[800.0, 1500.0, 2600.0], sds=[60.0, 90.0, 120.0],
                     weights=[0.2, 0.5, 0.3])  # fmt: skip
    return np.round(X).astype(np.int16), dict(
        means_init=np.array([700.0, 1600.0, 2500.0]),
        covariances_init=np.array([1e4, 1e4, 1e4]),
        weights_init=np.array([1 / 3, 1 / 3, 1 / 3]),
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_distinct_values_path_equals_per_voxel_from_same_init(dtype):
    X, init = integer_data(dtype)
    kwargs = dict(max_iter=8, variance_floor=0.5, chunk_size=4099, **init)
    fast = fit_tol0(X, **kwargs)
    slow = fit_tol0(X, distinct_values=False, **kwargs)

    assert fast.fit_path_ == "distinct-values" and slow.fit_path_ == "per-voxel"
    for name in ("weights_", "means_", "covariances_"):
        assert_close(getattr(fast, name), getattr(slow, name), 1e-9, name)
    assert_close(fast.log_likelihood_trace_, slow.log_likelihood_trace_, 1e-9, "trace")
    assert fast.n_samples_ == slow.n_samples_ == len(X)
    np.testing.assert_array_equal(fast.predict(X), slow.predict(X))
    np.testing.assert_allclose(fast.predict_proba(X), slow.predict_proba(X), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_distinct_values_path_with_kmeans_init_is_close(dtype):
    X, _ = integer_data(dtype)
    fast = GaussianMixtureEM(3, max_iter=300, tol=1e-9).fit(X)
    slow = GaussianMixtureEM(3, max_iter=300, tol=1e-9, distinct_values=False).fit(X)

    assert fast.fit_path_ == "distinct-values" and slow.fit_path_ == "per-voxel"
    spread = np.ptp(slow.means_)
    np.testing.assert_allclose(fast.means_, slow.means_, atol=1e-4 * spread)
    np.testing.assert_allclose(fast.weights_, slow.weights_, atol=1e-4)
    np.testing.assert_allclose(fast.covariances_, slow.covariances_, rtol=1e-3)
    assert fast.log_likelihood_ == pytest.approx(slow.log_likelihood_, rel=1e-8)


# ----------------------------------------------------------------------------- prediction
def test_fit_predict_equals_fit_then_predict(data_1d):
    labels = GaussianMixtureEM(3, tol=1e-3, chunk_size=4099).fit_predict(data_1d)
    gm = GaussianMixtureEM(3, tol=1e-3, chunk_size=4099).fit(data_1d)
    np.testing.assert_array_equal(labels, gm.predict(data_1d))
    assert labels.shape == (len(data_1d),) and set(np.unique(labels)) == {0, 1, 2}
    proba = gm.predict_proba(data_1d)
    np.testing.assert_array_equal(labels, np.argmax(proba, axis=1))


def test_predict_on_dask_array_is_lazy_and_equal(data_2d):
    gm = GaussianMixtureEM(3, chunk_size=1000).fit(data_2d)
    X_dask = da.from_array(data_2d, chunks=(777, 2))

    labels = gm.predict(X_dask)
    proba = gm.predict_proba(X_dask)

    assert isinstance(labels, da.Array) and isinstance(proba, da.Array)
    assert labels.shape == (len(data_2d),) and proba.shape == (len(data_2d), 3)
    assert proba.dtype == np.float64
    np.testing.assert_array_equal(labels.compute(scheduler="threads"), gm.predict(data_2d))
    np.testing.assert_allclose(
        proba.compute(scheduler="threads"), gm.predict_proba(data_2d), rtol=1e-13
    )


def test_fit_on_dask_array_equals_numpy(data_1d, history_1d):
    X_dask = da.from_array(data_1d, chunks=(3001, 1))
    gm = fit_tol0(
        X_dask, max_iter=3, variance_floor=FLOOR, sort_components=False, chunk_size=997, **INIT_1D
    )
    assert_matches_history(gm, history_1d, 3, rtol=1e-9)


def test_numpy_features_are_chunked_as_views_without_a_copy(data_1d):
    """The fit reads the caller's array chunk by chunk; dask's from_array would copy it."""
    from segment import _chunked

    X = data_1d.astype(np.float32)
    Xd = _chunked.as_feature_array(X, 997)
    assert Xd.chunks[0][:2] == (997, 997) and sum(Xd.chunks[0]) == len(X)
    graph = dict(Xd.__dask_graph__())
    assert all(np.shares_memory(block, X) for block in graph.values())
    np.testing.assert_array_equal(Xd.compute(scheduler="synchronous"), X)
    np.testing.assert_array_equal(Xd[990:1010].compute(scheduler="synchronous"), X[990:1010])


def test_score_is_log_likelihood_per_voxel(data_1d, history_1d):
    gm = fit_tol0(data_1d, max_iter=2, variance_floor=FLOOR, chunk_size=997, **INIT_1D)
    assert gm.score(data_1d) == pytest.approx(gm.log_likelihood_ / len(data_1d), rel=1e-12)
    assert gm.n_samples_ == len(data_1d)
    # and on other data: the mean of log p(x) by the reference
    other = data_1d[::7]
    expected = ref.log_likelihood(other, gm.weights_, gm.means_, gm.covariances_) / len(other)
    assert gm.score(other) == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- warnings
def test_convergence_warning_when_max_iter_too_small(data_1d):
    gm = GaussianMixtureEM(3, max_iter=2, tol=1e-10, **INIT_1D)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2.*raise max_iter"):
        gm.fit(data_1d)
    assert not gm.converged_ and gm.n_iter_ == 2


def test_no_convergence_warning_when_converged(data_1d):
    gm = GaussianMixtureEM(3, max_iter=500, tol=1e-6, **INIT_1D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm.fit(data_1d)
    assert gm.converged_ and gm.n_iter_ < 500
    changes = np.diff(gm.log_likelihood_trace_) / len(data_1d)
    assert abs(changes[-1]) < 1e-6 and abs(changes[0]) >= 1e-6


def test_collapsed_component_is_reseeded_with_warning(rng):
    X = np.concatenate([rng.normal(0, 1, 3000), rng.normal(10, 1, 3000)])
    gm = GaussianMixtureEM(
        3, max_iter=300, tol=1e-6, sort_components=False,
        means_init=[0.0, 10.0, 1e4], covariances_init=[1.0, 1.0, 1.0],
        weights_init=[0.4, 0.4, 0.2],
    )  # fmt: skip
    with pytest.warns(DataWarning, match="component 2 was left with") as record:
        gm.fit(X)

    assert any("component 2" in str(w.message) for w in record)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, name))), name
    assert np.all(np.isfinite(gm.log_likelihood_trace_))
    assert gm.means_[2, 0] < 100.0  # moved into the data
    assert gm.weights_.min() > 0.05
    np.testing.assert_allclose(gm.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_results(data_2d):
    def run():
        gm = GaussianMixtureEM(3, random_state=42, chunk_size=997, scheduler="threads")
        return gm.fit(data_2d)

    first, second = run(), run()
    for name in ("weights_", "means_", "covariances_", "log_likelihood_trace_"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)
    assert first.n_iter_ == second.n_iter_
    np.testing.assert_array_equal(first.predict(data_2d), second.predict(data_2d))


def test_kmeans_init_on_large_data_is_seeded():
    """With more voxels than init_sample_size the subsample is drawn from random_state."""
    X, _ = sample_1d(np.random.default_rng(4), 5_000, **TRUE_1D)

    def run(seed):
        gm = GaussianMixtureEM(3, max_iter=1, tol=0.0, random_state=seed, init_sample_size=500)
        with pytest.warns(ConvergenceWarning):
            gm.fit(X)
        return gm.initial_log_likelihood_

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_weights_sum_to_one_after_reseeding(rng):
    """A component left with a fraction of a voxel is re-seeded; its old weight must not leak."""
    X = np.concatenate([rng.normal(0, 1, 50), rng.normal(10, 1, 50)])
    gm = GaussianMixtureEM(
        3, max_iter=1, tol=0.0, sort_components=False, variance_floor=1e-3,
        means_init=[0.0, 10.0, 6.0], covariances_init=[1.0, 1.0, 0.3],
        weights_init=[0.4975, 0.4975, 0.005],
    )  # fmt: skip
    with pytest.warns(DataWarning, match=r"component 2 was left with [0-9.e-]+ voxels"):
        with pytest.warns(ConvergenceWarning):
            gm.fit(X)
    assert gm.weights_.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(gm.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


def test_integer_predictions_are_looked_up_by_value_with_the_same_numbers():
    """Labels and maps of integer features come from a table per value: same as per voxel."""
    from segment._estimator import posterior_block

    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(m, 9, 4000) for m in (40, 90, 160)]).clip(0, 255)
    X = X.astype(np.uint8)[:, None]
    gm = GaussianMixtureEM(3).fit(X)
    params = gm._params
    as_float = X.astype(np.float64)  # the per-voxel path
    for output in ("proba", "index", "label", "both"):
        np.testing.assert_array_equal(
            posterior_block(X, *params, output), posterior_block(as_float, *params, output)
        )
    np.testing.assert_array_equal(gm.predict(X), gm.predict(as_float))


def test_float_fit_is_initialised_from_a_histogram_of_all_voxels(monkeypatch):
    """One float channel with more voxels than init_sample_size: k-means runs on the occupied
    bins of a histogram of every voxel (counts add up to N, whatever the chunks), and the
    fit lands where a subsample-initialised fit does."""
    from segment import _initialise, _kmeans

    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(m, s, n) for m, s, n in
                        ((40, 6, 30_000), (100, 9, 50_000), (160, 7, 20_000))])  # fmt: skip
    X = rng.permutation(X).astype(np.float32)[:, None]
    seen = []
    kmeans = _kmeans.kmeans
    monkeypatch.setattr(_kmeans, "kmeans", lambda s, w, *a, **k: seen.append((s, w)) or
                        kmeans(s, w, *a, **k))  # fmt: skip
    fits = [
        GaussianMixtureEM(3, init_sample_size=1000, chunk_size=c, random_state=0).fit(X)
        for c in (7_001, 100_000)
    ]
    for sample, weight in seen:
        assert len(sample) <= _initialise.INIT_HISTOGRAM_BINS and weight.sum() == len(X)
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    np.testing.assert_array_equal(seen[0][1], seen[1][1])
    np.testing.assert_allclose(fits[0].means_, fits[1].means_, rtol=1e-9)
    np.testing.assert_allclose(fits[0].means_[:, 0], [40, 100, 160], atol=1.0)
    monkeypatch.setattr(_initialise, "INIT_HISTOGRAM_BINS", 2)  # fewer bins than K: the subsample
    sampled = GaussianMixtureEM(3, init_sample_size=1000, random_state=0).fit(X)
    assert len(seen[-1][0]) == 1000
    np.testing.assert_allclose(sampled.means_, fits[0].means_, rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_histogram_matches_numpy(dtype, compiled, monkeypatch):
    """The histogram kernel, compiled and its numpy twin, against np.histogram."""
    from segment import _kernels

    if compiled and _kernels.compiled is None:
        pytest.skip(f"compiled kernels off: {_kernels.why_not_compiled}")
    if not compiled:
        monkeypatch.setattr(_kernels, "compiled", None)
    x = np.random.default_rng(2).uniform(-5, 250, 100_000).astype(dtype)
    x[:4] = [-5, 250, 100, 300]  # both edges, and a value outside
    counts = np.zeros(512)
    _kernels.histogram_1d(x, -5.0, 250.0, counts)
    np.testing.assert_array_equal(counts, np.histogram(x, bins=512, range=(-5, 250))[0])
