"""The ``GaussianMixtureEM`` estimator: a thin loop over the EM functions of :mod:`segment._em`.

The image-level model (the grid, the MRF prior, the bias field, the memory budget) is
:class:`segment.spatial.model.SpatialGaussianMixture`, which builds on this class;
:meth:`GaussianMixtureEM.fit_image` is a deprecated shim that delegates to it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _chunked, _em, _estimator, _initialise, _kernels, _validation
from ._scheduler import check_scheduler, compute_kwargs
from .exceptions import ConvergenceWarning, DataWarning, SegmentError

__all__ = ["GaussianMixtureEM", "check_parameters", "recorded_warnings"]

#: Default variance floor, as a fraction of each channel's variance over all fitted voxels.
RELATIVE_VARIANCE_FLOOR = 1e-3
#: A component whose responsibilities add up to less than one voxel is re-seeded.
MIN_COMPONENT_VOXELS = 1.0
#: Voxels (evenly spaced) the partial-volume tissue fit of ``pv_fit`` runs on: about this many
#: (a 256-bin histogram of them, for one channel).
PV_FIT_SAMPLE = 200_000
#: Attributes of the spatial model that :meth:`GaussianMixtureEM.fit_image` reads from it.
_SPATIAL_ATTRIBUTES = (
    "bias_field_", "bias_field_shape_", "bias_field_slabs", "bias_field_last_axis_slabs",
)  # fmt: skip


class GaussianMixtureEM(_estimator.EstimatorMixin):
    """Gaussian mixture fitted by Expectation-Maximization, chunked and parallel with Dask.

    The model is ``p(x) = sum_k pi_k N(x | mu_k, Sigma_k)`` with full covariances. Each EM
    iteration maps the E-step over chunks of voxels to sufficient statistics, sums them and
    runs the M-step on the sums; no (N, K) array is held during fitting.

    Parameters
    ----------
    n_components : int, default 6
        Number of Gaussian components K (tissue classes).
    max_iter : int, default 300
        Maximum number of EM iterations (M-steps).
    tol : float, default 1e-4
        Convergence threshold on the change of the log-likelihood per voxel (nats).
    variance_floor : float or (D,) array, optional
        Lower bound on every variance, in squared intensity units. Default: 1e-3 times each
        channel's variance over the fitted voxels. With several channels the floor bounds the
        eigenvalues of each covariance after scaling channel d by ``1/sqrt(floor_d)``.
    random_state : int, default 0
        Seed of the k-means++ initialisation and of the initialisation subsample.
    means_init, covariances_init, weights_init : arrays, optional
        Explicit initial parameters, shapes (K, D), (K, D, D) (or (K,) variances when D = 1)
        and (K,). Those not given come from k-means.
    sort_components : bool, default True
        Order the fitted components by ascending mean of the first channel, so label 1 is the
        darkest class.
    chunk_size : int, optional
        Voxels per chunk (default 262144).
    scheduler : {"threads", "processes", "synchronous"}, str or distributed.Client, optional
        Where the chunks are computed; ``"tcp://host:port"`` connects to a running
        ``dask.distributed`` scheduler. Default: threads.
    n_workers : int, optional
        Threads or processes for the local schedulers (default: one per core).
    distinct_values : {"auto", True, False}, default "auto"
        Fit over the distinct feature vectors weighted by their counts, which is the same
        estimator exactly and much faster for integer-valued scans. ``"auto"`` does so for
        integer dtypes with at most 131072 distinct values.
    init_sample_size : int, default 200000
        The k-means initialisation runs on all distinct values (integer scans), on a
        4096-bin histogram of all voxels (one float channel with more voxels than this), or
        on this many voxels drawn with ``random_state`` (several channels).
    mrf_beta, bias_field, bias_smoothness, posterior_memory_limit
        The spatial model's parameters, used by :meth:`fit_image` only: see
        :class:`segment.SpatialGaussianMixture`, which new code should use for images.
    pv_fit : bool, default False
        After EM, fit a mixed-voxel model (:func:`segment.partial_volume.fit_tissues`) and
        replace each Gaussian by the moments of the voxels whose largest tissue fraction is
        that class, so labels follow partial-volume boundaries (``pv_model_``, ``pv_trace_``,
        ``pv_fit_status_``). One channel only (otherwise a warning, and the mixture stands);
        ``log_likelihood_`` and its trace stay those of the mixture's EM.
    callback : callable, optional
        Called after each iteration as ``callback(iteration, log_likelihood, change_per_voxel)``.
        When it also has a ``phase(name)`` method, that is called as each phase starts
        (``"initialisation"``, ``"EM"``, ``"bias field EM"``, ``"MRF sweep <n>"``; the file
        functions add ``"writing"``).

    Attributes
    ----------
    weights_ : (K,) array
    means_ : (K, D) array
    covariances_ : (K, D, D) array
    precisions_cholesky_ : (K, D, D) array
    log_likelihood_trace_ : list of float
        Total log-likelihood ``sum_n log p(x_n)`` after each iteration.
    initial_log_likelihood_ : float
        The log-likelihood of the initial parameters.
    log_likelihood_ : float
        The last entry of the trace.
    n_iter_ : int
    converged_ : bool
    variance_floor_ : (D,) array
    n_features_in_ : int
    n_samples_ : float
        Number of voxels fitted (sum of sample weights).
    fit_path_ : str
        ``"distinct-values"`` or ``"per-voxel"`` (``"grid"`` for the spatial model).
    soft_counts_ : (K,) array
        Sum of each component's responsibilities over the fitted voxels (final E-step).
    warnings_ : list of str
        The convergence and data warnings the last fit issued (also recorded in the sidecar).

    Notes
    -----
    E-step: ``r_nk = pi_k N(x_n|mu_k,Sigma_k) / sum_j pi_j N(x_n|mu_j,Sigma_j)`` in the log
    domain. M-step: ``N_k = sum_n r_nk``, ``mu_k = sum_n r_nk x_n / N_k``,
    ``Sigma_k = sum_n r_nk (x_n-mu_k)(x_n-mu_k)^T / N_k``, ``pi_k = N_k / N``.

    References
    ----------
    Dempster, Laird & Rubin (1977). J. R. Stat. Soc. B 39(1), 1-38.

    Examples
    --------
    >>> import numpy as np
    >>> from segment import GaussianMixtureEM
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(0, 1, 500), rng.normal(10, 2, 500)])
    >>> gm = GaussianMixtureEM(n_components=2).fit(X)
    >>> np.round(gm.means_.ravel())
    array([ 0., 10.])
    """

    def __init__(
        self,
        n_components: int = 6,
        *,
        max_iter: int = 300,
        tol: float = 1e-4,
        variance_floor: float | np.ndarray | None = None,
        random_state: int | None = 0,
        means_init: np.ndarray | None = None,
        covariances_init: np.ndarray | None = None,
        weights_init: np.ndarray | None = None,
        sort_components: bool = True,
        chunk_size: int | None = None,
        scheduler: Any = None,
        n_workers: int | None = None,
        distinct_values: bool | str = "auto",
        init_sample_size: int = 200_000,
        mrf_beta: float = 0.0,
        bias_field: bool = False,
        bias_smoothness: float = 40.0,
        callback: Callable[[int, float, float], None] | None = None,
        posterior_memory_limit: float | None = None,
        pv_fit: bool = False,
    ):
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.variance_floor = variance_floor
        self.random_state = random_state
        self.means_init = means_init
        self.covariances_init = covariances_init
        self.weights_init = weights_init
        self.sort_components = sort_components
        self.chunk_size = chunk_size
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.distinct_values = distinct_values
        self.init_sample_size = init_sample_size
        self.mrf_beta = mrf_beta
        self.bias_field = bias_field
        self.bias_smoothness = bias_smoothness
        self.callback = callback
        self.posterior_memory_limit = posterior_memory_limit
        self.pv_fit = pv_fit

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Any, y: None = None, sample_weight: Any = None) -> GaussianMixtureEM:
        """Fit the mixture by EM.

        Parameters
        ----------
        X : (N, D) or (N,) numpy or Dask array
            Voxel features (intensities of D co-registered channels).
        y : ignored
        sample_weight : (N,) array, optional
            How many voxels each row stands for.

        Returns
        -------
        self
        """
        self.validate_parameters()
        if self.uses_grid:
            raise SegmentError(
                "mrf_beta > 0 and bias_field=True need the image grid: call "
                "SpatialGaussianMixture(...).fit_image(image, mask, spacing=...) instead of fit(X)"
            )
        self.__dict__.pop("spatial_model_", None)
        with recorded_warnings(self):
            return self._fit_flat(X, sample_weight)

    def _fit_flat(self, X: Any, sample_weight: Any = None) -> GaussianMixtureEM:
        X = _validation.check_features(X)
        sample_weight = _validation.check_sample_weight(sample_weight, X.shape[0])
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            data = self._fit_mixture(X, sample_weight, ckw)
            if self.pv_fit:
                params = self._fit_tissues(*_tissue_sample(data, X, sample_weight))
                self.soft_counts_ = self._statistics(data, params, ckw)["nk"]
        if self.sort_components:
            self._sort_components()
        return self

    def _fit_mixture(self, X, sample_weight, ckw, quiet: bool = False) -> _initialise.FitData:
        """Prepare, initialise and run EM on (N, D) features; returns the prepared data.

        ``quiet``: no :class:`ConvergenceWarning` (a later EM continues from this one).
        """
        n_features = X.shape[1]
        self.pv_model_ = self.pv_trace_ = self.pv_fit_status_ = None  # set by _fit_tissues
        floor = _validation.check_variance_floor(self.variance_floor, n_features)
        init = _validation.check_initial_parameters(
            self.means_init, self.covariances_init, self.weights_init,
            self.n_components, n_features,
        )  # fmt: skip
        data = self._prepare(X, sample_weight, ckw)
        if floor is None:
            floor = RELATIVE_VARIANCE_FLOOR * data.moments["m2"] / data.moments["n"]
        self.variance_floor_ = floor
        self._announce("initialisation")
        weights, means, covariances = self._initial_parameters(data, init, floor, ckw)
        self._announce("EM")
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore", ConvergenceWarning)
            self._run_em(data, weights, means, covariances, floor, ckw)
        return data

    def _fit_tissues(self, values: np.ndarray, counts: np.ndarray | None) -> tuple:
        """Replace the Gaussians by the mixed-voxel model's tissue Gaussians (``pv_fit``, see
        :func:`_tissue_gaussians`); returns ``(weights, means, precisions_cholesky)``."""
        self._announce("partial-volume tissue fit")
        return _tissue_gaussians(self, values, counts)

    def fit_image(
        self,
        image: Any,
        mask: Any = None,
        *,
        spacing: tuple[float, ...] | None = None,
        channel_axis: int | None = None,
    ) -> GaussianMixtureEM:
        """Deprecated: fit a :class:`~segment.SpatialGaussianMixture` with these parameters
        (kept as ``spatial_model_``) and copy its fitted attributes here."""
        return _fit_image_shim(self, image, mask, spacing, channel_axis)

    def __getattr__(self, name: str) -> Any:
        # only reached when the normal lookup fails: the spatial attributes after fit_image
        if name in _SPATIAL_ATTRIBUTES:
            model = self.__dict__.get("spatial_model_")
            if model is not None:
                return getattr(model, name)
            if name in ("bias_field_", "bias_field_shape_"):
                return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _announce(self, phase: str) -> None:
        """Tell a callback object with a ``phase(name)`` method which phase starts."""
        announce = getattr(self.callback, "phase", None)
        if callable(announce):
            announce(phase)

    def validate_parameters(self) -> None:
        """Check the constructor's parameters; :class:`SegmentError` says what to fix."""
        check_parameters(self)

    @property
    def uses_grid(self) -> bool:
        """True when the MRF prior or the bias field is on: fit with :meth:`fit_image`."""
        return self.mrf_beta > 0 or bool(self.bias_field)

    def _prepare(self, X: Any, sample_weight: Any, ckw: dict) -> _initialise.FitData:
        """Chunk the features, check them in one pass, and pick the fit path."""
        return _initialise.prepare(
            X, sample_weight, self.n_components, self.chunk_size, self.distinct_values, ckw
        )

    def _initial_parameters(self, data: _initialise.FitData, init: tuple, floor, ckw: dict):
        """Explicit initial parameters, completed by weighted k-means where not given."""
        return _initialise.initial_parameters(
            data, init, floor, self.n_components, self.random_state, self.init_sample_size, ckw
        )

    # ------------------------------------------------------------------ the EM loop
    def _statistics(self, data: _initialise.FitData, params: tuple, ckw: dict) -> _em.Statistics:
        """E-step: the sufficient statistics of ``params`` over all voxels."""
        if data.path == "distinct-values":
            return _em.chunk_statistics(data.X, *params, sample_weight=data.sample_weight)
        return _chunked.statistics(data.X, params, data.sample_weight, ckw)

    def _run_em(self, data, weights, means, covariances, floor, ckw) -> None:
        """The EM loop: E-step (chunked statistics), M-step, trace, convergence."""
        try:
            params = (weights, means, _em.precision_cholesky(covariances))
        except np.linalg.LinAlgError:
            raise SegmentError(
                "an initial covariance is not positive definite; give covariances_init "
                "or raise variance_floor"
            ) from None
        stats = self._statistics(data, params, ckw)
        self.initial_log_likelihood_ = stats["log_likelihood"]
        iteration, trace, params, covariances, change, stats = self._em_iterations(
            stats, params, floor, lambda params: self._statistics(data, params, ckw)
        )
        self.soft_counts_ = stats["nk"].copy()
        self._finish(iteration, trace, params, covariances, change, data, params[1].shape[1])

    def _em_iterations(self, stats, params, floor, statistics, after_m_step=None, tol=None):
        """EM iterations from the E-step statistics ``stats`` of ``params``.

        Each iteration: M-step, ``after_m_step(params, covariances)`` (the bias field's update),
        E-step ``statistics(params)``, trace and callback; it stops when the log-likelihood per
        voxel changes by less than ``tol`` (default ``self.tol``). Returns ``(iteration, trace,
        params, covariances, change, stats)`` of the last iteration.
        """
        tol = self.tol if tol is None else tol
        n_samples, previous = stats["n_samples"], stats["log_likelihood"]
        trace: list[float] = []
        self.converged_ = False
        for iteration in range(1, self.max_iter + 1):
            weights, means, covariances = _em.m_step(stats, params[1], floor)
            weights, means, covariances = _reseed_empty(stats["nk"], weights, means, covariances)
            params = (weights, means, _em.precision_cholesky(covariances))
            if after_m_step is not None:
                after_m_step(params, covariances)
            stats = statistics(params)
            trace.append(stats["log_likelihood"])
            change = (stats["log_likelihood"] - previous) / n_samples
            previous = stats["log_likelihood"]
            if self.callback is not None:
                self.callback(iteration, stats["log_likelihood"], change)
            if abs(change) < tol:
                self.converged_ = True
                break
        return iteration, trace, params, covariances, change, stats

    def _finish(self, iteration, trace, params, covariances, change, data, n_features) -> None:
        """Store the fitted attributes and warn when EM did not converge."""
        self.n_iter_ = iteration
        self.log_likelihood_trace_ = trace
        self.log_likelihood_ = trace[-1]
        self.weights_, self.means_ = params[0], params[1]
        self.covariances_, self.precisions_cholesky_ = covariances, params[2]
        self.n_features_in_ = n_features
        self.n_samples_ = data.moments["n"]
        self.fit_path_ = "grid" if self.uses_grid else data.path
        if not self.converged_:
            warnings.warn(
                f"EM did not converge in max_iter={self.max_iter} iterations: the last change "
                f"was {change:.3g} nats per voxel (stopping needs |change| < tol={self.tol}); "
                "raise max_iter, loosen tol or raise variance_floor",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _sort_components(self) -> np.ndarray:
        order = np.argsort(self.means_[:, 0], kind="stable")
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "soft_counts_"):
            setattr(self, name, getattr(self, name)[order])
        return order


