"""Spatial extensions of the mixture, as pure numpy functions on image blocks.

- **MRF prior.** A Potts prior ``beta * sum_j w_ij [z_i = z_j]`` over the 26-neighbourhood (8 in
  2-D) with ``w_ij = 1 / distance_mm``, applied by mean-field sweeps: the label indicator of
  each neighbour is replaced by its posterior from the previous sweep, so the prior of voxel i
  is ``pi_ik proportional to exp(beta sum_j w_ij q_jk)`` and its posterior
  ``q_ik ~ pi_ik N(y_i / b_i | mu_k, Sigma_k)``. As in FSL FAST the local prior replaces the
  global weights ``pi_k``. Updating every voxel from the previous sweep's neighbours (not in
  place) makes the result independent of the chunking. The posterior gives the labels and the
  probability maps; the class parameters and the bias field stay those of the mixture
  (updating them from the MRF posterior, as HMRF-EM does, let a thin class drift into a
  boundary class on noisy whole-head phantoms).
- **Bias field.** The sweeps divide the intensities by the field (``log_bias``); the field
  itself is estimated in :mod:`segment.spatial.bias`.

No I/O and no Dask: :mod:`segment._chunked` maps the field's functions over blocks, and
:mod:`segment._sweeps` the sweep over slabs.

References
----------
Zhang, Brady & Smith (2001), Segmentation of brain MR images through a hidden Markov random field
model and the expectation-maximization algorithm. IEEE TMI 20(1), 45-57 (FSL FAST).
Van Leemput, Maes, Vandermeulen & Suetens (1999), Automated model-based bias field correction of
MR images of the brain. IEEE TMI 18(10), 885-896.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import _em


def neighbour_kernel(spacing: tuple[float, ...]) -> np.ndarray:
    """Weights ``1 / distance`` (mm) of the 3^ndim - 1 neighbours, 0 at the centre.

    Parameters
    ----------
    spacing : tuple of float
        Voxel size in mm along each axis (anisotropic voxels are handled).

    Returns
    -------
    kernel : (3,) * ndim float64 array
    """
    offsets = np.indices((3,) * len(spacing)).reshape(len(spacing), -1).T - 1
    distances = np.sqrt(((offsets * np.asarray(spacing, dtype=np.float64)) ** 2).sum(axis=1))
    weights = np.divide(1.0, distances, out=np.zeros_like(distances), where=distances > 0)
    return weights.reshape((3,) * len(spacing))


def neighbour_sums(responsibilities: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``sum_j w_ij r_jk`` for every voxel i and component k.

    Parameters
    ----------
    responsibilities : (*spatial, K) array
        Zero outside the fitted voxels (and beyond the image edge).
    kernel : (3,) * ndim array, see :func:`neighbour_kernel`

    Returns
    -------
    sums : (K, *spatial) array, component-major, float32 for float32 input, else float64
    """
    dtype = np.float32 if responsibilities.dtype == np.float32 else np.float64
    return _component_sums(
        np.ascontiguousarray(np.moveaxis(responsibilities, -1, 0), dtype=dtype), kernel
    )


