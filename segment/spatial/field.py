"""The bias field as a component of the spatial model: its state and its part in each EM step.

:class:`BiasField` holds the field's coarse values on one image grid and offers the narrow
interface the EM loop of :class:`segment.spatial.model.SpatialGaussianMixture` uses:
:meth:`~BiasField.statistics` (the E-step of the corrected intensities, with the per-cell sums
the field needs), :meth:`~BiasField.update` (the new field from those sums and the new class
parameters), :meth:`~BiasField.problem` (whether the fitted field should be kept) and
:meth:`~BiasField.log_bias` (``log b`` on any block of the grid). The maths is in
:mod:`segment.spatial.bias`; a better field model replaces this class.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _chunked
from .._scheduler import is_distributed
from . import bias

#: The bias field's EM runs on a regular sub-grid of at least this many voxels.
BIAS_EM_VOXELS = 100_000


class BiasField:
    """A smooth multiplicative field on a grid of ``grid_shape`` voxels, zero (b = 1) at first.

    Parameters
    ----------
    smoothness : float
        Full width at half maximum of the smoothing Gaussian, mm.
    spacing : tuple of float
        Voxel size per axis, mm.
    grid_shape : tuple of int
        The spatial shape of the grid the field lives on.
    n_features : int
        Channels D (one field per channel).

    Attributes
    ----------
    cells : tuple of int
        Voxels per coarse cell along each axis.
    coarse : (D, *coarse_shape) float64 array
        ``log b`` at the cell centres.
    sampling : tuple of int or None
        The sub-grid steps of :meth:`sample` (None before it).
    sums : array or None
        The per-cell sums of the last :meth:`statistics`.
    tissue_cv : float
        The anatomical spread that caps each class's weight in :meth:`update`
        (:func:`bias.field_weights`; 0: the weights are ``snr^2``).
    """

    def __init__(
        self,
        smoothness: float,
        spacing: tuple[float, ...],
        grid_shape: tuple[int, ...],
        n_features: int,
    ):
        self.cells = bias.field_cells(spacing, smoothness)
        self.shape = bias.coarse_shape(grid_shape, self.cells)
        self.sigma = tuple(
            smoothness * bias.FWHM_TO_SIGMA / (c * size) for c, size in zip(self.cells, spacing)
        )
        self.coarse = np.zeros((n_features, *self.shape))
        self.sampling: tuple[int, ...] | None = None
        self.sums: np.ndarray | None = None
        self.n_sampled = 0.0
        self.tissue_cv = 0.0

    def sample(self, image: np.ndarray, mask: np.ndarray, chunk_size: int | None, ckw: dict):
        """Fit on every ``s``-th voxel along each axis from now on.

        ``s`` is the largest step that keeps at least :data:`BIAS_EM_VOXELS` of the mask (as
        SPM fits its model on voxels a sampling distance apart). ``image`` is (*spatial, D).
        """
        ratio = (mask.sum() / BIAS_EM_VOXELS) ** (1 / mask.ndim)
        self.sampling = tuple(max(1, min(round(ratio), size // 4)) for size in mask.shape)
        picks = tuple(slice(None, None, s) for s in self.sampling)
        sub_mask = mask[picks]
        chunks = _chunked.grid_chunks(sub_mask.shape, chunk_size)
        self._grids = self._blocks = None
        if is_distributed(ckw):
            x_grid = _chunked.as_grid_array(image[picks], chunks)
            mask_grid = _chunked.as_grid_array(sub_mask, chunks)
            self._grids = tuple(ckw["scheduler"].persist([x_grid, mask_grid]))
        else:  # small and in memory: a plain loop over the same blocks, their fixed part kept
            sub_image = np.ascontiguousarray(image[picks])
            self._blocks = [
                bias.sample_block(block, block_mask, offset, self.cells, self.sampling)
                for offset, (block, block_mask) in _chunked.grid_blocks([sub_image, sub_mask],
                                                                        chunks)
            ]  # fmt: skip
        self._ckw = ckw
        self.n_sampled = float(sub_mask.sum())

    def statistics(self, params: tuple):
        """E-step under the current field on the sub-grid: the mixture's statistics.

        Keeps the per-cell sums of the log intensities (:func:`bias.em_block`) for
        :meth:`update` and :meth:`problem`.
        """
        combine = functools.partial(bias.combine_em_blocks, shape=self.shape)
        if self._blocks is not None:  # the blocks map_reduce_grid makes, in its order
            stats, self.sums = combine(
                [bias.em_sampled_block(block, self.coarse, self.cells, *params)
                 for block in self._blocks]
            )  # fmt: skip
            return stats
        args = (self.coarse, self.cells, self.sampling, *params)
        stats, self.sums = _chunked.map_reduce_grid(
            bias.em_block, combine, list(self._grids), len(self.shape), args, self._ckw,
            with_offset=True,
        )  # fmt: skip
        return stats

    def update(self, params: tuple, covariances: np.ndarray) -> None:
        """The new field from the last E-step's sums and the new means and covariances."""
        residuals = bias.residual_sums(self.sums, params[1], covariances, self.tissue_cv)
        self.coarse = bias.smooth_log_field(residuals, self.coarse.shape[0], self.sigma)

    def problem(
        self,
        weights: np.ndarray,
        means: np.ndarray,
        covariances: np.ndarray,
        plain_weights: np.ndarray,
    ) -> tuple[str | None, float | None]:
        """Why the fitted field should not be used (or None), and the classes' agreement.

        A class that lost three quarters of its weight to the field (or all but 0.1 % of the
        voxels) means the field absorbed the contrast between classes; classes that do not
        agree on the field (:func:`bias.class_agreement`) mean it explains anatomy, not a
        non-uniformity.
        """
        K = len(weights)
        per_class = bias.class_sums(self.sums, means)
        counts = np.array([per_class[2 * k + 1].sum() for k in range(K)])
        for k in range(K):
            if weights[k] < 0.25 * plain_weights[k] or counts[k] < 1e-3 * self.n_sampled:
                return (
                    f"class {k + 1} (mean {means[k, 0]:.4g}) would keep "
                    f"{weights[k]:.1%} of the voxels against {plain_weights[k]:.1%} "
                    "without the field; raise bias_smoothness (--bias-smoothness)"
                ), None
        snr2 = means[:, 0] ** 2 / covariances[:, 0, 0]
        voxels = self.sums[2 * K * means.shape[1]]
        agreement, pair = bias.class_agreement(per_class, voxels, snr2, self.sigma)
        if pair is not None and agreement < bias.MIN_AGREEMENT:
            return (
                f"classes {pair[0] + 1} and {pair[1] + 1} do not agree on a field (correlation "
                f"{agreement:.2f} < {bias.MIN_AGREEMENT}): the image shows no consistent "
                "non-uniformity"
            ), agreement
        return None, agreement

    def reset(self) -> None:
        """Back to no field (b = 1)."""
        self.coarse = np.zeros_like(self.coarse)

    def release(self) -> None:
        """Drop the sub-grid (the fitted field stays)."""
        self._grids = self._blocks = self._ckw = None

    def log_bias(self, shape: tuple[int, ...], offset: tuple[int, ...], reverse: bool = False):
        """``log b`` on a block of the grid, (*shape, D) float32 (:func:`bias.log_bias_block`)."""
        return bias.log_bias_block(shape, offset, self.coarse, self.cells, reverse=reverse)