@contextlib.contextmanager
def recorded_warnings(estimator: GaussianMixtureEM) -> Iterator[None]:
    """Record a fit's warnings in ``estimator.warnings_`` (for the sidecar) and re-issue them."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        estimator.warnings_ = [
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if issubclass(w.category, (ConvergenceWarning, DataWarning))
        ]
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_parameters(estimator: GaussianMixtureEM) -> None:
    """Check an estimator's constructor parameters; :class:`SegmentError` says what to fix."""
    _kernels.notify_if_slow()  # once per process, when the compiled kernels are off
    _validation.check_n_components(estimator.n_components)
    _validation.check_positive("max_iter", estimator.max_iter, integer=True)
    _validation.check_positive("tol", estimator.tol, allow_zero=True)
    _validation.check_positive("init_sample_size", estimator.init_sample_size, integer=True)
    if estimator.chunk_size is not None:
        _validation.check_positive("chunk_size", estimator.chunk_size, integer=True)
    if estimator.distinct_values not in ("auto", True, False):
        raise SegmentError(
            f"distinct_values must be 'auto', True or False, got {estimator.distinct_values!r}"
        )
    _validation.check_positive("mrf_beta", estimator.mrf_beta, allow_zero=True)
    _validation.check_positive("bias_smoothness", estimator.bias_smoothness)
    if estimator.pv_fit not in (True, False):
        raise SegmentError(f"pv_fit must be True or False, got {estimator.pv_fit!r}")
    if estimator.pv_fit and estimator.n_components < 2:
        raise SegmentError(
            f"pv_fit needs at least 2 classes to mix, got n_components={estimator.n_components}"
        )
    if estimator.bias_field not in (True, False):
        raise SegmentError(f"bias_field must be True or False, got {estimator.bias_field!r}")
    try:
        check_scheduler(estimator.scheduler)
    except ValueError as error:
        raise SegmentError(str(error)) from None