def _component_sums(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """:func:`neighbour_sums` of component-major ``(K, *spatial)`` values (the reference).

    The sweeps compute the same sums inside their compiled loop
    (:func:`segment._kernels.mean_field_rows`); the tests compare the two.
    """
    sums = np.empty(values.shape, np.float64 if values.dtype == np.float64 else np.float32)
    for k in range(values.shape[0]):
        ndimage.correlate(values[k], kernel, output=sums[k], mode="constant", cval=0.0)
    return sums


def mrf_log_prior(sums: np.ndarray, beta: float) -> np.ndarray:
    """Normalised log prior ``log pi_ik`` with ``pi_ik ~ exp(beta sum_j w_ij r_jk)``.

    The global weights are not multiplied in (see the module docstring); with no neighbour
    information (all sums equal) the prior is uniform. The E-step only needs ``beta * sums``
    (the normaliser cancels in the posterior); this is the prior itself, for reporting.

    Parameters
    ----------
    sums : (K, n) array, neighbour sums of the voxels (component-major)
    beta : float, MRF strength

    Returns
    -------
    log_prior : (K, n) float64 array
    """
    log_prior = beta * np.asarray(sums, dtype=np.float64)
    log_prior -= log_prior.max(axis=0)
    log_prior -= np.log(np.exp(log_prior).sum(axis=0))
    return log_prior


# --------------------------------------------------------------------------------------------
# Block functions of the grid EM
# --------------------------------------------------------------------------------------------
#: Between sweeps the posterior is kept as uint8 multiples of 1/255 (K bytes a voxel, a quarter
#: of float32) and its neighbour sums are taken in integers. The rounding moves a neighbour sum
#: by at most ``26 / 510`` and the log prior by ``beta`` times that (0.01 at beta = 0.2); the
#: final sweep writes float32 probabilities.
POSTERIOR_LEVELS = 255


def mean_field_sweep(
    previous: np.ndarray,
    intensities: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    beta: float,
    kernel: np.ndarray,
    final: bool = False,
    halo: tuple[int, int] = (0, 0),
    skip_settled: bool = False,
) -> np.ndarray:
    """One mean-field sweep of the MRF posterior on one block (with its one-voxel halo).

    ``q_ik ~ exp(beta sum_j w_ij q'_jk) N(y_i / b_i | mu_k, Sigma_k)`` with ``q'`` the previous
    sweep's posterior. Every voxel is updated from the previous sweep (not in place), so the
    result does not depend on the chunking. The loop is compiled
    (:func:`segment._kernels.mean_field_rows`); :func:`neighbour_sums` and
    :func:`segment._em.e_step` are its reference.

    Parameters
    ----------
    previous : (*block, K + 1) uint8
        The previous sweep's posterior in units of 1/:data:`POSTERIOR_LEVELS` in the first K
        slots (zeros outside the mask).
    intensities : (*block, D) raw intensities
        Or only the planes that are computed (the block without its halo).
    mask : (*block) bool, the fitted voxels
    log_bias : (*block, D) log of the bias field, or only the computed planes
    weights, means, precisions_chol : mixture parameters
    beta : float
        MRF strength. With 0 the sweep is the plain E-step (global weights ``pi_k``): the
        starting point of the sweeps.
    kernel : neighbour weights
    final : bool
        Return float32 probabilities instead of the next uint8 state.
    halo : (int, int)
        Planes at the start and end of the first axis that are only neighbours (left zero).
    skip_settled : bool
        Keep the state of voxels whose neighbours did not change in the previous sweep (the
        update would reproduce it exactly); valid when that sweep was an MRF sweep.

    Returns
    -------
    out : (*block, K + 1) uint8, or (*block, K) float32 when ``final``
        The posterior ``q_ik`` (in units of 1/255 unless ``final``), and in the last uint8
        slot the change of this sweep ``sum_k |q_ik - q'_ik| / 2`` in units of 1/255; zeros
        outside the mask.
    """
    from . import _kernels

    n_components = means.shape[0]
    slots = n_components if final else n_components + 1
    dtype = np.float32 if final else np.uint8
    out = np.zeros(_as_3d(mask.shape) + (slots,), dtype)
    mode = _kernels.FINAL if final else _kernels.STATE
    _run_rows(previous, intensities, mask, log_bias, (weights, means, precisions_chol), beta,
              kernel, halo, mode, out, None, skip_settled and beta > 0 and not final)  # fmt: skip
    return out.reshape(mask.shape + (slots,))


def mean_field_final(
    previous: np.ndarray,
    intensities: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    params: tuple[np.ndarray, np.ndarray, np.ndarray],
    beta: float,
    kernel: np.ndarray,
    halo: tuple[int, int] = (0, 0),
    probabilities: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """The final sweep of :func:`mean_field_sweep`, into given arrays; returns its column sums.

    Without ``rows``: ``probabilities`` (*block[::-1], K) float32 and ``labels``
    (*block[::-1]) uint8 (``1 + argmax_k``), each optional (views are fine), have the block's
    axes reversed (the block is a slab of the reversed grid of
    :class:`segment._sweeps.PosteriorGrid`, so they are in the image's own order) and get the
    computed planes (the others are not touched).

    With ``rows = (r0, r1)``: only those rows (second axis) of a 3-D block, each map apart.
    ``intensities`` and ``log_bias`` (may be views) are those of the computed voxels,
    ``[halo[0]:n0 - halo[1], r0:r1]``; ``probabilities`` (K, n0 - halo[0] - halo[1], n1, n2)
    float32 and ``labels`` (n0 - halo[0] - halo[1], n1, n2) uint8 are required.

    Returns the probabilities summed over the computed voxels, (K,) float64.
    """
    from . import _kernels

    n_components = params[1].shape[0]
    counts = np.zeros(n_components)
    if rows is not None:
        if mask.ndim == 2:  # views with the unit third axis of the kernel's 3-D blocks
            probabilities, labels = probabilities[..., None], labels[..., None]
        _run_rows(previous, intensities, mask, log_bias, params, beta, kernel, halo,
                  _kernels.FINAL_BY_COMPONENT, probabilities, labels, False, counts,
                  rows=rows)  # fmt: skip
        return counts
    spatial = _as_3d(mask.shape)[::-1]
    if probabilities is None:
        out = np.zeros((1, 1, 1, 1), np.float32)
    else:  # a view (the kernel writes into it)
        out = probabilities.reshape(spatial + (n_components,))
        assert np.may_share_memory(out, probabilities)
    if labels is not None:
        labels = labels.reshape(spatial)
    _run_rows(previous, intensities, mask, log_bias, params, beta, kernel, halo,
              _kernels.FINAL_REVERSED, out, labels, False, counts)  # fmt: skip
    return counts


def _as_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape) + (1,) * (3 - len(shape))


def _run_rows(previous, intensities, mask, log_bias, params, beta, kernel, halo, mode, out,
              labels, skip_settled, counts=None, rows=None):  # fmt: skip
    """Call :func:`segment._kernels.mean_field_rows` on a 2-D or 3-D block.

    ``intensities`` and ``log_bias`` are those of the whole block or of the computed voxels.
    """
    from . import _kernels

    weights, means, precisions_chol = params
    shape = _as_3d(mask.shape)
    planes = (halo[0], mask.shape[0] - halo[1])
    rows = rows or (0, shape[1])
    computed = (planes[1] - planes[0], rows[1] - rows[0]) + shape[2:]
    if _as_3d(intensities.shape[:-1]) != computed:
        inner = (slice(*planes), slice(*rows))
        intensities, log_bias = intensities[inner], log_bias[inner]
    with np.errstate(invalid="ignore", over="ignore"):  # voxels outside the mask may be NaN
        # C order: NIfTI data are Fortran-ordered, and the loop reads voxels in C order
        # (strided reads made the sweep 3x slower)
        corrected = np.array(intensities, dtype=np.float32, order="C")
        corrected *= np.exp(-log_bias, dtype=np.float32)
    offsets = np.argwhere(kernel != 0)
    offset_weights = kernel[tuple(offsets.T)].astype(np.float64)
    offsets = np.pad(offsets - 1, ((0, 0), (0, 3 - kernel.ndim))).astype(np.int64)
    state = out if mode == _kernels.STATE else np.zeros((1, 1, 1, 1), np.uint8)
    final = out if mode != _kernels.STATE else np.zeros((1, 1, 1, 1), np.float32)
    _kernels.mean_field_rows(
        np.ascontiguousarray(previous, dtype=np.uint8).reshape(shape + previous.shape[-1:]),
        corrected.reshape(computed + intensities.shape[-1:]),
        mask.reshape(shape),
        offsets,
        offset_weights,
        np.asarray(means, np.float64),
        np.asarray(precisions_chol, np.float64),
        _log_normaliser(precisions_chol),
        np.log(weights).astype(np.float64),
        float(beta) / POSTERIOR_LEVELS,
        planes[0],
        planes[1],
        rows[0],
        rows[1],
        mode,
        skip_settled,
        state,
        final,
        np.zeros((1, 1, 1), np.uint8) if labels is None else labels,
        np.zeros(means.shape[0]) if counts is None else counts,
    )


def _log_normaliser(precisions_chol: np.ndarray) -> np.ndarray:
    """``log det(P_k) - D/2 log(2 pi)`` of each Gaussian, (K,) float64."""
    n_features = precisions_chol.shape[1]
    log_det = np.log(np.diagonal(precisions_chol, axis1=1, axis2=2)).sum(axis=1)
    return (log_det - 0.5 * n_features * _em.LOG_2PI).astype(np.float64)
