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
- **Bias field.** A smooth multiplicative field ``b(x) = exp(sum_m c_m phi_m(x))`` per channel,
  with ``phi_m`` products of Legendre polynomials of total degree 1..P over the bounding box of
  the fitted voxels (mapped to [-1, 1]^3). Legendre products without the constant term have zero
  mean over the box, so the field has geometric mean 1 there and does not shift the tissue means.
  Each iteration it is refitted by penalised weighted least squares to the log residuals
  ``log y_i - log sum_k r_ik mu_k`` with weights ``sum_k r_ik mu_k^2 / sigma_k^2`` (the inverse
  variance of ``log y``), on a regular subsample of the voxels, with a ridge prior pulling the
  coefficients to zero (:data:`BIAS_PRIOR_WEIGHT`).

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

import hashlib
import itertools

import numpy as np
from numpy.polynomial import legendre
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
# Bias field
# --------------------------------------------------------------------------------------------
def bias_terms(degree: int, ndim: int) -> list[tuple[int, ...]]:
    """Exponent tuples of the Legendre products of total degree 1..``degree`` (no constant)."""
    return [
        powers
        for powers in itertools.product(range(degree + 1), repeat=ndim)
        if 0 < sum(powers) <= degree
    ]


def axis_coordinates(start: int, stop: int, box: tuple[float, float]) -> np.ndarray:
    """Voxel indices ``start..stop-1`` of one axis mapped from the box ``[lo, hi]`` to [-1, 1]."""
    lo, hi = box
    return (np.arange(start, stop) - lo) / max(hi - lo, 1.0) * 2.0 - 1.0


def _axis_polynomials(coords: list[np.ndarray], degree: int) -> list[np.ndarray]:
    """``P_p(coord)`` for p = 0..degree on each axis: list of (degree + 1, n_axis) arrays."""
    return [legendre.legvander(c, degree).T for c in coords]


def log_bias_block(
    coefficients: np.ndarray, coords: list[np.ndarray], degree: int, reverse: bool = False
) -> np.ndarray:
    """Evaluate ``log b`` on a block.

    Parameters
    ----------
    coefficients : (M, D) array, one column per channel
    coords : list of ndim 1-D arrays, the block's normalised coordinates per axis
    degree : int
    reverse : bool
        ``coords`` are given last axis first, and so is the result.

    Returns
    -------
    log_bias : (*block_shape, D) float64 array
    """
    ndim = len(coords)
    polys = _axis_polynomials(coords, degree)  # per axis (degree + 1, n_axis)
    # sum_m c_m prod_a P_{p_ma}(x_a) as a contraction of the coefficient tensor with one
    # polynomial table per axis: a few BLAS calls instead of M outer products of the block
    tensor = np.zeros((degree + 1,) * ndim + (coefficients.shape[1],))
    for m, powers in enumerate(bias_terms(degree, ndim)):
        tensor[powers[::-1] if reverse else powers] = coefficients[m]
    for axis in range(ndim):  # contract the leading power index; the voxel axis goes last
        tensor = np.tensordot(tensor, polys[axis], axes=(0, 0))
    # axes are now (D, x_0, ..., x_{ndim-1})
    return np.moveaxis(tensor, 0, -1)


#: Classes whose mean is under this many standard deviations do not inform the bias field.
MIN_SNR = 3.0


