"""The bias field: a smooth multiplicative field estimated from the mixture's residuals.

Model. The observed intensity is ``y_i = b(x_i) u_i`` with ``u_i`` drawn from the mixture and
``log b`` smooth. Given responsibilities ``r_ik`` of the corrected intensities ``y_i / b_i``, the
log residual of voxel i against class k is ``log y_i - log mu_k``, with precision about
``snr_k^2 = mu_k^2 / sigma_k^2`` (the delta method). The field is the regularised local weighted
mean of these residuals (Wells et al. 1996; Guillemaud & Brady 1997; FSL FAST)::

    log b = G * R / (G * W + lambda G * N),   R_i = sum_k r_ik snr_k^2 (log y_i - log mu_k),
                                              W_i = sum_k r_ik snr_k^2,

with ``G`` a Gaussian of full width at half maximum ``smoothness`` (mm, so the result does not
depend on the voxel size), ``N`` the voxel count and ``lambda`` (:data:`PRIOR_WEIGHT`) a prior
pulling the field to 1 where the data are weak. Classes with ``snr < 3`` (air, bone) are noise
that the field does not multiply; they do not vote. The sums are taken per cell of a coarse grid
(cells of about a sixth of the smoothness), so a block of voxels contributes a small array and the
field is smoothed on the coarse grid in memory; it is evaluated at any voxel by linear
interpolation of the coarse values, separably per axis. The field has geometric mean 1 over the
fitted voxels, so it does not shift the class means.

A field is kept only when the classes agree on it (:func:`class_agreement`): a real
non-uniformity multiplies every tissue, so the fields that the two best-determined classes
would give on their own correlate; a field that only absorbs anatomy (a template whose deep
grey matter is brighter than the cortex, a class that swallows its neighbour) does not.

No I/O and no Dask: :mod:`segment.mixture` maps :func:`em_block` over blocks.

References
----------
Wells, Grimson, Kikinis & Jolesz (1996), Adaptive segmentation of MRI data. IEEE TMI 15(4).
Guillemaud & Brady (1997), Estimating the bias field of MR images. IEEE TMI 16(3).
Zhang, Brady & Smith (2001), IEEE TMI 20(1), 45-57 (FSL FAST).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import _em, _kernels

#: Classes whose mean is under this many standard deviations do not inform the field.
MIN_SNR = 3.0
#: Weight of the prior ``log b = 0`` per voxel, against a voxel's data weight ``snr^2``
#: (about 10 to 1000 for tissue).
PRIOR_WEIGHT = 1.0
#: Cells of the coarse grid are about this fraction of the smoothness (FWHM) wide.
CELLS_PER_FWHM = 6
#: A field is discarded when the two best-determined classes' own fields correlate less.
MIN_AGREEMENT = 0.6
#: Relative spread of a tissue's intensity that is anatomy, not noise (deep against cortical
#: grey matter, white matter near the cortex, a few per cent over tens of mm). Unlike the noise
#: it does not average out under the smoother, so it caps a class's weight at ``1 / cv^2``
#: in the refinement stage (:func:`field_weights`).
TISSUE_CV = 0.1
FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))


def field_cells(spacing: tuple[float, ...], smoothness: float) -> tuple[int, ...]:
    """Voxels per coarse cell along each axis: about ``smoothness / 6`` mm, at least 1."""
    return tuple(max(1, int(round(smoothness / CELLS_PER_FWHM / size))) for size in spacing)


def coarse_shape(shape: tuple[int, ...], cells: tuple[int, ...]) -> tuple[int, ...]:
    """Cells needed to cover ``shape`` voxels (at least 2 per axis, for interpolation)."""
    return tuple(max(2, -(-n // c)) for n, c in zip(shape, cells))


def n_sums(n_channels: int, n_components: int) -> int:
    """Arrays per cell of :func:`em_block`: ``A``, ``B`` per class and channel, ``N``, then
    the residual sum and count of the voxels most responsible to each class."""
    return 2 * n_components * n_channels + 1 + 2 * n_components


@dataclass(frozen=True)
class SampledBlock:
    """What :func:`em_block` needs of a block that does not change between iterations.

    Attributes
    ----------
    shape, offset, scale : the block's shape, offset and sampling step on the grid
    voxels : (n,) flat indices of the fitted voxels in the block
    y : (n, D) float64 raw intensities of those voxels
    log_y : (n, D) ``log y`` where ``y > 0``, else 0
    usable : (n, D) bool, ``y > 0``
    flat_cells : (n,) index of each voxel's cell in the block's cells, C order
    start, extent : index of the block's first cell and the number of cells per axis
    counts : (*extent) voxels per cell (float64)
    """

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    scale: tuple[int, ...]
    voxels: np.ndarray
    y: np.ndarray
    log_y: np.ndarray
    usable: np.ndarray
    flat_cells: np.ndarray
    start: tuple[int, ...]
    extent: tuple[int, ...]
    counts: np.ndarray


def sample_block(
    intensities: np.ndarray,
    mask: np.ndarray,
    offset: tuple[int, ...],
    cells: tuple[int, ...],
    scale: tuple[int, ...],
) -> SampledBlock:
    """The fixed part of :func:`em_block` for one block (see its parameters)."""
    n_channels = intensities.shape[-1]
    positions = [(o + np.arange(n)) * s for o, n, s in zip(offset, mask.shape, scale)]
    cell_index = [p // c for p, c in zip(positions, cells)]
    start = tuple(int(i[0]) for i in cell_index)
    extent = tuple(int(i[-1]) - s + 1 for i, s in zip(cell_index, start))
    voxels = np.flatnonzero(mask)
    y = intensities.reshape(-1, n_channels)[voxels].astype(np.float64)
    local = np.ix_(*[i - s for i, s in zip(cell_index, start)])
    flat_cells = np.ravel_multi_index(np.broadcast_arrays(*local), extent).ravel()[voxels]
    usable = y > 0
    counts = np.bincount(flat_cells, np.ones(len(voxels)), int(np.prod(extent)))
    return SampledBlock(
        shape=tuple(mask.shape), offset=tuple(offset), scale=tuple(scale), voxels=voxels, y=y,
        log_y=np.log(np.where(usable, y, 1.0)), usable=usable, flat_cells=flat_cells,
        start=start, extent=extent, counts=counts.reshape(extent),
    )  # fmt: skip


def em_block(
    intensities: np.ndarray,
    mask: np.ndarray,
    offset: tuple[int, ...],
    coarse: np.ndarray,
    cells: tuple[int, ...],
    scale: tuple[int, ...],
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
) -> tuple[_em.Statistics, tuple[tuple[int, ...], np.ndarray]]:
    """One E-step of a block of a (sub-sampled) grid under the field, and its cell sums.

    The residual sums the field needs are kept per class, so that the field can be refitted
    after the M-step from the new means without another pass over the voxels:
    ``R_d = sum_k snr_kd^2 (A_kd - B_kd log mu_kd)`` and ``W_d = sum_k snr_kd^2 B_kd`` with
    ``A_kd = sum_i r_ik log y_id`` and ``B_kd = sum_i r_ik`` over a cell's voxels
    (:func:`field_from_sums`). :func:`sample_block` then :func:`em_sampled_block`, whose
    first part a loop over the same blocks can keep between iterations.

    Parameters
    ----------
    intensities : (*block, D) raw intensities
    mask : (*block,) bool, the fitted voxels
    offset : block offset on the (sub-sampled) grid
    coarse : (D, *coarse) the current field ``log b`` on the coarse grid
    cells : voxels per cell on the full grid
    scale : sampling step per axis: block voxel ``j`` is grid voxel ``(offset + j) * scale``
    weights, means, precisions_chol : (K,), (K, D), (K, D, D) mixture parameters

    Returns
    -------
    stats : the E-step statistics of the corrected intensities ``y / b``; ``log_likelihood``
        is that of the observed intensities, ``sum_i log p(y_i / b_i) - log b_i``
    (start, sums) : index of the block's first cell and the (:func:`n_sums`, *cells) sums
    """
    block = sample_block(intensities, mask, offset, cells, scale)
    return em_sampled_block(block, coarse, cells, weights, means, precisions_chol)


def em_sampled_block(
    block: SampledBlock,
    coarse: np.ndarray,
    cells: tuple[int, ...],
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
) -> tuple[_em.Statistics, tuple[tuple[int, ...], np.ndarray]]:
    """:func:`em_block` of a block prepared by :func:`sample_block`.

    One channel runs the compiled loop ``bias_estep_1d`` (``segment/_estep.c``): the E-step and
    the cell sums below, the same operations in the same order; the moments stay in numpy.
    """
    n_channels, n_components = block.y.shape[-1], len(weights)
    extent, flat_cells, log_y, usable = block.extent, block.flat_cells, block.log_y, block.usable
    sums = np.zeros((n_sums(n_channels, n_components), *extent))
    n_voxels = len(block.voxels)
    log_b = log_bias_block(block.shape, block.offset, coarse, cells, block.scale)
    if n_channels == 1 and _kernels.compiled is not None:
        x, log_b, resp, log_norm = _compiled_estep_1d(block, log_b, sums, weights, means,
                                                      precisions_chol)  # fmt: skip
        stats = _em.moments(x, resp, means, float(log_norm.sum() - log_b.sum()), float(n_voxels))
        return stats, (block.start, sums)
    log_b = log_b.reshape(-1, n_channels)[block.voxels].astype(np.float64)
    x = block.y * np.exp(-log_b)
    resp, log_norm = _em.e_step(x, weights, means, precisions_chol)  # (K, n)
    if n_voxels:
        size = int(np.prod(extent))

        def add(slot, values):
            sums[slot] = np.bincount(flat_cells, values, size).reshape(extent)

        for k in range(n_components):
            for d in range(n_channels):
                base = 2 * (k * n_channels + d)
                weight = resp[k] * usable[:, d]
                add(base, weight * log_y[:, d])
                add(base + 1, weight)
        sums[2 * n_components * n_channels] = block.counts
        labels = np.argmax(resp, axis=0)
        for k in range(n_components):
            own = (labels == k) & usable[:, 0]
            base = 2 * n_components * n_channels + 1 + 2 * k
            add(base, np.where(own, log_y[:, 0], 0.0))
            add(base + 1, own.astype(np.float64))
    stats = _em.moments(x, resp, means, float(log_norm.sum() - log_b.sum()), float(n_voxels))
    return stats, (block.start, sums)


def _compiled_estep_1d(block: SampledBlock, log_b, sums, weights, means, precisions_chol):
    """The compiled part of :func:`em_sampled_block` for one channel: ``(x (n, 1), log_b (n,),
    resp (K, n), log_norm (n,))``, the cell sums added into ``sums`` (the counts slot set)."""
    n_voxels, n_components = len(block.voxels), len(weights)
    precision = np.ascontiguousarray(precisions_chol[:, 0, 0], dtype=np.float64)
    constant = np.log(precision) - 0.5 * _em.LOG_2PI  # as _em.estimate_log_gaussian_prob
    x, picked, log_norm = (np.empty(n_voxels) for _ in range(3))
    resp = np.empty((n_components, n_voxels))
    flat = sums.reshape(len(sums), -1)
    if n_voxels:
        flat[2 * n_components] = block.counts.ravel()
    _kernels.compiled.bias_estep_1d(
        np.ascontiguousarray(block.y[:, 0]), log_b.reshape(-1), np.asarray(block.voxels, np.int64),
        np.ascontiguousarray(block.log_y[:, 0]), np.ascontiguousarray(block.usable[:, 0]),
        np.asarray(block.flat_cells, np.int64), np.ascontiguousarray(means[:, 0], dtype=np.float64),
        precision, constant.astype(np.float64), np.log(weights).astype(np.float64), x, picked,
        log_norm, resp, flat,
    )  # fmt: skip
    return x[:, None], picked, resp, log_norm


def combine_em_blocks(parts: list, shape: tuple[int, ...]):
    """Sum the blocks' :func:`em_block` results: (statistics, (S, *shape) cell sums)."""
    return (
        _em.combine_statistics([stats for stats, _ in parts]),
        combine_cell_sums([cells for _, cells in parts], shape),
    )


