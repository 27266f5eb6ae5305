"""The EM maths of a Gaussian mixture, as small pure functions on numpy arrays.

No I/O, no Dask, no file names. Every function takes the features of *one chunk* (or of all
voxels) and returns arrays; the Dask layer in :mod:`segment._chunked` only maps them over
chunks and sums their outputs. The statistics of :func:`chunk_statistics`, the pass repeated
every iteration, run in compiled loops (``segment/_estep.c``) that release the GIL;
the numpy functions they replace, :func:`_chunk_statistics_1d` (one channel) and
:func:`_numpy_statistics` (any number), stay here as their reference.

Notation: ``N`` voxels, ``D`` channels, ``K`` components. Features ``X`` are ``(N, D)``.
Optional non-negative ``sample_weight`` of shape ``(N,)`` counts how many voxels each row
stands for (the distinct-values fast path fits one row per distinct intensity, weighted by its
count, which is the same estimator exactly).

Parameters are carried like scikit-learn's ``GaussianMixture``: ``weights`` (K,), ``means``
(K, D) and the Cholesky factors of the precision matrices ``precisions_chol`` (K, D, D), upper
triangular with ``precision = precisions_chol @ precisions_chol.T``.

References
----------
Dempster, Laird & Rubin (1977), Maximum likelihood from incomplete data via the EM algorithm.
J. R. Stat. Soc. B 39(1), 1-38.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from scipy import linalg

from . import _kernels

LOG_2PI = np.log(2.0 * np.pi)
#: Added to each N_k before dividing, like scikit-learn, so an empty component gives no 0/0.
EPS = 10.0 * np.finfo(np.float64).eps


class Statistics(TypedDict):
    """Sufficient statistics of one chunk, centred on ``centers`` (the means used in the E-step).

    nk : (K,) sum of responsibilities, N_k = sum_n r_nk
    sum_centered : (K, D) sum_n r_nk (x_n - c_k)
    scatter : (K, D, D) S_k = sum_n r_nk (x_n - c_k)(x_n - c_k)^T
    log_likelihood : float, sum_n log sum_k pi_k N(x_n | mu_k, Sigma_k)
    n_samples : float, sum of sample weights (number of voxels)
    """

    nk: np.ndarray
    sum_centered: np.ndarray
    scatter: np.ndarray
    log_likelihood: float
    n_samples: float


# --------------------------------------------------------------------------------------------
# Covariances and their Cholesky precisions
# --------------------------------------------------------------------------------------------
def precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """Upper-triangular Cholesky factors of the precision matrices.

    Parameters
    ----------
    covariances : (K, D, D) array
        Symmetric positive-definite covariance matrices.

    Returns
    -------
    precisions_chol : (K, D, D) array
        ``U_k`` such that ``inv(Sigma_k) = U_k @ U_k.T``.

    Raises
    ------
    numpy.linalg.LinAlgError
        If a covariance is not positive definite.
    """
    n_components, n_features, _ = covariances.shape
    precisions_chol = np.empty_like(covariances, dtype=np.float64)
    for k, covariance in enumerate(covariances):
        cov_chol = linalg.cholesky(covariance, lower=True)
        precisions_chol[k] = linalg.solve_triangular(cov_chol, np.eye(n_features), lower=True).T
    return precisions_chol


def covariances_from_precision_cholesky(precisions_chol: np.ndarray) -> np.ndarray:
    """Invert :func:`precision_cholesky`: ``Sigma_k = inv(U_k U_k^T)``, (K, D, D)."""
    precisions = precisions_chol @ np.swapaxes(precisions_chol, 1, 2)
    return np.linalg.inv(precisions)


def floor_covariances(covariances: np.ndarray, variance_floor: np.ndarray) -> np.ndarray:
    """Hold every variance at or above the floor, so no component collapses onto one value.

    With one channel this is ``max(sigma_k^2, floor)``. With D channels the floor is applied to
    the eigenvalues of each covariance after scaling channel ``d`` by ``1/sqrt(floor_d)``, so
    every direction keeps a variance of at least the floor of the channels it mixes, whatever
    the channels' units.

    Parameters
    ----------
    covariances : (K, D, D) array
    variance_floor : (D,) array
        Positive floor per channel, in squared intensity units.

    Returns
    -------
    floored : (K, D, D) array
    """
    scale = np.sqrt(np.asarray(variance_floor, dtype=np.float64))
    if covariances.shape[1] == 1:
        return np.maximum(covariances, variance_floor[0])
    whitened = covariances / np.multiply.outer(scale, scale)
    eigenvalues, eigenvectors = np.linalg.eigh(whitened)
    eigenvalues = np.maximum(eigenvalues, 1.0)
    floored = (eigenvectors * eigenvalues[:, None, :]) @ np.swapaxes(eigenvectors, 1, 2)
    floored = 0.5 * (floored + np.swapaxes(floored, 1, 2))
    return floored * np.multiply.outer(scale, scale)


# --------------------------------------------------------------------------------------------
# E-step. Arrays over (component, voxel) are stored component-major, (K, N): the reductions
# over K then run along contiguous rows, several times faster than along a short last axis.
# --------------------------------------------------------------------------------------------
#: Voxels per inner block: small enough that the (K, block) temporaries stay in the CPU cache,
#: large enough that numpy, not Python, holds the GIL (8192 scaled worse on 2 threads).
BLOCK = 16384
#: Voxels per block of the one-channel statistics kernel, whose two (K, block) float64 buffers
#: are reused from block to block: 2 x 6 x 8192 x 8 B = 0.8 MB stays in a core's L2 cache.
#: Its weighted row sums are ``np.dot`` products, which release the GIL while BLAS runs (the
#: ``@`` operator held it: two Dask threads took turns; ``einsum`` is half as fast). OpenBLAS
#: computes products this short on the calling thread; from n = 10001 it wakes its own threads,
#: which then compete with the Dask workers (measured 2 to 20 times slower): keep it under 10001.
BLOCK_1D = 8192
#: The one-channel kernel raises exponents below this to it: ``np.exp`` is 3 to 100 times slower
#: on arguments whose result underflows (to 0 or a subnormal number), which the components far
#: from a voxel give. It changes each ``e_nk`` by less than 1e-304.
_MIN_EXPONENT = -700.0
#: The one-channel kernel exponentiates ``log pi_k + log N(x | k)`` without log-sum-exp's shift
#: when every ``a_k`` (the log density at the centre) is below this, far from exp's overflow
#: at 709.8, and redoes with the shift any block where some voxel's total density is below
#: ``_MIN_UNSHIFTED_TOTAL``: what the floor above adds is then below 1e-154 of any voxel's total.
_MAX_UNSHIFTED_LOG_DENSITY = 600.0
_MIN_UNSHIFTED_TOTAL = 1e-150


def estimate_log_gaussian_prob(
    X: np.ndarray, means: np.ndarray, precisions_chol: np.ndarray
) -> np.ndarray:
    """Log density of each voxel under each Gaussian, ``log N(x_n | mu_k, Sigma_k)``.

    Parameters
    ----------
    X : (N, D) array
    means : (K, D) array
    precisions_chol : (K, D, D) array

    Returns
    -------
    log_prob : (K, N) float64 array (component-major)
    """
    n_features = means.shape[1]
    # log det(Sigma_k)^(-1/2), read off the Cholesky diagonal of the precision
    log_det = np.log(np.diagonal(precisions_chol, axis1=1, axis2=2)).sum(axis=1)
    if n_features == 1:
        y = np.subtract(X[:, 0], means[:, :1])  # (K, N): x_n - mu_k
        y *= precisions_chol[:, 0]
        log_prob = np.square(y, out=y)
    else:
        log_prob = np.empty((means.shape[0], X.shape[0]))
        for k, (mu, prec_chol) in enumerate(zip(means, precisions_chol)):
            y = X @ prec_chol - mu @ prec_chol
            log_prob[k] = np.einsum("nd,nd->n", y, y)
    log_prob *= -0.5
    log_prob += (log_det - 0.5 * n_features * LOG_2PI)[:, None]
    return log_prob


def normalize_log_prob(weighted_log_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities from ``log pi_k + log N(x_n | k)`` by log-sum-exp, in place.

    A voxel far from every component still gets finite responsibilities that sum to 1
    (no 0/0, no warning).

    Parameters
    ----------
    weighted_log_prob : (K, N) array
        Overwritten with the responsibilities.

    Returns
    -------
    resp : (K, N) array
        ``r_nk``, the same memory as the input.
    log_norm : (N,) array
        ``log p(x_n) = log sum_k pi_k N(x_n | k)``.
    """
    peak = weighted_log_prob.max(axis=0)
    weighted_log_prob -= peak
    resp = np.exp(weighted_log_prob, out=weighted_log_prob)
    total = resp.sum(axis=0)
    resp /= total
    return resp, np.log(total) + peak