def bias_statistics(
    intensities: np.ndarray,
    responsibilities: np.ndarray,
    design: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal-equation sums of the weighted log-residual fit, per channel.

    Parameters
    ----------
    intensities : (n, D) raw (uncorrected) intensities of the sampled voxels
    responsibilities : (n, K) array
    design : (n, M) basis values ``phi_m(x_i)``
    means : (K, D) array
    covariances : (K, D, D) array

    Returns
    -------
    gram : (D, M, M) array, ``sum_i w_id phi_i phi_i^T``
    moment : (D, M) array, ``sum_i w_id R_id phi_i``
    """
    variances = np.diagonal(covariances, axis1=1, axis2=2)  # (K, D)
    predicted = responsibilities @ means  # (n, D)
    snr2 = means**2 / variances  # (K, D): inverse variance of log y for each class
    # Classes with SNR < 3 (air, cortical bone) are noise, which the field does not multiply:
    # they carry no information on it and, left in, let it trade off against the class means.
    weight = responsibilities @ np.where(snr2 >= MIN_SNR**2, snr2, 0.0)  # (n, D)
    usable = (intensities > 0) & (predicted > 0)
    weight = np.where(usable, weight, 0.0)
    residual = np.log(np.where(usable, intensities, 1.0) / np.where(usable, predicted, 1.0))
    n_channels, n_terms = intensities.shape[1], design.shape[1]
    gram, moment = np.zeros((n_channels, n_terms, n_terms)), np.zeros((n_channels, n_terms))
    # in pieces of rows: on longer products OpenBLAS wakes its own threads, which then fight
    # Dask's for the cores (measured 10-30x slower inside a Dask thread)
    for start in range(0, len(design), _em.BLOCK_1D):
        rows = slice(start, start + _em.BLOCK_1D)
        for d in range(n_channels):
            weighted = design[rows] * weight[rows, d, None]
            gram[d] += np.dot(weighted.T, design[rows])
            moment[d] += np.dot(residual[rows, d], weighted)
    return gram, moment


def solve_bias(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Coefficients (M, D) of the log field from summed normal equations (lightly ridged)."""
    n_terms = gram.shape[1]
    coefficients = np.empty((n_terms, gram.shape[0]))
    for d in range(gram.shape[0]):
        ridge = 1e-6 * np.trace(gram[d]) / n_terms + 1e-12
        coefficients[:, d] = np.linalg.solve(gram[d] + ridge * np.eye(n_terms), moment[d])
    return coefficients


def design_matrix(coords: list[np.ndarray], degree: int) -> np.ndarray:
    """Basis values at the grid points of ``coords`` in C order, (prod(len(c)), M)."""
    polys = _axis_polynomials(coords, degree)
    columns = []
    for powers in bias_terms(degree, len(coords)):
        term = polys[0][powers[0]]
        for axis in range(1, len(coords)):
            term = np.multiply.outer(term, polys[axis][powers[axis]])
        columns.append(term.ravel())
    return np.stack(columns, axis=1)


# --------------------------------------------------------------------------------------------
# Block functions of the grid EM
# --------------------------------------------------------------------------------------------
def likelihood_statistics(
    intensities: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
) -> _em.Statistics:
    """E-step statistics of the bias-corrected intensities ``y_i / b_i`` of one block.

    The class parameters are estimated from these, the mixture's own responsibilities (global
    weights, no spatial prior). ``log_likelihood`` is that of the observed intensities,
    ``sum_i log p(y_i / b_i) - log b_i`` (the Jacobian of the field included).
    """
    voxels = np.flatnonzero(mask) if not mask.all() else slice(None)
    x = corrected_intensities(intensities, log_bias, voxels)
    stats = _em.chunk_statistics(x, weights, means, precisions_chol)
    log_b = log_bias.reshape(-1, log_bias.shape[-1])[voxels]
    stats["log_likelihood"] = stats["log_likelihood"] - log_b.sum(dtype=np.float64)
    return stats


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
) -> np.ndarray:
    """The final sweep of :func:`mean_field_sweep`, into given arrays; returns its column sums.

    ``probabilities`` (*block[::-1], K) float32 and ``labels`` (*block[::-1]) uint8
    (``1 + argmax_k``), each optional (views are fine), have the block's axes reversed (the
    block is a slab of the reversed grid of :class:`segment._sweeps.PosteriorGrid`, so they
    are in the image's own order) and get the computed planes (the others are not touched).
    Returns the probabilities summed over the computed voxels, (K,) float64.
    """
    from . import _kernels

    n_components = params[1].shape[0]
    counts = np.zeros(n_components)
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