def _fit_image_shim(estimator: GaussianMixtureEM, image, mask, spacing, channel_axis):
    """The deprecated :meth:`GaussianMixtureEM.fit_image`."""
    # The one import from the layer above (test_architecture.ALLOWED_UPWARD): a shim.
    from .spatial.model import SpatialGaussianMixture

    message = "GaussianMixtureEM.fit_image is deprecated: use segment.SpatialGaussianMixture"
    warnings.warn(f"{message}(...).fit_image (same parameters)", DeprecationWarning, 3)
    model = SpatialGaussianMixture(**estimator.get_params(deep=False))
    try:
        model.fit_image(image, mask, spacing=spacing, channel_axis=channel_axis)
    finally:
        estimator.warnings_ = getattr(model, "warnings_", [])
    estimator.__dict__.update(
        (name, value) for name, value in vars(model).items()
        if name.endswith("_") and not name.startswith("_")
    )  # fmt: skip
    estimator.spatial_model_ = model
    return estimator


def _tissue_gaussians(estimator: GaussianMixtureEM, values, counts) -> tuple:
    """The tissue fit of ``pv_fit`` on ``values`` (n, D) and ``counts`` (n,) or None (see
    :func:`_tissue_sample`): sets ``pv_model_``, ``pv_trace_`` and ``pv_fit_status_`` and the
    class parameters. The mixture stands, with a :class:`DataWarning`, for several channels
    (the model's EM then runs on voxels, not on a histogram: far too slow) or when no start of
    the model keeps every class (:func:`segment.partial_volume.fit_tissues`)."""
    from . import partial_volume

    est, fitted, problem = estimator, None, "it is implemented for one channel"
    if values.shape[1] == 1:
        fitted = partial_volume.fit_tissues(
            values, counts, est.weights_, est.means_, est.covariances_, est.variance_floor_
        )
        problem = "the partial-volume model lost a class"
    if fitted is None:
        est.pv_fit_status_ = f"not applied: {problem}"
        warnings.warn(
            f"pv_fit not applied: {problem}; the mixture's Gaussians are kept", DataWarning, 5
        )
        return est.weights_, est.means_, est.precisions_cholesky_
    model, trace, (weights, means, covariances) = fitted
    est.pv_model_, est.pv_trace_, est.pv_fit_status_ = model, trace, "applied"
    est.weights_, est.means_, est.covariances_ = weights, means, covariances
    est.precisions_cholesky_ = _em.precision_cholesky(covariances)
    return est.weights_, est.means_, est.precisions_cholesky_