def e_step(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    log_prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Responsibilities and per-voxel log-likelihood.

    ``r_nk = pi_k N(x_n | mu_k, Sigma_k) / sum_j pi_j N(x_n | mu_j, Sigma_j)``.

    Parameters
    ----------
    X : (N, D) array
    weights, means, precisions_chol : mixture parameters, (K,), (K, D), (K, D, D)
    log_prior : (K, N) array, optional
        Per-voxel log prior replacing ``log pi_k`` (used by a spatial prior).

    Returns
    -------
    resp : (K, N) float64 array (component-major)
    log_norm : (N,) float64 array, ``log p(x_n)``
    """
    weighted = estimate_log_gaussian_prob(X, means, precisions_chol)
    weighted += np.log(weights)[:, None] if log_prior is None else log_prior
    return normalize_log_prob(weighted)


def responsibilities(
    X: np.ndarray, weights: np.ndarray, means: np.ndarray, precisions_chol: np.ndarray
) -> np.ndarray:
    """Responsibilities of a chunk as (N, K) float64, voxel-major for output.

    Single-channel integer data are evaluated once per value in ``[min, max]`` and looked up,
    which gives the same numbers as the per-voxel E-step at a fraction of the cost.
    """
    X = np.asarray(X)
    if X.dtype.kind in "iu" and X.shape[1] == 1 and len(X):
        low, high = int(X.min()), int(X.max())
        if high - low < min(1 << 16, len(X)):
            grid = np.arange(low, high + 1, dtype=np.float64)[:, None]
            resp, _ = e_step(grid, weights, means, precisions_chol)
            return resp.T[X[:, 0].astype(np.intp) - low]
    out = np.empty((X.shape[0], means.shape[0]))
    for start in range(0, X.shape[0], BLOCK):
        block = np.asarray(X[start : start + BLOCK], dtype=np.float64)
        out[start : start + BLOCK] = e_step(block, weights, means, precisions_chol)[0].T
    return out


def chunk_statistics(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None = None,
) -> Statistics:
    """E-step on one chunk, reduced at once to float64 sufficient statistics.

    The second moments are centred on the means used in this E-step (``c_k = means``) and
    corrected in :func:`m_step`; this avoids the ``E[x^2] - E[x]^2`` cancellation that raw MRI
    intensities in the thousands would cause. Compiled kernels do the work without holding
    the GIL (:func:`_compiled_statistics_1d`, :func:`_compiled_statistics_nd`), so Dask
    threads run chunks side by side; without them (see :mod:`segment._kernels`) their numpy
    twins :func:`_chunk_statistics_1d` and :func:`_numpy_statistics` do.

    Parameters
    ----------
    X : (N, D) array
    weights, means, precisions_chol : mixture parameters, (K,), (K, D), (K, D, D)
    sample_weight : (N,) array, optional
        Number of voxels each row stands for (default 1 each).

    Returns
    -------
    Statistics
        Small dict of (K,), (K, D), (K, D, D) arrays and two floats; no N x K array survives.
    """
    if _kernels.compiled is None:  # not built, or turned off: the numpy twins
        twin = _chunk_statistics_1d if means.shape[1] == 1 else _numpy_statistics
        return twin(X, weights, means, precisions_chol, sample_weight)
    if means.shape[1] == 1:
        return _compiled_statistics_1d(X, weights, means, precisions_chol, sample_weight)
    return _compiled_statistics_nd(X, weights, means, precisions_chol, sample_weight)


def _numpy_statistics(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None = None,
) -> Statistics:
    """:func:`chunk_statistics` by :func:`e_step` and :func:`_moments`, block by block.

    The numpy reference of the compiled kernels, for any number of channels.
    """
    parts = []
    for start in range(0, max(X.shape[0], 1), BLOCK):
        block = np.asarray(X[start : start + BLOCK], dtype=np.float64)
        resp, log_norm = e_step(block, weights, means, precisions_chol)
        if sample_weight is None:
            log_likelihood, n_samples = log_norm.sum(), float(block.shape[0])
        else:
            block_weight = np.asarray(sample_weight[start : start + BLOCK], dtype=np.float64)
            resp *= block_weight
            log_likelihood, n_samples = log_norm @ block_weight, block_weight.sum()
        parts.append(_moments(block, resp, means, log_likelihood, n_samples))
    return combine_statistics(parts)


def _compiled_statistics_1d(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None,
) -> Statistics:
    """:func:`chunk_statistics` for one channel by the compiled kernel, without the GIL.

    ``segment._estep.statistics_1d`` (C, ``segment/_estep.c``) runs the E-step of
    :func:`e_step` (shifted by each voxel's largest term, as :func:`normalize_log_prob`) and
    the moments of :func:`_moments` voxel block by voxel block, in float64, in one loop over
    the chunk that releases the GIL, so Dask threads run chunks side by side. It works on the
    scaled residual ``y_kn = (x_n - c_k) / (sqrt(2) sigma_k)`` of
    :func:`_chunk_statistics_1d`, which stays the numpy reference (the tests compare the
    two), and adds ``sum_n r_nk y_kn^j w_n`` for j = 0, 1, 2; here they are scaled back to
    intensities.
    """
    x, w = _kernel_inputs(np.asarray(X)[:, 0], sample_weight)
    precision_root = np.asarray(precisions_chol[:, 0, 0], dtype=np.float64)  # 1 / sigma_k
    sigma_root2 = np.sqrt(2.0) / precision_root  # sqrt(2) sigma_k
    offset = np.log(weights) + np.log(precision_root) - 0.5 * LOG_2PI  # a_k
    sums = np.zeros((3, means.shape[0]))
    log_likelihood = _kernels.compiled.statistics_1d(
        x, w, np.ascontiguousarray(means[:, 0], dtype=np.float64), 1.0 / sigma_root2,
        offset.astype(np.float64), sums,
    )  # fmt: skip
    return Statistics(
        nk=sums[0],
        sum_centered=(sums[1] * sigma_root2)[:, None],
        scatter=(sums[2] * sigma_root2**2)[:, None, None],
        log_likelihood=float(log_likelihood),
        n_samples=float(len(x) if sample_weight is None else w.sum()),
    )


def _kernel_inputs(X: np.ndarray, sample_weight: np.ndarray | None):
    """Voxels and weights as the compiled kernels take them: C-contiguous, float32 or float64
    voxels, float64 weights (length 0 for a weight of 1 per voxel)."""
    if X.dtype != np.float32:  # the kernels are compiled for float32 and float64 voxels
        X = X.astype(np.float64, copy=False)
    if sample_weight is None:
        return np.ascontiguousarray(X), np.empty(0)
    return np.ascontiguousarray(X), np.ascontiguousarray(sample_weight, dtype=np.float64)


def _compiled_statistics_nd(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None,
) -> Statistics:
    """:func:`chunk_statistics` for several channels by the compiled kernel, without the GIL.

    ``segment._estep.statistics_nd`` (C) runs :func:`e_step` and :func:`_moments`
    (the reference, :func:`_numpy_statistics`) voxel block by voxel block in one loop over
    the chunk; it fills the lower triangle of each scatter matrix, mirrored here.
    """
    X, w = _kernel_inputs(np.asarray(X), sample_weight)
    n_components, n_features = means.shape
    precisions_chol = np.ascontiguousarray(precisions_chol, dtype=np.float64)
    log_det = np.log(np.diagonal(precisions_chol, axis1=1, axis2=2)).sum(axis=1)
    offset = np.log(weights) + log_det - 0.5 * n_features * LOG_2PI
    nk = np.zeros(n_components)
    sum_centered = np.zeros((n_components, n_features))
    scatter = np.zeros((n_components, n_features, n_features))
    log_likelihood = _kernels.compiled.statistics_nd(
        X, w, np.ascontiguousarray(means, dtype=np.float64), precisions_chol,
        offset.astype(np.float64), nk, sum_centered, scatter,
    )  # fmt: skip
    return Statistics(
        nk=nk,
        sum_centered=sum_centered,
        scatter=scatter + np.swapaxes(np.tril(scatter, -1), 1, 2),
        log_likelihood=float(log_likelihood),
        n_samples=float(len(X) if sample_weight is None else w.sum()),
    )


def _chunk_statistics_1d(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None,
) -> Statistics:
    """:func:`chunk_statistics` for one channel in numpy, the reference of the compiled kernel.

    :func:`chunk_statistics` calls :func:`_compiled_statistics_1d`, which gives these numbers
    (to rounding) in a loop that releases the GIL; this function stays as its documented,
    tested reference. The same E-step and moments as the general path, fused per block.

    With the scaled residual ``y_kn = (x_n - c_k) / (sqrt(2) sigma_k)`` the log-domain E-step
    is ``log pi_k + log N(x_n | c_k, sigma_k^2) = a_k - y_kn^2``, with
    ``a_k = log pi_k - log sigma_k - log(2 pi) / 2``. Then ``e_nk = exp(a_k - y_kn^2)``,
    ``t_n = sum_k e_nk = p(x_n)``, ``r_nk = e_nk / t_n``, and the centred moments are weighted
    row sums, ``sum_n r_nk (x_n - c_k)^j = (sqrt(2) sigma_k)^j sum_n e_nk y_kn^j (w_n / t_n)``,
    j = 0, 1, 2, so no (K, N) array is normalised, re-centred or allocated per block: two
    (K, block) buffers are reused, which keeps the work in the CPU cache.

    ``e_nk`` is computed without subtracting the per-voxel maximum of log-sum-exp: ``a_k``
    is checked to be far below the overflow limit, and a block where some ``t_n`` is tiny
    (a voxel tens of standard deviations from every component) is redone by
    :func:`_shifted_block_sums`, which subtracts it. That saves two passes over the (K, block)
    buffer and, with the log-likelihood taken once per chunk, leaves a dozen numpy calls per
    block: each call takes the GIL, and fewer calls is what lets two threads scale. Exponents
    are floored at ``_MIN_EXPONENT`` first, which makes ``np.exp`` about twice as fast on
    real scans (see there).
    """
    x = np.asarray(X)[:, 0]
    n_voxels, n_components = len(x), means.shape[0]
    sigma_root2 = np.sqrt(2.0) / precisions_chol[:, 0, 0]  # sqrt(2) sigma_k
    params = (
        means[:, :1],  # c_k
        1.0 / sigma_root2[:, None],
        (np.log(weights) + np.log(precisions_chol[:, 0, 0]) - 0.5 * LOG_2PI)[:, None],  # a_k
    )
    centers, inv_scale, offset = params
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    block_size = min(BLOCK_1D, max(n_voxels, 1))
    starts = range(0, n_voxels, block_size)
    sums = np.zeros((len(starts), 3, n_components))  # per block: sum_n e_nk y_kn^j w_n / t_n
    totals = np.ones(n_voxels)  # t_n
    redo: Sequence[int] = starts  # blocks left to the log-sum-exp of _shifted_block_sums
    if offset.max() < _MAX_UNSHIFTED_LOG_DENSITY:  # then no e_nk overflows
        (y_buffer, e_buffer), per_voxel = (
            np.empty((2, n_components, block_size)),
            np.empty(block_size),
        )
        # A voxel far from every component (t_n at the floor) can give inf or nan below, in a
        # block redone afterwards.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for i, start in enumerate(starts):
                stop = min(start + block_size, n_voxels)
                y, e = (y_buffer, e_buffer) if stop - start == block_size else (
                    y_buffer[:, : stop - start], e_buffer[:, : stop - start])  # fmt: skip
                total, ratio, row = totals[start:stop], per_voxel[: stop - start], sums[i]
                np.subtract(x[start:stop], centers, out=y)  # float32 voxels cast on the fly
                np.multiply(y, inv_scale, out=y)  # y_kn
                np.square(y, out=e)
                np.subtract(offset, e, out=e)
                np.maximum(e, _MIN_EXPONENT, out=e)
                np.exp(e, out=e)  # e_nk
                np.add.reduce(e, axis=0, out=total)  # t_n
                if w is None:
                    np.reciprocal(total, out=ratio)
                else:
                    np.divide(w[start:stop], total, out=ratio)
                np.dot(e, ratio, out=row[0])  # BLAS, without the GIL (see BLOCK_1D)
                np.multiply(e, y, out=e)
                np.dot(e, ratio, out=row[1])
                np.multiply(e, y, out=e)
                np.dot(e, ratio, out=row[2])
        underflow = np.flatnonzero(~(totals > _MIN_UNSHIFTED_TOTAL))  # nan too
        redo = [starts[i] for i in np.unique(underflow // block_size)]
    log_likelihood = 0.0
    for start in redo:
        stop = min(start + block_size, n_voxels)
        block_w = None if w is None else w[start:stop]
        log_likelihood += _shifted_block_sums(
            x[start:stop], block_w, params, sums[start // block_size]
        )
        totals[start:stop] = 1.0  # their log-likelihood is counted above
    log_totals = np.log(totals, out=totals)
    if w is not None:  # not np.dot: OpenBLAS would wake its threads for a long vector
        log_totals *= w
    log_likelihood += log_totals.sum()
    row_sums = sums.sum(axis=0)
    return Statistics(
        nk=row_sums[0],
        sum_centered=(row_sums[1] * sigma_root2)[:, None],
        scatter=(row_sums[2] * sigma_root2**2)[:, None, None],
        log_likelihood=float(log_likelihood),
        n_samples=float(n_voxels if w is None else w.sum()),
    )


def _shifted_block_sums(
    x: np.ndarray, w: np.ndarray | None, params: tuple, row_sums: np.ndarray
) -> float:
    """One block of :func:`_chunk_statistics_1d` by log-sum-exp, for voxels far from all.

    Subtracting each voxel's largest ``a_k - y_kn^2`` before the exponential keeps every
    ``t_n >= 1``. Writes the (3, K) weighted row sums into ``row_sums``; returns the block's
    log-likelihood.
    """
    centers, inv_scale, offset = params
    y = np.subtract(np.asarray(x, dtype=np.float64), centers)
    y *= inv_scale
    e = np.subtract(offset, np.square(y))
    peak = e.max(axis=0)
    e -= peak
    np.maximum(e, _MIN_EXPONENT, out=e)
    np.exp(e, out=e)
    total = e.sum(axis=0)
    log_norm = np.log(total) + peak
    ratio = np.reciprocal(total) if w is None else w / total
    row_sums[0] = np.dot(e, ratio)
    e *= y
    row_sums[1] = np.dot(e, ratio)
    e *= y
    row_sums[2] = np.dot(e, ratio)
    return float(log_norm.sum() if w is None else np.dot(log_norm, w))


def _moments(
    X: np.ndarray, resp: np.ndarray, centers: np.ndarray, log_likelihood: float, n_samples: float
) -> Statistics:
    """Responsibility-weighted zeroth, first and centred second moments of ``X`` (N, D).

    ``resp`` is (K, N) and is overwritten.
    """
    n_components, n_features = centers.shape
    nk = resp.sum(axis=1)
    if n_features == 1:
        diff = np.subtract(X[:, 0], centers[:, :1])  # (K, N)
        resp *= diff
        sum_centered = resp.sum(axis=1)[:, None]
        scatter = np.einsum("kn,kn->k", resp, diff)[:, None, None]
    else:
        sum_centered = np.empty((n_components, n_features))
        scatter = np.empty((n_components, n_features, n_features))
        for k in range(n_components):
            diff = X - centers[k]
            weighted = resp[k, :, None] * diff
            sum_centered[k] = weighted.sum(axis=0)
            scatter[k] = weighted.T @ diff
    return Statistics(
        nk=nk,
        sum_centered=sum_centered,
        scatter=scatter,
        log_likelihood=float(log_likelihood),
        n_samples=float(n_samples),
    )


def combine_statistics(parts: list[Statistics]) -> Statistics:
    """Sum the statistics of several chunks, in the order given (deterministic)."""
    first, *rest = parts
    total = {key: np.array(value, dtype=np.float64) for key, value in first.items()}
    for part in rest:
        for key in total:
            total[key] = total[key] + part[key]
    total["log_likelihood"] = float(total["log_likelihood"])
    total["n_samples"] = float(total["n_samples"])
    return Statistics(**total)


# --------------------------------------------------------------------------------------------
# M-step
# --------------------------------------------------------------------------------------------
def m_step(
    stats: Statistics, centers: np.ndarray, variance_floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New weights, means and covariances from summed statistics.

    ``N_k = sum_n r_nk``, ``mu_k = (1/N_k) sum_n r_nk x_n``,
    ``Sigma_k = (1/N_k) sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T`` (around the *new* means),
    ``pi_k = N_k / N``, then the variance floor.

    Parameters
    ----------
    stats : Statistics
        Summed over all chunks, centred on ``centers``.
    centers : (K, D) array
        The means the statistics were centred on (those of the E-step).
    variance_floor : (D,) array

    Returns
    -------
    weights : (K,) array
    means : (K, D) array
    covariances : (K, D, D) array
    """
    nk = stats["nk"] + EPS
    shift = stats["sum_centered"] / nk[:, None]  # mu_k - c_k
    means = centers + shift
    covariances = stats["scatter"] / nk[:, None, None] - shift[:, :, None] * shift[:, None, :]
    weights = nk / nk.sum()
    return weights, means, floor_covariances(covariances, variance_floor)


# --------------------------------------------------------------------------------------------
# Data summaries (one pass before fitting)
# --------------------------------------------------------------------------------------------
class Moments(TypedDict):
    """Per-channel count, mean, centred sum of squares, extremes and finiteness of a chunk."""

    n: float
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    n_nonfinite: int


def chunk_moments(X: np.ndarray, sample_weight: np.ndarray | None = None) -> Moments:
    """Weighted mean, centred sum of squares, min, max and non-finite count of ``X`` (N, D).

    Finite data (the usual case, told by finite extremes: NaN and inf propagate to them) are
    summarised without a mask or a float64 copy of ``X``.
    """
    X = np.asarray(X)
    n_features = X.shape[1]
    n_nonfinite = 0
    if n_features == 1 and sample_weight is None and X.dtype in (np.float32, np.float64):
        # one compiled pass pair, no float64 copy, no GIL: the moments pass before a float fit
        x = np.ascontiguousarray(X[:, 0])
        minimum, maximum, mean, m2 = _kernels.moments_1d(x)
        if len(x) and np.isfinite(minimum) and np.isfinite(maximum):
            return Moments(
                n=float(len(x)), mean=np.array([mean]), m2=np.array([m2]),
                minimum=np.array([minimum]), maximum=np.array([maximum]), n_nonfinite=0,
            )  # fmt: skip
    if len(X):
        minimum, maximum = X.min(axis=0), X.max(axis=0)
        if X.dtype.kind == "f" and not (np.isfinite(minimum).all() and np.isfinite(maximum).all()):
            finite = np.isfinite(X).all(axis=1)
            n_nonfinite = int(len(X) - finite.sum())
            X = X[finite]
            sample_weight = None if sample_weight is None else sample_weight[finite]
            if len(X):
                minimum, maximum = X.min(axis=0), X.max(axis=0)
    w = None if sample_weight is None else np.asarray(sample_weight, np.float64)
    n = float(len(X)) if w is None else float(w.sum())
    if n == 0:
        zeros, inf = np.zeros(n_features), np.full(n_features, np.inf)
        return Moments(n=0.0, mean=zeros, m2=zeros, minimum=inf, maximum=-inf,
                       n_nonfinite=n_nonfinite)  # fmt: skip
    if w is None:
        mean = X.sum(axis=0, dtype=np.float64) / n
        diff = np.subtract(X, mean, dtype=np.float64)
        m2 = np.einsum("nd,nd->d", diff, diff)
    else:
        X = X.astype(np.float64, copy=False)
        mean = w @ X / n
        m2 = w @ (X - mean) ** 2
    return Moments(
        n=n, mean=mean, m2=m2, minimum=minimum.astype(np.float64),
        maximum=maximum.astype(np.float64), n_nonfinite=n_nonfinite,
    )  # fmt: skip


def combine_moments(parts: list[Moments]) -> Moments:
    """Merge chunk moments with Chan et al.'s parallel update (no cancellation)."""
    total = parts[0]
    for part in parts[1:]:
        n = total["n"] + part["n"]
        if part["n"] == 0 or n == 0:
            mean, m2 = total["mean"], total["m2"]
        elif total["n"] == 0:
            mean, m2 = part["mean"], part["m2"]
        else:
            delta = part["mean"] - total["mean"]
            mean = total["mean"] + delta * part["n"] / n
            m2 = total["m2"] + part["m2"] + delta**2 * total["n"] * part["n"] / n
        total = Moments(
            n=n,
            mean=mean,
            m2=m2,
            minimum=np.minimum(total["minimum"], part["minimum"]),
            maximum=np.maximum(total["maximum"], part["maximum"]),
            n_nonfinite=total["n_nonfinite"] + part["n_nonfinite"],
        )
    return total
