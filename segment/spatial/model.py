"""The image-level model: a Gaussian mixture on an image grid, with an MRF prior and a bias field.

:class:`SpatialGaussianMixture` runs the plain mixture's EM (:class:`segment.GaussianMixtureEM`,
whose E-step and M-step it reuses) on the voxels of a mask, then the components:

- :class:`segment.spatial.field.BiasField` joins the EM: its :meth:`~BiasField.statistics` is
  the E-step of the corrected intensities, its :meth:`~BiasField.update` runs after each
  M-step (the field-fitting loop is :meth:`SpatialGaussianMixture._fit_bias_field`);
- :class:`segment.spatial.mrf.MRFPrior` shapes the posterior at the fitted parameters by
  mean-field sweeps over the grid (:class:`segment._sweeps.PosteriorGrid`).

The memory budget (``posterior_memory_limit``) decides whether the posterior maps are kept or
recomputed slab by slab from ``posterior_grid_`` when written.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import dask.array as da
import numpy as np

from .. import _em, _validation
from .._scheduler import compute_kwargs
from .._sweeps import PosteriorGrid
from ..exceptions import DataWarning, SegmentError
from ..mixture import PV_FIT_SAMPLE, GaussianMixtureEM, recorded_warnings
from . import bias
from .field import BiasField
from .mrf import MRFPrior

__all__ = ["SpatialGaussianMixture", "bounding_box", "masked_rows"]

#: Fitted attributes that a discarded bias field restores to the plain mixture's.
_FIT_ATTRIBUTES = (
    "weights_", "means_", "covariances_", "precisions_cholesky_", "log_likelihood_trace_",
    "log_likelihood_", "n_iter_", "converged_", "soft_counts_",
)  # fmt: skip


class SpatialGaussianMixture(GaussianMixtureEM):
    """Gaussian mixture on an image grid, with a Potts MRF prior and a multiplicative bias field.

    Takes the parameters of :class:`segment.GaussianMixtureEM`; these are its own:

    mrf_beta : float, default 0.0
        Strength of the Potts (Markov random field) prior ``beta * sum_j w_ij [z_i = z_j]``
        over the 26-neighbourhood (8 in 2-D), ``w_ij`` = 1 / distance in mm. 0 switches it off.
        It shapes the posterior (labels, probability maps), computed by mean-field sweeps, not
        the class parameters (:mod:`segment.spatial.mrf`).
    bias_field : bool, default False
        Estimate a smooth multiplicative bias field inside the EM.
    bias_smoothness : float, default 40.0
        Bias field smoothness in mm: the full width at half maximum of the Gaussian that
        smooths the field's residuals (see :mod:`segment.spatial.bias`).
    posterior_memory_limit : float, optional
        Bytes that the MRF posterior maps may take, about: above a third of it they are not
        kept (``responsibilities_`` is None) but recomputed from ``posterior_grid_`` slab by
        slab when written. Default: always kept.

    Fit with :meth:`fit_image`. The class parameters and the field are those of the mixture
    (fitted from its own responsibilities of the bias-corrected intensities); the MRF prior
    then shapes the posterior. Updating the class parameters from the MRF posterior instead
    (HMRF-EM) let a thin class (CSF) drift into a boundary class on noisy whole-head
    phantoms; weighting the field by it was slower and no more accurate.

    Examples
    --------
    >>> import numpy as np
    >>> from segment import SpatialGaussianMixture
    >>> image = np.zeros((20, 30)); image[:, 15:] = 100  # two halves, much noise
    >>> image += np.random.default_rng(0).normal(0, 30, image.shape)
    >>> truth = np.arange(30)[None, :].repeat(20, axis=0) >= 15
    >>> plain = SpatialGaussianMixture(2).fit_image(image).predict(image.reshape(-1, 1))
    >>> int((plain.reshape(image.shape) != truth).sum())  # misclassified pixels
    27
    >>> model = SpatialGaussianMixture(2, mrf_beta=0.5).fit_image(image)
    >>> labels = model.responsibilities_.argmax(axis=1).reshape(image.shape)
    >>> int((labels != truth).sum())
    5
    """

    #: The components, replaceable by a subclass with the same interface (a better field
    #: model: ``statistics``, ``update``, ``problem``, ``log_bias``...; see their classes).
    bias_model: type[BiasField] = BiasField
    prior_model: type[MRFPrior] = MRFPrior

    def fit_image(
        self,
        image: Any,
        mask: Any = None,
        *,
        spacing: tuple[float, ...] | None = None,
        channel_axis: int | None = None,
    ) -> SpatialGaussianMixture:
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
            None, ``bias_coefficients_``, ``bias_status_``, ``objective_`` naming what the
            trace holds, ``bounding_box_``, ``posterior_grid_`` (when the maps are not kept),
            and with the MRF ``n_mrf_sweeps_`` and ``mrf_change_`` (the mean change of the
            posterior per voxel in the last sweep).
        """
        with recorded_warnings(self):
            return self._fit_image(image, mask, spacing, channel_axis)

    def _fit_image(self, image, mask, spacing, channel_axis) -> SpatialGaussianMixture:
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
        X = masked_rows(np.asarray(image), mask)
        self._bias_grid = None
        if not self.uses_grid:
            self._fit_flat(X)
            self.objective_ = "log-likelihood"
            return self
        # Work on the bounding box of the mask only: outside it every voxel is unfitted (zero
        # responsibilities), so the neighbour sums and the results are the same.
        box = bounding_box(mask)
        self.bounding_box_ = box
        features = [X]  # handed over, so that the fit can drop the (N, D) copy when done
        del X
        self._fit_grid(image[box], mask[box], features, spacing)
        if self.bias_field:  # the field on the whole input grid, from the same coarse values
            self._bias_grid = (spatial_shape, tuple(-b.start for b in box), image.shape[-1])
            low, high = np.inf, -np.inf
            for _, planes in self.bias_field_slabs():
                low, high = min(low, float(planes.min())), max(high, float(planes.max()))
            self.bias_field_range_ = (low, high)
        return self

    def _fit_grid(self, image, mask, features, spacing) -> None:
        """The mixture's EM, the bias field's EM, then the posterior under the MRF prior."""
        field = self.bias_model(self.bias_smoothness, spacing, mask.shape, image.shape[-1])
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            # The plain mixture first, on the fast distinct-values path when it can: with no
            # bias field it is the fit; with one, the field's EM starts from it.
            X = _validation.check_features(features.pop())
            data = self._fit_mixture(X, None, ckw, quiet=self.bias_field)
            del X
            params = (self.weights_, self.means_, self.precisions_cholesky_)
            self.bias_status_ = None
            if self.bias_field:
                params = self._fit_bias_field(field, image, mask, params, data, ckw)
            if self.pv_fit:
                params = self._fit_tissues(*self._tissue_sample(image, mask, field, data))
            del data
        self.bias_coefficients_, self.bias_cells_ = field.coarse, field.cells
        self._posterior_under_prior(image, mask, params, field, spacing)

    def _fit_bias_field(self, field: BiasField, image, mask, params, data, ckw) -> tuple:
        """EM of the class parameters with the bias field, on a regular sub-grid of the voxels.

        Each iteration is one pass over the sub-grid (:meth:`BiasField.statistics`: the E-step
        of the corrected intensities and the per-class cell sums of their log intensities),
        then the M-step and, from the same sums and the new means, the field
        (:meth:`BiasField.update`), in two stages of class weights (see below). The field is
        then kept only when the classes agree on it and no class lost most of its voxels to it
        (:meth:`BiasField.problem`); otherwise the plain mixture stands and a
        :class:`DataWarning` says why (``bias_status_``). Returns the class parameters
        (weights, means, precisions_chol).
        """
        field.sample(image, mask, self.chunk_size, ckw)
        plain_weights = self.weights_.copy()
        plain_fit = {name: getattr(self, name) for name in _FIT_ATTRIBUTES}
        self._announce("bias field EM")
        iteration, trace, stats = 0, [], field.statistics(params)
        # Two stages: snr^2 class weights lock onto a strong field from the plain start; then
        # weights capped by each class's anatomical spread (bias.TISSUE_CV) keep the field from
        # copying white matter's own anatomy (benchmarks/README.md, "capped class weights").
        for tissue_cv in (0.0, bias.TISSUE_CV):
            field.tissue_cv = tissue_cv
            more, more_trace, params, covariances, change, stats = self._em_iterations(
                stats, params, self.variance_floor_, field.statistics, field.update
            )
            iteration, trace = iteration + more, trace + more_trace
        field.release()
        scale = float(mask.sum()) / field.n_sampled
        self._finish(self.n_iter_ + iteration,
                     self.log_likelihood_trace_ + [value * scale for value in trace],
                     params, covariances, change, data, image.shape[-1])  # fmt: skip
        self.bias_sampling_ = field.sampling
        problem, agreement = field.problem(self.weights_, self.means_, covariances, plain_weights)
        if agreement is not None:
            self.bias_agreement_ = agreement
        if problem is None:
            self.bias_status_ = "applied"
            return params
        for name, value in plain_fit.items():  # the plain mixture stands
            setattr(self, name, value)
        self.bias_status_ = f"not applied: {problem}"
        warnings.warn(
            f"bias field not applied: {problem}; the plain mixture's result is kept",
            DataWarning,
            stacklevel=5,
        )
        field.reset()
        return self.weights_, self.means_, _em.precision_cholesky(self.covariances_)

    def _tissue_sample(self, image, mask, field: BiasField, data) -> tuple:
        """``(values, counts)`` for :meth:`_fit_tissues`: the fitted voxels' intensities.

        Without an applied field, the plain fit's distinct values and counts when it has them;
        otherwise the mask's voxels on a regular sub-grid (every ``s``-th voxel along each
        axis, at least ``PV_FIT_SAMPLE`` of them when the mask has that many), divided by the
        field, in C order.
        """
        corrected = self.bias_field and self.bias_status_ == "applied"
        if not corrected and data.path == "distinct-values":
            return np.asarray(data.X), np.asarray(data.sample_weight)
        step = max(1, int((mask.sum() / PV_FIT_SAMPLE) ** (1 / mask.ndim)))
        scale = (step,) * mask.ndim
        picks = tuple(slice(None, None, step) for _ in scale)
        sub_mask = mask[picks]
        values = np.asarray(image[picks])[sub_mask].astype(np.float32)  # (n, D)
        if corrected:
            log_b = bias.log_bias_block(sub_mask.shape, (0,) * mask.ndim, field.coarse,
                                        field.cells, scale)  # fmt: skip
            values /= np.exp(log_b[sub_mask])
        return values, None

    def _posterior_under_prior(self, image, mask, params, field: BiasField, spacing) -> None:
        """The mixture's responsibilities under the final field, then the MRF posterior."""
        K, D = self.n_components, image.shape[-1]
        mrf = self.prior_model(self.mrf_beta, spacing)
        n_threads = 1 if self.scheduler == "synchronous" else (self.n_workers or os.cpu_count())
        rows = sweep_rows(mask.shape[::-1], self.chunk_size, n_threads)  # grid axes reversed

        def log_bias(shape, offset, reverse=False):
            if not self.bias_field:
                return np.zeros(shape + (D,), np.float32)
            return field.log_bias(shape, offset, reverse=reverse)

        grid = PosteriorGrid(np.asarray(image), mask, params, mrf.kernel, log_bias, rows, n_threads)
        mrf.settle(grid, self._announce)
        self.n_mrf_sweeps_, self.mrf_change_ = mrf.n_sweeps, mrf.change
        self.fit_path_ = "grid"
        self.objective_ = (
            "log-likelihood of the observed intensities, bias Jacobian included"
            if self.bias_field
            else "log-likelihood"
        ) + (
            "; the MRF prior shapes the posterior (labels, probability maps), computed by "
            "mean-field sweeps at the fitted parameters, not the parameters themselves"
            if mrf.beta > 0
            else ""
        )
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
            return
        final = grid.probabilities(mrf.beta)
        del grid
        self.responsibilities_ = masked_rows(final, mask)
        del final
        # the expected number of voxels of each class under the returned posterior
        self.soft_counts_ = column_sums(self.responsibilities_)

    # ------------------------------------------------------------------ the fitted field
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
        return bias.log_bias_block(
            shape, start, self.bias_coefficients_, self.bias_cells_, reverse=reverse
        )

    def bias_field_last_axis_slabs(self, step: int) -> Iterator[list[np.ndarray]]:
        """``[field[..., start:start + step, 0]]`` for ``start = 0, step, ...`` (one channel).

        Each slab is in Fortran order, as NIfTI stores it (computed with the axes reversed).
        """
        shape, _, _ = self._bias_grid
        for start in range(0, shape[-1], step):
            planes = self._log_bias_on_input_grid(
                (min(step, shape[-1] - start),) + shape[-2::-1],
                (start,) + (0,) * (len(shape) - 1),
                reverse=True,
            )
            yield [np.exp(planes[..., 0].T)]

    def bias_field_slabs(self, step: int = 16) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, field[start:start + step])`` along the first axis of the input grid."""
        shape, _, _ = self._bias_grid
        for start in range(0, shape[0], step):
            planes = self._log_bias_on_input_grid(
                (min(step, shape[0] - start),) + shape[1:], (start,) + (0,) * (len(shape) - 1)
            )
            yield start, np.exp(planes, out=planes)


def sweep_rows(shape: tuple[int, ...], chunk_size: int | None, n_threads: int) -> int:
    """Planes per slab of the MRF sweeps: several per thread, each of at most 2 M voxels.

    A sweep copies the planes that border another slab first, so one-plane slabs would copy
    the whole grid; slabs of ``chunk_size`` voxels are kept when the user set a larger one.
    """
    plane = int(np.prod(shape[1:]))
    largest = max(int(chunk_size or 0), 2_000_000) // max(plane, 1)
    return int(max(2, min(largest, -(-shape[0] // (4 * n_threads)))))


def masked_rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
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


def column_sums(values: np.ndarray) -> np.ndarray:
    """Column sums of an (N, K) array in float64, a slab of rows at a time (no full copy)."""
    total = np.zeros(values.shape[1])
    for start in range(0, len(values), 1 << 20):
        total += values[start : start + (1 << 20)].sum(axis=0, dtype=np.float64)
    return total


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask``."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)
