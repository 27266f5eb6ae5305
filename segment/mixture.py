"""The ``GaussianMixtureEM`` estimator: a thin loop over the EM functions of :mod:`segment._em`."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from . import _chunked, _em, _estimator, _kernels, _kmeans, _spatial, _sweeps, _validation
from ._scheduler import check_scheduler, compute_kwargs, is_distributed
from .exceptions import ConvergenceWarning, DataWarning, SegmentError
from .spatial import bias as _bias

__all__ = ["GaussianMixtureEM"]

#: Default variance floor, as a fraction of each channel's variance over all fitted voxels.
RELATIVE_VARIANCE_FLOOR = 1e-3
#: The distinct-values fast path is used while the data have at most this many distinct rows.
MAX_DISTINCT = 1 << 17
#: Bins of the histogram that one-channel float fits are initialised from (see
#: ``GaussianMixtureEM._init_histogram``).
INIT_HISTOGRAM_BINS = 4096
#: A component whose responsibilities add up to less than one voxel is re-seeded.
MIN_COMPONENT_VOXELS = 1.0
#: Mean-field sweeps stop when the posterior changes by less than this per voxel (half the L1
#: distance, in [0, 1], measured on the 1/255 steps the sweeps keep, whose rounding adds about
#: 0.005 to it) ...; the probability maps are then one more sweep. With 0.01, the rounding
#: noise added two sweeps on the noisy phantoms and the extra smoothing eroded the thin skull
#: (Dice -0.011 against the plain mixture at 9 % noise); 0.02 stops where the float sweeps did.
MRF_TOL = 2e-2
#: ... or after this many sweeps.
MAX_MRF_SWEEPS = 50
#: The bias field's EM runs on a regular sub-grid of at least this many voxels.
BIAS_EM_VOXELS = 100_000


#: Fitted attributes that a discarded bias field restores to the plain mixture's.
_FIT_ATTRIBUTES = (
    "weights_", "means_", "covariances_", "precisions_cholesky_", "log_likelihood_trace_",
    "log_likelihood_", "n_iter_", "converged_", "soft_counts_",
)  # fmt: skip


class _RecordedWarnings:
    """Record the fit's warnings in ``estimator.warnings_`` (for the sidecar) and re-issue them."""

    def __init__(self, estimator: GaussianMixtureEM):
        self.estimator = estimator

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc_info):
        self._catcher.__exit__(*exc_info)
        self.estimator.warnings_ = [
            f"{w.category.__name__}: {w.message}"
            for w in self._caught
            if issubclass(w.category, (ConvergenceWarning, DataWarning))
        ]
        for w in self._caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