def mean_field_final_by_component(
    previous: np.ndarray,
    intensities: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    params: tuple[np.ndarray, np.ndarray, np.ndarray],
    beta: float,
    kernel: np.ndarray,
    halo: tuple[int, int],
    rows: tuple[int, int],
    probabilities: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """The final sweep of the rows ``rows[0]:rows[1]`` (second axis) of a 3-D block.

    ``intensities`` and ``log_bias`` (may be views) are those of the computed voxels,
    ``[halo[0]:n0 - halo[1], rows[0]:rows[1]]``. ``probabilities`` (K, n0 - halo[0] -
    halo[1], n1, n2) float32 and ``labels`` (n0 - halo[0] - halo[1], n1, n2) uint8 get the
    computed voxels, each map apart. Returns their column sums, (K,) float64.
    """
    from . import _kernels

    counts = np.zeros(params[1].shape[0])
    if mask.ndim == 2:  # views with the unit third axis of the kernel's 3-D blocks
        probabilities, labels = probabilities[..., None], labels[..., None]
    _run_rows(previous, intensities, mask, log_bias, params, beta, kernel, halo,
              _kernels.FINAL_BY_COMPONENT, probabilities, labels, False, counts,
              rows=rows)  # fmt: skip
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


def corrected_intensities(
    intensities: np.ndarray, log_bias: np.ndarray, voxels: np.ndarray | slice
) -> np.ndarray:
    """``y_i / b_i`` of the chosen voxels of a block, (n, D) float32."""
    n_channels = intensities.shape[-1]
    x = intensities.reshape(-1, n_channels)[voxels].astype(np.float32)
    x *= np.exp(-log_bias.reshape(-1, n_channels)[voxels], dtype=np.float32)
    return x


def sweep_change(current: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sum over the block's fitted voxels of the last sweep's change, and their count."""
    change = current[..., -1][mask].sum(dtype=np.float64) / POSTERIOR_LEVELS
    return np.array([change, float(mask.sum())])


#: Weight of the prior ``log b = 0`` per fitted voxel, against a voxel's data weight of its
#: class's SNR^2 (about 20 to 1000 for tissue). See :func:`bias_block_statistics`.
BIAS_PRIOR_WEIGHT = 5.0


def bias_block_statistics(
    intensities: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    offset: tuple[int, ...],
    step: int,
    boxes: list[tuple[float, float]],
    degree: int,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bias_statistics` of the block's voxels on the global grid ``index % step == 0``.

    Class memberships are the mixture's responsibilities of the bias-corrected intensities.
    The sample depends only on global voxel indices, so it is the same for any chunking.

    A Gaussian prior pulls the coefficients to zero: :data:`BIAS_PRIOR_WEIGHT` times the number
    of sampled voxels is added to the diagonal of the normal equations (a ridge penalty per
    voxel). Without it, on a whole head at high noise the field and the class parameters trade
    off without end (the likelihood keeps rising as a radial field grows and classes swap); the
    prior stops that drift and costs little where the data determine the field.
    """
    sample, design = _cached_bias_sample(mask, offset, step, boxes, degree)
    y = intensities[sample].astype(np.float64)
    x = y * np.exp(-log_bias[sample].astype(np.float64))
    memberships = _em.e_step(x, weights, means, _em.precision_cholesky(covariances))[0].T
    return _penalised_bias_statistics(y, memberships, design, means, covariances)


#: Samples and basis values of recent blocks: the field's EM asks for the same ones at every
#: iteration (building them was a third of its time). Bounded; keyed by the block's content.
_SAMPLE_CACHE: dict = {}
_SAMPLE_CACHE_SIZE = 256


def _cached_bias_sample(mask, offset, step, boxes, degree):
    key = (
        tuple(offset), mask.shape, step, tuple(map(tuple, boxes)), degree,
        hashlib.blake2b(np.ascontiguousarray(mask).tobytes(), digest_size=16).digest(),
    )  # fmt: skip
    found = _SAMPLE_CACHE.get(key)
    if found is None:
        found = _bias_sample(mask, offset, step, boxes, degree)
        if len(_SAMPLE_CACHE) >= _SAMPLE_CACHE_SIZE:
            _SAMPLE_CACHE.pop(next(iter(_SAMPLE_CACHE)), None)
        _SAMPLE_CACHE[key] = found
    return found


def _bias_sample(mask, offset, step, boxes, degree):
    """Boolean index of the block's sampled fitted voxels and their basis values (n, M)."""
    picks = tuple(slice((-o) % step, None, step) for o in offset)
    coords = [
        axis_coordinates(o + p.start, o + size, box)[::step]
        for o, p, size, box in zip(offset, picks, mask.shape, boxes)
    ]
    sample = np.zeros(mask.shape, bool)
    sample[picks] = mask[picks]
    design = design_matrix(coords, degree)[mask[picks].ravel()]
    return sample, design


def _penalised_bias_statistics(y, memberships, design, means, covariances):
    n_terms = design.shape[1]
    if len(y) == 0:
        return np.zeros((y.shape[1], n_terms, n_terms)), np.zeros((y.shape[1], n_terms))
    gram, moment = bias_statistics(y, memberships, design, means, covariances)
    gram += BIAS_PRIOR_WEIGHT * len(y) * np.eye(n_terms)
    return gram, moment


def log_bias_grid_block(
    shape: tuple[int, ...],
    offset: tuple[int, ...],
    coefficients: np.ndarray,
    boxes: list[tuple[float, float]],
    degree: int,
    reverse: bool = False,
) -> np.ndarray:
    """``log b`` on the block of ``shape`` at ``offset``, (*shape, D) float32.

    With ``reverse``, ``shape`` and ``offset`` are given last axis first, as is the result.
    """
    boxes = boxes[::-1] if reverse else boxes
    coords = [axis_coordinates(o, o + n, box) for o, n, box in zip(offset, shape, boxes)]
    return log_bias_block(coefficients, coords, degree, reverse).astype(np.float32)