def combine_cell_sums(parts: list, shape: tuple[int, ...]) -> np.ndarray:
    """Add the blocks' cell sums into one (S, *shape) array, in block order."""
    total = None
    for start, sums in parts:
        if total is None:
            total = np.zeros((sums.shape[0], *shape))
        window = tuple(slice(s, s + n) for s, n in zip(start, sums.shape[1:]))
        total[(slice(None), *window)] += sums
    return total


def signal_to_noise(means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """``snr_kd^2 = mu_kd^2 / sigma_kd^2``, (K, D), 0 for classes that do not inform the field."""
    snr2 = means**2 / np.diagonal(covariances, axis1=1, axis2=2)
    return np.where((snr2 >= MIN_SNR**2) & (means > 0), snr2, 0.0)


def field_weights(means: np.ndarray, covariances: np.ndarray, tissue_cv: float = 0.0) -> np.ndarray:
    """Per-voxel weight of each class's log residual, (K, D): ``1 / (1 / snr^2 + cv^2)``.

    With ``tissue_cv = 0`` this is the delta-method precision ``snr^2``
    (:func:`signal_to_noise`). A positive ``tissue_cv`` adds the anatomical spread of the
    class's intensity (:data:`TISSUE_CV`), which the smoother does not average out: white
    matter at ``snr`` 40 would otherwise outvote grey matter 25 to 1 and the field would copy
    white matter's own anatomy. Classes that do not inform the field keep weight 0.
    """
    snr2 = signal_to_noise(means, covariances)
    if tissue_cv == 0:
        return snr2
    inverse = np.divide(1.0, snr2, out=np.full_like(snr2, np.inf), where=snr2 > 0)
    return 1.0 / (inverse + tissue_cv**2)


def residual_sums(
    sums: np.ndarray, means: np.ndarray, covariances: np.ndarray, tissue_cv: float = 0.0
) -> np.ndarray:
    """The field's ``R_d``, ``W_d`` per channel and ``N``, (2 D + 1, *coarse), at ``means``.

    Each class's residuals weigh :func:`field_weights` (``snr^2`` with ``tissue_cv = 0``).
    """
    n_components, n_channels = means.shape
    snr2 = field_weights(means, covariances, tissue_cv)
    log_means = np.log(np.where(means > 0, means, 1.0))
    out = np.zeros((2 * n_channels + 1, *sums.shape[1:]))
    for k in range(n_components):
        for d in range(n_channels):
            a, b = sums[2 * (k * n_channels + d)], sums[2 * (k * n_channels + d) + 1]
            out[d] += snr2[k, d] * (a - b * log_means[k, d])
            out[n_channels + d] += snr2[k, d] * b
    out[2 * n_channels] = sums[2 * n_components * n_channels]
    return out


def class_sums(sums: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per class, the hard-label residual sum and count, (2 K, *coarse), first channel."""
    n_components, n_channels = means.shape
    out = sums[2 * n_components * n_channels + 1 :].copy()
    log_means = np.log(np.where(means[:, 0] > 0, means[:, 0], 1.0))
    for k in range(n_components):
        out[2 * k] -= out[2 * k + 1] * log_means[k]
    return out


def _smooth(values: np.ndarray, sigma: tuple[float, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(values, sigma, mode="constant", truncate=3.0)


def smooth_log_field(
    sums: np.ndarray, n_channels: int, sigma_cells: tuple[float, ...], prior: float = PRIOR_WEIGHT
) -> np.ndarray:
    """The regularised field ``log b`` on the coarse grid, (D, *coarse), mean 0 over the voxels.

    ``sigma_cells`` is the Gaussian's standard deviation in cells per axis.
    """
    counts = sums[2 * n_channels]
    smooth_counts = _smooth(counts, sigma_cells)
    field = np.empty((n_channels, *counts.shape))
    for d in range(n_channels):
        residual = _smooth(sums[d], sigma_cells)
        weight = _smooth(sums[n_channels + d], sigma_cells) + prior * smooth_counts
        # far from any fitted voxel both sums vanish: the floor takes the field back to 1 there
        field[d] = residual / np.maximum(weight, 1e-3 * weight.max() + 1e-12)
        field[d] -= (field[d] * counts).sum() / max(counts.sum(), 1.0)
    return field


def class_agreement(
    sums: np.ndarray, counts: np.ndarray, snr2: np.ndarray, sigma_cells: tuple[float, ...],
    min_fraction: float = 0.05,
) -> tuple[float, tuple[int, int] | None]:  # fmt: skip
    """Correlation of the fields that the two best-determined classes give on their own.

    ``sums`` are :func:`class_sums` (per class the residual sum and count of the voxels it is
    most responsible for, raw intensities, so the total non-uniformity) and ``counts`` the
    voxels per cell; each class's field is its smoothed mean log residual. The correlation is
    taken over the cells where both are determined, weighted by the smaller of their smoothed
    counts. Classes need ``snr >= 3`` and ``min_fraction`` of the voxels. Returns
    ``(r, (k1, k2))``, or ``(1.0, None)`` when fewer than two classes qualify (the agreement
    cannot be tested).
    """
    total = max(counts.sum(), 1.0)
    candidates = []
    for k in range(len(snr2)):
        base = 2 * k
        if snr2[k] >= MIN_SNR**2 and sums[base + 1].sum() >= min_fraction * total:
            candidates.append((snr2[k] * sums[base + 1].sum(), k))
    if len(candidates) < 2:
        return 1.0, None
    pair = tuple(sorted(k for _, k in sorted(candidates)[-2:]))
    fields, supports = [], []
    for k in pair:
        base = 2 * k
        support = _smooth(sums[base + 1], sigma_cells)
        fields.append(_smooth(sums[base], sigma_cells) / np.maximum(support, 1e-12))
        supports.append(support)
    weight = np.minimum(*supports)
    weight = np.where(weight > 1e-3 * weight.max(), weight, 0.0)
    if weight.sum() == 0:
        return 1.0, None
    a, b = (f - (f * weight).sum() / weight.sum() for f in fields)
    covariance = (a * b * weight).sum()
    scale = np.sqrt((a * a * weight).sum() * (b * b * weight).sum())
    return (float(covariance / scale) if scale > 0 else 0.0), pair


def interpolation_taps(
    n: int, start: int, scale: int, cells: int, n_cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation taps of voxels ``(start + j) * scale``, ``j < n``, of one axis.

    Returns the lower cell of each voxel (n,) int64, in ``[0, n_cells - 2]``, and the weights
    (n, 2) of that cell and the next: ``1 - t`` and ``t``. Voxels beyond the outer cell
    centres take the outer cell's value.
    """
    centres = ((start + np.arange(n)) * scale + 0.5) / cells - 0.5
    centres = np.clip(centres, 0.0, n_cells - 1.0)
    low = np.minimum(np.floor(centres).astype(np.int64), n_cells - 2)
    t = centres - low
    return low, np.stack([1.0 - t, t], axis=1)


def log_bias_block(
    shape: tuple[int, ...],
    offset: tuple[int, ...],
    coarse: np.ndarray,
    cells: tuple[int, ...],
    scale: tuple[int, ...] | None = None,
    reverse: bool = False,
) -> np.ndarray:
    """``log b`` at the voxels of a block, (*shape, D) float32.

    Separable linear interpolation of the coarse values (:func:`interpolation_taps`,
    :func:`segment._kernels.interpolate_field`).

    Parameters
    ----------
    shape, offset : the block's shape and offset on the grid (sampled every ``scale`` voxels)
    coarse : (D, *coarse) the field on the coarse grid (:func:`smooth_log_field`)
    cells : voxels per cell
    reverse : ``shape`` and ``offset`` are given last axis first, as is the result.
    """
    ndim = coarse.ndim - 1
    scale = scale or (1,) * ndim
    if reverse:
        shape, offset = shape[::-1], offset[::-1]
    taps = [
        interpolation_taps(shape[a], offset[a], scale[a], cells[a], coarse.shape[1 + a])
        for a in range(ndim)
    ]
    return _kernels.interpolate_field(
        np.moveaxis(coarse, 0, -1), [low for low, _ in taps], [w for _, w in taps], reverse
    )