def _tissue_sample(data: _initialise.FitData, X, sample_weight) -> tuple:
    """``(values, counts)`` for the tissue fit of ``pv_fit``: the distinct values and their
    counts when the fit used them, else about ``PV_FIT_SAMPLE`` evenly spaced rows of ``X``."""
    if data.path == "distinct-values":
        return np.asarray(data.X), np.asarray(data.sample_weight)
    every = max(1, X.shape[0] // PV_FIT_SAMPLE)
    weights = None if sample_weight is None else np.asarray(sample_weight[::every])
    return np.asarray(X[::every]), weights


def _reseed_empty(nk, weights, means, covariances):
    """Re-seed components left with less than one voxel by splitting the widest heavy one."""
    empty = np.flatnonzero(nk < MIN_COMPONENT_VOXELS)
    if len(empty) == 0 or len(empty) == len(nk):
        return weights, means, covariances
    weights, means, covariances = weights.copy(), means.copy(), covariances.copy()
    for k in empty:
        spread = weights * np.trace(covariances, axis1=1, axis2=2)
        spread[empty] = -np.inf
        donor = int(np.argmax(spread))
        eigenvalues, eigenvectors = np.linalg.eigh(covariances[donor])
        step = np.sqrt(eigenvalues[-1]) * eigenvectors[:, -1]
        means[k], means[donor] = means[donor] + step, means[donor] - step
        covariances[k] = covariances[donor]
        weights[k] = weights[donor] = weights[donor] / 2
        warnings.warn(
            f"component {k} was left with {nk[k]:.3g} voxels and was re-seeded by splitting "
            f"component {donor}; if this repeats, lower n_components",
            DataWarning,
            stacklevel=4,
        )
    return weights / weights.sum(), means, covariances  # the re-seeded k dropped its old weight