@dataclass
class _FitData:
    """The features as the EM loop sees them: in memory (distinct values) or chunked."""

    X: Any  # (M, D) numpy array of distinct rows, or (N, D) Dask array
    sample_weight: Any  # (M,) counts, (N,) Dask weights, or None
    path: str  # "distinct-values" or "per-voxel"
    moments: _em.Moments
    in_memory: np.ndarray | None = None  # the (N, D) features when given as numpy


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
    mrf_beta : float, default 0.0
        Strength of the Potts (Markov random field) prior used by :meth:`fit_image`:
        ``beta * sum_j w_ij [z_i = z_j]`` over the 26-neighbourhood (8 in 2-D), ``w_ij`` = 1 /
        distance in mm. 0 switches it off. It shapes the posterior (labels, probability
        maps), computed by mean-field sweeps, not the class parameters. See
        :mod:`segment._spatial`.
    bias_field : bool, default False
        Estimate a smooth multiplicative bias field inside the EM (:meth:`fit_image` only).
    bias_smoothness : float, default 40.0
        Bias field smoothness in mm: the full width at half maximum of the Gaussian that
        smooths the field's residuals (see :mod:`segment.spatial.bias`).
    callback : callable, optional
        Called after each iteration as ``callback(iteration, log_likelihood, change_per_voxel)``.
        When it also has a ``phase(name)`` method, that is called as each phase starts
        (``"initialisation"``, ``"EM"``, ``"bias field EM"``, ``"MRF sweep <n>"``; the file
        functions add ``"writing"``).
    posterior_memory_limit : float, optional
        Bytes that the MRF posterior maps of :meth:`fit_image` may take, about: above a third
        of it they are not kept (``responsibilities_`` is None) but recomputed from
        ``posterior_grid_`` slab by slab when written. Default: always kept.

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
        ``"distinct-values"``, ``"per-voxel"`` or ``"grid"`` (spatial model).
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
                "fit_image(image, mask, spacing=...) instead of fit(X)"
            )
        with _RecordedWarnings(self):
            return self._fit_flat(X, sample_weight)

    def _fit_flat(self, X: Any, sample_weight: Any = None) -> GaussianMixtureEM:
        X = _validation.check_features(X)
        n_features = X.shape[1]
        sample_weight = _validation.check_sample_weight(sample_weight, X.shape[0])
        floor = _validation.check_variance_floor(self.variance_floor, n_features)
        init = _validation.check_initial_parameters(
            self.means_init, self.covariances_init, self.weights_init,
            self.n_components, n_features,
        )  # fmt: skip
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            data = self._prepare(X, sample_weight, ckw)
            if floor is None:
                floor = RELATIVE_VARIANCE_FLOOR * data.moments["m2"] / data.moments["n"]
            self.variance_floor_ = floor
            self._announce("initialisation")
            weights, means, covariances = self._initial_parameters(data, init, floor, ckw)
            self._announce("EM")
            self._run_em(data, weights, means, covariances, floor, ckw)
        if self.sort_components:
            self._sort_components()
        return self

    def fit_image(
        self,
        image: Any,
        mask: Any = None,
        *,
        spacing: tuple[float, ...] | None = None,
        channel_axis: int | None = None,
    ) -> GaussianMixtureEM:
        """Fit on an image grid, with the MRF prior and bias field when switched on.

        With ``mrf_beta == 0`` and ``bias_field=False`` this is exactly ``fit(image[mask])``.

        Parameters
        ----------
        image : (*spatial) array, or (*spatial, D) with ``channel_axis=-1``
            2-D or 3-D intensities (numpy or Dask).
        mask : (*spatial) bool array, optional
            The voxels to fit (default: all). They must be finite.
        spacing : tuple of float, optional
            Voxel size in mm per spatial axis (default 1 mm), for the MRF weights and the bias
            field's smoothness.
        channel_axis : int, optional
            Axis of ``image`` that holds channels.

        Returns
        -------
        self
            Besides the attributes of :meth:`fit`: ``responsibilities_`` (n_fitted, K) float32
            for the voxels of ``mask`` in C order, ``bias_field_`` (*spatial, D) float32 or
            None, ``bias_coefficients_``, ``objective_`` naming what the trace holds, and with
            the MRF ``n_mrf_sweeps_`` and ``mrf_change_`` (the mean change of the posterior per
            voxel in the last sweep).
        """
        with _RecordedWarnings(self):
            return self._fit_image(image, mask, spacing, channel_axis)

    def _fit_image(self, image, mask, spacing, channel_axis) -> GaussianMixtureEM:
        self.validate_parameters()
        if channel_axis is not None:
            image = da.moveaxis(image, channel_axis, -1) if isinstance(
                image, da.Array) else np.moveaxis(np.asarray(image), channel_axis, -1)  # fmt: skip
        else:
            image = image[..., None]
        spatial_shape = image.shape[:-1]
        mask = np.ones(spatial_shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != spatial_shape:
            raise SegmentError(f"mask shape {mask.shape} differs from image shape {spatial_shape}")
        spacing = tuple(float(v) for v in (spacing or (1.0,) * len(spatial_shape)))
        if len(spacing) != len(spatial_shape) or min(spacing) <= 0:
            raise SegmentError(
                f"spacing must be {len(spatial_shape)} positive voxel sizes in mm, got {spacing}"
            )
        X = _masked_rows(np.asarray(image), mask)
        self._bias_grid = None
        if not self.uses_grid:
            self._fit_flat(X)
            self.objective_ = "log-likelihood"
            return self
        # Work on the bounding box of the mask only: outside it every voxel is unfitted (zero
        # responsibilities), so the neighbour sums and the results are the same.
        box = _bounding_box(mask)
        self.bounding_box_ = box
        features = [X]  # handed over, so that the fit can drop the (N, D) copy when done
        del X
        self._fit_grid(image[box], mask[box], features, spacing)
        if self.bias_field:  # the field on the whole input grid, from the same polynomial
            self._bias_grid = (spatial_shape, tuple(-b.start for b in box), image.shape[-1])
            low, high = np.inf, -np.inf
            for _, planes in self.bias_field_slabs():
                low, high = min(low, float(planes.min())), max(high, float(planes.max()))
            self.bias_field_range_ = (low, high)
        return self

    @property
    def bias_field_(self) -> np.ndarray | None:
        """The fitted multiplicative field on the input grid, (*spatial, D) float32, or None.

        Computed from :attr:`bias_coefficients_` at each access (in slabs, no float64 grid):
        it is as large as the scan in float32, and is not kept.
        """
        if getattr(self, "_bias_grid", None) is None:
            return None
        shape, _, n_channels = self._bias_grid
        field = np.empty(shape + (n_channels,), np.float32)
        for start, planes in self.bias_field_slabs():
            field[start : start + len(planes)] = planes
        return field

    @property
    def bias_field_shape_(self) -> tuple[int, ...] | None:
        """Shape of :attr:`bias_field_`, (*spatial, D), or None without a bias field."""
        if getattr(self, "_bias_grid", None) is None:
            return None
        shape, _, n_channels = self._bias_grid
        return tuple(shape) + (n_channels,)

    def _log_bias_on_input_grid(self, shape, offset, reverse=False):
        """``log b`` on a block of the input grid, offset relative to the input's origin."""
        _, box_offset, _ = self._bias_grid
        start = (
            tuple(o + b for o, b in zip(offset, box_offset[::-1]))
            if reverse
            else tuple(o + b for o, b in zip(offset, box_offset))
        )
        return _bias.log_bias_block(
            shape, start, self.bias_coefficients_, self.bias_cells_, reverse=reverse
        )

    def bias_field_last_axis_slabs(self, step: int):
        """``[field[..., start:start + step, 0]]`` for ``start = 0, step, ...`` (one channel)."""
        shape, _, _ = self._bias_grid
        for start in range(0, shape[-1], step):
            planes = self._log_bias_on_input_grid(
                shape[:-1] + (min(step, shape[-1] - start),), (0,) * (len(shape) - 1) + (start,)
            )
            yield [np.exp(planes[..., 0])]

    def bias_field_slabs(self, step: int = 16):
        """``(start, field[start:start + step])`` along the first axis of the input grid."""
        shape, _, _ = self._bias_grid
        for start in range(0, shape[0], step):
            planes = self._log_bias_on_input_grid(
                (min(step, shape[0] - start),) + shape[1:], (start,) + (0,) * (len(shape) - 1)
            )
            yield start, np.exp(planes, out=planes)

    def _fit_grid(self, image, mask, features, spacing) -> GaussianMixtureEM:
        """The mixture with a bias field and/or the MRF posterior, over spatial blocks.

        The class parameters and the field are those of the mixture (fitted from its own
        responsibilities of the bias-corrected intensities); the MRF prior then shapes the
        posterior (labels, probability maps), which mean-field sweeps compute at the fitted
        parameters. Updating the class parameters from the MRF posterior instead (HMRF-EM) let a
        thin class (CSF) drift into a boundary class on noisy whole-head phantoms; weighting the
        field by it was slower and no more accurate. See the README.
        """
        K, D = self.n_components, image.shape[-1]
        floor = _validation.check_variance_floor(self.variance_floor, D)
        init = _validation.check_initial_parameters(
            self.means_init, self.covariances_init, self.weights_init, K, D
        )
        beta = float(self.mrf_beta)
        kernel = _spatial.neighbour_kernel(spacing)
        cells = _bias.field_cells(spacing, self.bias_smoothness)
        coarse_shape = _bias.coarse_shape(mask.shape, cells)
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            data = self._prepare(_validation.check_features(features.pop()), None, ckw)
            if floor is None:
                floor = RELATIVE_VARIANCE_FLOOR * data.moments["m2"] / data.moments["n"]
            self.variance_floor_ = floor
            self._announce("initialisation")
            weights, means, covariances = self._initial_parameters(data, init, floor, ckw)
            self._announce("EM")
            # The plain mixture first, on the fast distinct-values path when it can: with no
            # bias field it is the fit; with one, the field's EM starts from it.
            with warnings.catch_warnings():
                if self.bias_field:
                    warnings.simplefilter("ignore", ConvergenceWarning)
                self._run_em(data, weights, means, covariances, floor, ckw)
            params = (self.weights_, self.means_, self.precisions_cholesky_)

            coefficients = np.zeros((D, *coarse_shape))
            self.bias_status_ = None
            if self.bias_field:
                coefficients, params = self._fit_bias_field(
                    image, mask, params, floor, cells, spacing, data, ckw
                )
            del data
        n_threads = 1 if self.scheduler == "synchronous" else (self.n_workers or os.cpu_count())
        rows = _sweep_rows(mask.shape[::-1], self.chunk_size, n_threads)  # the grid's axes reversed

        def log_bias(shape, offset, reverse=False):
            if not self.bias_field:
                return np.zeros(shape + (D,), np.float32)
            return _bias.log_bias_block(shape, offset, coefficients, cells, reverse=reverse)

        # the mixture's responsibilities under the final field, then the MRF posterior
        grid = _sweeps.PosteriorGrid(
            np.asarray(image), mask, params, kernel, log_bias, rows, n_threads
        )
        grid.sweep(0.0)
        self.n_mrf_sweeps_, self.mrf_change_ = 0, None
        while beta > 0 and self.n_mrf_sweeps_ < MAX_MRF_SWEEPS:
            self._announce(f"MRF sweep {self.n_mrf_sweeps_ + 1}")
            # from the second MRF sweep, voxels whose neighbours did not move are kept
            self.mrf_change_ = grid.sweep(beta, skip_settled=self.n_mrf_sweeps_ > 0)
            self.n_mrf_sweeps_ += 1
            if self.mrf_change_ < MRF_TOL:
                break
        else:
            if beta > 0:
                warnings.warn(
                    f"the MRF mean-field sweeps did not settle in {MAX_MRF_SWEEPS} sweeps "
                    f"(mean change {self.mrf_change_:.3g} per voxel); lower mrf_beta",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        self.fit_path_ = "grid"
        self.objective_ = (
            "log-likelihood of the observed intensities, bias Jacobian included"
            if self.bias_field
            else "log-likelihood"
        ) + (
            "; the MRF prior shapes the posterior (labels, probability maps), computed by "
            "mean-field sweeps at the fitted parameters, not the parameters themselves"
            if beta > 0
            else ""
        )
        self.bias_coefficients_ = coefficients
        self.bias_cells_ = cells
        self.posterior_grid_ = None
        if self.sort_components:  # the estimator's parameters and the grid's, in mean order
            self.soft_counts_ = np.zeros(K)  # set below, from the sorted posterior
            order = self._sort_components()
            grid.params = (self.weights_, self.means_, self.precisions_cholesky_)
            for start in range(0, len(grid.state), 8):  # in place, a few planes at a time
                planes = grid.state[start : start + 8]
                planes[..., :K] = planes[..., order]
        budget = self.posterior_memory_limit
        if budget is not None and mask.size * K * 4 > budget / 3:
            # too big to hold: the maps are recomputed slab by slab when they are written
            self.posterior_grid_, self.responsibilities_, self.soft_counts_ = grid, None, None
            return self
        final = grid.probabilities(beta)
        del grid
        self.responsibilities_ = _masked_rows(final, mask)
        del final
        # the expected number of voxels of each class under the returned posterior
        self.soft_counts_ = _column_sums(self.responsibilities_)
        return self

    def _fit_bias_field(self, image, mask, params, floor, cells, spacing, data, ckw):
        """EM of the class parameters with the bias field, on a regular sub-grid of the voxels.

        Every ``s``-th voxel along each axis, with ``s`` the largest step that keeps at least
        :data:`BIAS_EM_VOXELS` of the mask (as SPM fits its model on voxels a sampling distance
        apart). Each iteration is one pass over the sub-grid
        (:func:`segment.spatial.bias.em_block`: the E-step of the corrected intensities and the
        per-class cell sums of their log intensities), then the M-step and, from the same sums
        and the new means, the field. The field is then kept only when the classes agree on
        it and no class lost most of its voxels to it; otherwise the plain mixture stands and a
        :class:`DataWarning` says why (``bias_status_``). Returns the field's coarse values
        and the parameters.
        """
        n_spatial, n_features = mask.ndim, image.shape[-1]
        ratio = (mask.sum() / BIAS_EM_VOXELS) ** (1 / n_spatial)
        subs = tuple(max(1, min(round(ratio), size // 4)) for size in mask.shape)
        picks = tuple(slice(None, None, s) for s in subs)
        sub_mask = mask[picks]
        chunks = _chunked.grid_chunks(sub_mask.shape, self.chunk_size)
        x_grid = _chunked.as_grid_array(image[picks], chunks)
        mask_grid = _chunked.as_grid_array(sub_mask, chunks)
        if is_distributed(ckw):
            x_grid, mask_grid = ckw["scheduler"].persist([x_grid, mask_grid])
        shape = _bias.coarse_shape(mask.shape, cells)
        sigma = tuple(
            self.bias_smoothness * _bias.FWHM_TO_SIGMA / (c * size)
            for c, size in zip(cells, spacing)
        )
        plain = (self.weights_.copy(), self.means_.copy(), self.covariances_.copy())
        plain_fit = {name: getattr(self, name) for name in _FIT_ATTRIBUTES}
        state = {"coarse": np.zeros((n_features, *shape)), "tissue_cv": 0.0}

        def statistics(params):  # the E-step under the current field, and its cell sums
            stats, state["sums"] = _chunked.map_reduce_grid(
                _bias.em_block, functools.partial(_bias.combine_em_blocks, shape=shape),
                [x_grid, mask_grid], n_spatial, (state["coarse"], cells, subs, *params), ckw,
                with_offset=True,
            )  # fmt: skip
            return stats

        def refit_field(params, covariances):  # from the last E-step's sums, the new means
            residuals = _bias.residual_sums(
                state["sums"], params[1], covariances, state["tissue_cv"]
            )
            state["coarse"] = _bias.smooth_log_field(residuals, n_features, sigma)

        self._announce("bias field EM")
        iteration, trace, params, covariances, change, stats = self._em_iterations(
            statistics(params), params, floor, statistics, refit_field
        )
        # Refinement: from there, EM goes on with each class's weight capped by its anatomical
        # spread (TISSUE_CV). The snr^2-weighted field, led by white matter, locks onto a strong
        # field from the plain start; capped weights from the start lose it (benchmarks/README).
        state["tissue_cv"] = _bias.TISSUE_CV
        more, more_trace, params, covariances, change, stats = self._em_iterations(
            stats, params, floor, statistics, refit_field
        )
        iteration, trace = iteration + more, trace + more_trace
        scale = float(mask.sum()) / float(sub_mask.sum())
        self._finish(self.n_iter_ + iteration,
                     self.log_likelihood_trace_ + [value * scale for value in trace],
                     params, covariances, change, data, n_features)  # fmt: skip
        self.bias_sampling_ = subs
        problem = self._bias_problem(
            plain[0], state["sums"], covariances, sigma, float(sub_mask.sum())
        )
        if problem is None:
            self.bias_status_ = "applied"
            return state["coarse"], params
        for name, value in plain_fit.items():  # the plain mixture stands
            setattr(self, name, value)
        self.bias_status_ = f"not applied: {problem}"
        warnings.warn(
            f"bias field not applied: {problem}; the plain mixture's result is kept",
            DataWarning,
            stacklevel=4,
        )
        weights, means, covariances = plain
        return np.zeros_like(state["coarse"]), (weights, means, _em.precision_cholesky(covariances))

    def _bias_problem(self, plain_weights, sums, covariances, sigma, n_voxels) -> str | None:
        """Why the fitted field should not be used, or None.

        A class that lost three quarters of its weight to the field (or all but 0.1 % of the
        voxels) means the field absorbed the contrast between classes; classes that do not agree
        on the field (:func:`segment.spatial.bias.class_agreement`) mean it explains anatomy,
        not a non-uniformity.
        """
        K = self.n_components
        per_class = _bias.class_sums(sums, self.means_)
        counts = np.array([per_class[2 * k + 1].sum() for k in range(K)])
        for k in range(K):
            if self.weights_[k] < 0.25 * plain_weights[k] or counts[k] < 1e-3 * n_voxels:
                return (
                    f"class {k + 1} (mean {self.means_[k, 0]:.4g}) would keep "
                    f"{self.weights_[k]:.1%} of the voxels against {plain_weights[k]:.1%} "
                    "without the field; raise bias_smoothness (--bias-smoothness)"
                )
        snr2 = self.means_[:, 0] ** 2 / covariances[:, 0, 0]
        voxels = sums[2 * K * self.means_.shape[1]]
        agreement, pair = _bias.class_agreement(per_class, voxels, snr2, sigma)
        self.bias_agreement_ = agreement
        if pair is not None and agreement < _bias.MIN_AGREEMENT:
            return (
                f"classes {pair[0] + 1} and {pair[1] + 1} do not agree on a field (correlation "
                f"{agreement:.2f} < {_bias.MIN_AGREEMENT}): the image shows no consistent "
                "non-uniformity"
            )
        return None

    def _announce(self, phase: str) -> None:
        """Tell a callback object with a ``phase(name)`` method which phase starts."""
        announce = getattr(self.callback, "phase", None)
        if callable(announce):
            announce(phase)

    def validate_parameters(self) -> None:
        """Check the constructor's parameters; :class:`SegmentError` says what to fix."""
        _kernels.notify_if_slow()  # once per process, when the compiled kernels are off
        _validation.check_n_components(self.n_components)
        _validation.check_positive("max_iter", self.max_iter, integer=True)
        _validation.check_positive("tol", self.tol, allow_zero=True)
        _validation.check_positive("init_sample_size", self.init_sample_size, integer=True)
        if self.chunk_size is not None:
            _validation.check_positive("chunk_size", self.chunk_size, integer=True)
        if self.distinct_values not in ("auto", True, False):
            raise SegmentError(
                f"distinct_values must be 'auto', True or False, got {self.distinct_values!r}"
            )
        _validation.check_positive("mrf_beta", self.mrf_beta, allow_zero=True)
        _validation.check_positive("bias_smoothness", self.bias_smoothness)
        if self.bias_field not in (True, False):
            raise SegmentError(f"bias_field must be True or False, got {self.bias_field!r}")
        try:
            check_scheduler(self.scheduler)
        except ValueError as error:
            raise SegmentError(str(error)) from None

    @property
    def uses_grid(self) -> bool:
        """True when the MRF prior or the bias field is on: fit with :meth:`fit_image`."""
        return self.mrf_beta > 0 or bool(self.bias_field)

    def _prepare(self, X: Any, sample_weight: Any, ckw: dict) -> _FitData:
        """Chunk the features, check them in one pass, and pick the fit path."""
        Xd = _chunked.as_feature_array(X, self.chunk_size)
        wd = None
        if sample_weight is not None:
            wd = (
                sample_weight.rechunk((Xd.chunks[0],))
                if isinstance(sample_weight, da.Array)
                else da.from_array(sample_weight, chunks=(Xd.chunks[0],))
            )
        if is_distributed(ckw):
            Xd, wd = (
                ckw["scheduler"].persist([Xd, wd])
                if wd is not None
                else (ckw["scheduler"].persist(Xd), None)
            )
        moments = _chunked.moments(Xd, wd, ckw)
        _validation.check_data_summary(moments, self.n_components)

        use_distinct = self.distinct_values is True or (
            self.distinct_values == "auto" and Xd.dtype.kind in "iub"
        )
        if use_distinct and wd is None:
            distinct = _chunked.distinct_rows(Xd, MAX_DISTINCT, ckw)
            if distinct is not None:
                values, counts = distinct
                _validation.check_n_distinct(len(values), self.n_components)
                return _FitData(values, counts, "distinct-values", moments)
        if use_distinct and self.distinct_values is True:
            raise SegmentError(
                "distinct_values=True needs no sample_weight and at most "
                f"{MAX_DISTINCT} distinct rows; use distinct_values='auto'"
            )
        in_memory = X if isinstance(X, np.ndarray) and sample_weight is None else None
        return _FitData(Xd, wd, "per-voxel", moments, in_memory)

    def _initial_parameters(self, data: _FitData, init: tuple, floor: np.ndarray, ckw: dict):
        """Explicit initial parameters, completed by weighted k-means where not given."""
        means, covariances, weights = init
        if means is not None and covariances is not None and weights is not None:
            return weights, means, covariances
        rng = np.random.default_rng(self.random_state)
        sample, sample_weight = self._init_sample(data, rng, ckw)
        _, labels = _kmeans.kmeans(sample, sample_weight, self.n_components, rng)
        k_weights, k_means, k_covariances = _kmeans.parameters_from_clusters(
            sample, sample_weight, labels, self.n_components
        )
        k_weights = np.maximum(k_weights, _em.EPS)
        return (
            k_weights / k_weights.sum() if weights is None else weights,
            k_means if means is None else means,
            _em.floor_covariances(k_covariances, floor) if covariances is None else covariances,
        )

    def _init_sample(self, data: _FitData, rng: np.random.Generator, ckw: dict):
        """All distinct rows with their counts, a histogram, or a seeded subsample of voxels.

        One float channel with more voxels than ``init_sample_size`` is summarised by a fine
        histogram of all its voxels (:meth:`_init_histogram`; the initial parameters, and so
        fitted results to within EM's tolerance, differ from those of the subsample used
        before). Otherwise the subsample is stratified
        (:func:`segment._kmeans.stratified_indices`): one voxel drawn with ``rng`` in each run
        of ``N / init_sample_size`` consecutive voxels. It
        replaced ``rng.choice`` without replacement, which, sorted, cost 0.2 s of serial time
        per 10^7 voxels before the first E-step; initial parameters (and so fitted results, to
        within EM's tolerance, or another local optimum of k-means) differ from those of
        segment versions before the change.
        """
        if data.path == "distinct-values":
            return data.X.astype(np.float64), data.sample_weight
        n_samples = data.X.shape[0]
        if (
            data.X.shape[1] == 1 and data.sample_weight is None
            and data.X.dtype.kind == "f" and n_samples > self.init_sample_size
        ):  # fmt: skip
            centres, counts = self._init_histogram(data, ckw)
            if len(centres) >= self.n_components:  # else: a few values, counted below
                return centres, counts
        if n_samples > self.init_sample_size:
            indices = _kmeans.stratified_indices(n_samples, self.init_sample_size, rng)
        else:
            indices = np.arange(n_samples)
        if data.in_memory is not None:  # plain indexing: dask's fancy indexing is serial work
            sample = data.in_memory[indices].astype(np.float64)
        else:
            sample = _chunked.take_rows(data.X, indices, ckw).astype(np.float64)
        weight = (
            np.ones(len(sample))
            if data.sample_weight is None
            else _chunked.take_rows(data.sample_weight[:, None], indices, ckw)[:, 0]
        )
        n_distinct = _kmeans.count_distinct(sample, self.n_components)
        if n_distinct < self.n_components:  # the subsample may miss rare values: count them all
            distinct = _chunked.distinct_rows(data.X, MAX_DISTINCT, ckw)
            if distinct is None:
                raise SegmentError(
                    f"the initialisation sample holds only {n_distinct} distinct values; "
                    "raise init_sample_size or give means_init"
                )
            _validation.check_n_distinct(len(distinct[0]), self.n_components)
            return distinct[0].astype(np.float64), distinct[1]
        return sample, weight

    def _init_histogram(self, data: _FitData, ckw: dict):
        """The occupied bins of a fine histogram of all voxels, weighted by their counts.

        For one float channel with more voxels than ``init_sample_size``: a parallel pass
        counts the voxels in :data:`INIT_HISTOGRAM_BINS` equal bins between the extremes the
        moments pass found, and k-means runs on the centres of the occupied bins. It sees
        every voxel (a subsample sees ``init_sample_size``), its k-means costs nothing next to
        one on 200 000 points (which was most of the fit's serial time), and the counts do not
        depend on the chunks. A bin is (max - min) / 4096 wide: k-means centres land within
        half of that, a negligible shift for a starting point.
        """
        low = float(data.moments["minimum"][0])
        high = float(data.moments["maximum"][0])
        counts = _chunked.histogram(data.X, low, high, INIT_HISTOGRAM_BINS, ckw)
        width = (high - low) / INIT_HISTOGRAM_BINS
        centres = low + (np.arange(INIT_HISTOGRAM_BINS) + 0.5) * width
        occupied = counts > 0
        return centres[occupied][:, None], counts[occupied]

    def _statistics(self, data: _FitData, params: tuple, ckw: dict) -> _em.Statistics:
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
                "raise max_iter, loosen tol "
                "or raise variance_floor",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _sort_components(self) -> np.ndarray:
        order = np.argsort(self.means_[:, 0], kind="stable")
        self.weights_ = self.weights_[order]
        self.means_ = self.means_[order]
        self.covariances_ = self.covariances_[order]
        self.precisions_cholesky_ = self.precisions_cholesky_[order]
        self.soft_counts_ = self.soft_counts_[order]
        return order

    # ------------------------------------------------------------------ prediction
    @property
    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.weights_, self.means_, self.precisions_cholesky_

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities ``r_nk``, (N, K): numpy for numpy input, lazy Dask for Dask input."""
        X = self._check_fitted_features(X)
        lazy = isinstance(X, da.Array)
        proba = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _responsibilities_block, self.n_components, np.float64, self._params,
        )  # fmt: skip
        return proba if lazy else self._compute(proba)

    def predict(self, X: Any) -> Any:
        """Most responsible component of each voxel, 0..K-1 in ``means_`` order, shape (N,)."""
        X = self._check_fitted_features(X)
        lazy = isinstance(X, da.Array)
        labels = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _labels_block, 1, np.intp, (*self._params, 0),
        )[:, 0]  # fmt: skip
        return labels if lazy else self._compute(labels)

    def predict_with_proba(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Labels 1..K (uint8, (N,)) and float32 responsibilities (N, K), one E-step per chunk."""
        X = self._check_fitted_features(X)
        both = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _labels_and_responsibilities_block, self.n_components + 1, np.float32, self._params,
        )  # fmt: skip
        both = self._compute(both)
        return both[:, -1].astype(np.uint8), both[:, :-1]

    def predict_labels(self, X: Any) -> np.ndarray:
        """Labels 1..K as uint8, (N,), without keeping any (N, K) array."""
        X = self._check_fitted_features(X)
        labels = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _labels_block, 1, np.uint8, (*self._params, 1),
        )[:, 0]  # fmt: skip
        return self._compute(labels)

    def _responsibility_column(self, X: Any, k: int) -> np.ndarray:
        """Responsibilities of component ``k`` only, (N,) float32, chunk by chunk."""
        X = self._check_fitted_features(X)
        column = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _responsibility_column_block, 1, np.float32, (*self._params, k),
        )  # fmt: skip
        return self._compute(column)[:, 0]

    def fit_predict(self, X: Any, y: None = None) -> Any:
        """``fit(X)`` then ``predict(X)``."""
        return self.fit(X).predict(X)

    def score(self, X: Any, y: None = None) -> float:
        """Mean log-likelihood per voxel, ``(1/N) sum_n log p(x_n)``."""
        X = self._check_fitted_features(X)
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            stats = _chunked.statistics(
                _chunked.as_feature_array(X, self.chunk_size), self._params, None, ckw
            )
        return stats["log_likelihood"] / stats["n_samples"]

    def _compute(self, array: da.Array) -> np.ndarray:
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            if self.scheduler in (None, "threads", "synchronous"):
                # each block written into the result as it is computed: compute() would hold
                # every block's output and their concatenation at once (twice the result)
                out = np.empty(array.shape, array.dtype)
                da.store(array, out, lock=False, **ckw)
                return out
            return array.compute(**ckw)


def _responsibilities_block(X, weights, means, precisions_chol):
    return _em.responsibilities(X, weights, means, precisions_chol)


def _labels_block(X, weights, means, precisions_chol, first_label):
    def rows(X):
        labels = np.argmax(_em.responsibilities(X, weights, means, precisions_chol), axis=1)
        return ((labels + 1).astype(np.uint8) if first_label == 1 else labels)[:, None]

    return _by_value(X, rows)


def _responsibility_column_block(X, weights, means, precisions_chol, k):
    def rows(X):
        return _em.responsibilities(X, weights, means, precisions_chol)[:, k, None].astype(
            np.float32
        )

    return _by_value(X, rows)


def _labels_and_responsibilities_block(X, weights, means, precisions_chol):
    """(N, K + 1) float32: responsibilities, then the 1-based label (exact in float32)."""

    def rows(X):
        resp = _em.responsibilities(X, weights, means, precisions_chol)
        out = np.empty((resp.shape[0], resp.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = resp
        out[:, -1] = np.argmax(resp, axis=1) + 1
        return out

    return _by_value(X, rows)


def _by_value(X, rows):
    """``rows(X)``, for one-channel integer features computed once per value and looked up.

    The same numbers as ``rows(X)`` (each row's result depends on its value only), without
    an (N, K) float64 array or an argmax over N rows: on the 8.7 M-voxel uint8 head the
    labels and maps took 1.2 s this way less.
    """
    X = np.asarray(X)
    if X.dtype.kind in "iu" and X.shape[1] == 1 and len(X):
        low, high = int(X.min()), int(X.max())
        if high - low < min(1 << 16, len(X)):
            table = rows(np.arange(low, high + 1, dtype=X.dtype)[:, None])
            return table[X[:, 0].astype(np.intp) - low]
    return rows(X)


def _sweep_rows(shape: tuple[int, ...], chunk_size: int | None, n_threads: int) -> int:
    """Planes per slab of the MRF sweeps: several per thread, each of at most 2 M voxels.

    A sweep copies the planes that border another slab first, so one-plane slabs would copy
    the whole grid; slabs of ``chunk_size`` voxels are kept when the user set a larger one.
    """
    plane = int(np.prod(shape[1:]))
    largest = max(int(chunk_size or 0), 2_000_000) // max(plane, 1)
    return int(max(2, min(largest, -(-shape[0] // (4 * n_threads)))))


def _masked_rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values[mask]`` for (*spatial, C) values: (n, C), in C order of the mask.

    A view when the mask is full. Otherwise channel by channel: indexing with a mask of fewer
    dimensions than the array makes numpy build int64 indices (24 bytes a voxel in 3-D).
    """
    n_channels = values.shape[-1]
    if mask.all():
        return values.reshape(-1, n_channels)
    out = np.empty((int(np.count_nonzero(mask)), n_channels), values.dtype)
    for c in range(n_channels):
        out[:, c] = values[..., c][mask]
    return out


def _column_sums(values: np.ndarray) -> np.ndarray:
    """Column sums of an (N, K) array in float64, a slab of rows at a time (no full copy)."""
    total = np.zeros(values.shape[1])
    for start in range(0, len(values), 1 << 20):
        total += values[start : start + (1 << 20)].sum(axis=0, dtype=np.float64)
    return total


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask``."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


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
