"""The EM maths of a Gaussian mixture, as small pure functions on numpy arrays.

No I/O, no Dask, no file names. Every function takes the features of *one chunk* (or of all
voxels) and returns arrays; the Dask layer in :mod:`segment._chunked` only maps them over
chunks and sums their outputs. The statistics of :func:`chunk_statistics`, the pass repeated
every iteration, run in compiled loops (``segment/_estep.c``) that release the GIL; the numpy
function they replace, :func:`reference_statistics` (:func:`e_step` then :func:`moments`), stays
here as their reference: these are the two E-step paths.

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

from collections.abc import Callable
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
    """Responsibilities of a chunk, (N, K) float64 voxel-major (see :func:`e_step`)."""

    def rows(X):
        out = np.empty((X.shape[0], means.shape[0]))
        for start in range(0, X.shape[0], BLOCK):
            block = np.asarray(X[start : start + BLOCK], dtype=np.float64)
            out[start : start + BLOCK] = e_step(block, weights, means, precisions_chol)[0].T
        return out

    return by_value(X, rows)


def by_value(X: np.ndarray, rows: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``rows(X)``, for one-channel integer features computed once per value and looked up.

    The same numbers as ``rows(X)`` when each row's result depends on its value only, without
    an (N, K) float64 array or an argmax over N rows: on the 8.7 M-voxel uint8 head the labels
    and maps took 1.2 s less this way.
    """
    X = np.asarray(X)
    if X.dtype.kind in "iu" and X.shape[1] == 1 and len(X):
        low, high = int(X.min()), int(X.max())
        if high - low < min(1 << 16, len(X)):
            table = rows(np.arange(low, high + 1, dtype=np.float64)[:, None])
            return table[X[:, 0].astype(np.intp) - low]
    return rows(X)


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
    twin :func:`reference_statistics` does.

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
    if _kernels.compiled is None:  # not built, or turned off: the numpy reference
        return reference_statistics(X, weights, means, precisions_chol, sample_weight)
    if means.shape[1] == 1:
        return _compiled_statistics_1d(X, weights, means, precisions_chol, sample_weight)
    return _compiled_statistics_nd(X, weights, means, precisions_chol, sample_weight)


def reference_statistics(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    sample_weight: np.ndarray | None = None,
) -> Statistics:
    """:func:`chunk_statistics` by :func:`e_step` and :func:`moments`, block by block.

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
        parts.append(moments(block, resp, means, log_likelihood, n_samples))
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
    the moments of :func:`moments` voxel block by voxel block, in float64, in one loop over
    the chunk that releases the GIL, so Dask threads run chunks side by side. It works on the
    scaled residual ``y_kn = (x_n - c_k) / (sqrt(2) sigma_k)``, with ``a_k = log pi_k -
    log sigma_k - log(2 pi) / 2`` so that ``log pi_k N(x_n | k) = a_k - y_kn^2``, and adds
    ``sum_n r_nk y_kn^j w_n`` for j = 0, 1, 2; here they are scaled back to intensities.
    :func:`reference_statistics` is its numpy reference (the tests compare the two).
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

    ``segment._estep.statistics_nd`` (C) runs :func:`e_step` and :func:`moments`
    (the reference, :func:`reference_statistics`) voxel block by voxel block in one loop over
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


def moments(
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
