"""A dense, obviously correct EM for a full-covariance Gaussian mixture, to test the engine against.

Textbook formulas on voxel-major ``(N, K)`` arrays, written for clarity, not speed or memory:

E-step
    ``r_nk = pi_k N(x_n | mu_k, Sigma_k) / sum_j pi_j N(x_n | mu_j, Sigma_j)``
M-step
    ``N_k = sum_n r_nk``, ``mu_k = sum_n r_nk x_n / N_k``,
    ``Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k`` (around the *new* means),
    ``pi_k = N_k / N``.
Variance floor
    D = 1: ``max(sigma_k^2, floor)``. D > 1: after scaling channel d by ``1/sqrt(floor_d)``,
    eigenvalues below 1 are raised to 1 (the constrained maximiser of the Gaussian likelihood).

Sample weights ``w_n`` (how many voxels a row stands for) multiply each row's contribution.
The densities come from :func:`scipy.stats.multivariate_normal.logpdf`, independently of the
Cholesky-precision code of ``segment._em``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal


def _as_2d(X):
    X = np.asarray(X, dtype=np.float64)
    return X.reshape(-1, 1) if X.ndim == 1 else X


def _as_covariances(covariances, n_components, n_features):
    return np.asarray(covariances, dtype=np.float64).reshape(n_components, n_features, n_features)


def log_gaussian(X, means, covariances):
    """``log N(x_n | mu_k, Sigma_k)`` as an (N, K) array."""
    X = _as_2d(X)
    means = np.asarray(means, dtype=np.float64).reshape(-1, X.shape[1])
    covariances = _as_covariances(covariances, len(means), X.shape[1])
    columns = [
        multivariate_normal(mean=mu, cov=cov).logpdf(X).reshape(len(X))
        for mu, cov in zip(means, covariances)
    ]
    return np.stack(columns, axis=1)


def e_step(X, weights, means, covariances):
    """Responsibilities ``r`` (N, K) and ``log p(x_n)`` (N,)."""
    weighted = log_gaussian(X, means, covariances) + np.log(np.asarray(weights, np.float64))
    log_norm = logsumexp(weighted, axis=1)
    return np.exp(weighted - log_norm[:, None]), log_norm


def floor_covariances(covariances, variance_floor):
    """Apply the variance floor (scalar or one per channel) to (K, D, D) covariances."""
    covariances = np.array(covariances, dtype=np.float64)
    n_features = covariances.shape[1]
    floor = np.broadcast_to(np.asarray(variance_floor, dtype=np.float64), (n_features,))
    if n_features == 1:
        return np.maximum(covariances, floor[0])
    scale = np.diag(1.0 / np.sqrt(floor))
    out = np.empty_like(covariances)
    for k, cov in enumerate(covariances):
        values, vectors = np.linalg.eigh(scale @ cov @ scale)
        whitened = vectors @ np.diag(np.maximum(values, 1.0)) @ vectors.T
        out[k] = np.linalg.inv(scale) @ whitened @ np.linalg.inv(scale)
    return out


def m_step(X, resp, variance_floor=None, sample_weight=None):
    """New ``(weights, means, covariances)`` from responsibilities ``resp`` (N, K)."""
    X = _as_2d(X)
    if sample_weight is not None:
        resp = resp * np.asarray(sample_weight, dtype=np.float64)[:, None]
    n_components = resp.shape[1]
    nk = resp.sum(axis=0)
    means = np.empty((n_components, X.shape[1]))
    covariances = np.empty((n_components, X.shape[1], X.shape[1]))
    for k in range(n_components):
        means[k] = resp[:, k] @ X / nk[k]
        diff = X - means[k]
        covariances[k] = (resp[:, k, None] * diff).T @ diff / nk[k]
    weights = nk / nk.sum()
    if variance_floor is not None:
        covariances = floor_covariances(covariances, variance_floor)
    return weights, means, covariances


def one_iteration(X, weights, means, covariances, variance_floor=None, sample_weight=None):
    """One EM iteration (E-step on the given parameters, then M-step): new parameters."""
    resp, _ = e_step(X, weights, means, covariances)
    return m_step(X, resp, variance_floor, sample_weight)


def log_likelihood(X, weights, means, covariances, sample_weight=None):
    """``sum_n w_n log sum_k pi_k N(x_n | mu_k, Sigma_k)``."""
    _, log_norm = e_step(X, weights, means, covariances)
    if sample_weight is None:
        return float(log_norm.sum())
    return float(log_norm @ np.asarray(sample_weight, dtype=np.float64))


def run(X, weights, means, covariances, n_iter, variance_floor=None, sample_weight=None):
    """``n_iter`` iterations; the list of parameters and log-likelihoods after each one.

    Returns
    -------
    history : list of ``(weights, means, covariances, log_likelihood)``, length ``n_iter``
    """
    X = _as_2d(X)
    params = (
        np.asarray(weights, dtype=np.float64),
        np.asarray(means, dtype=np.float64).reshape(-1, X.shape[1]),
        _as_covariances(covariances, len(weights), X.shape[1]),
    )
    history = []
    for _ in range(n_iter):
        params = one_iteration(X, *params, variance_floor, sample_weight)
        history.append((*params, log_likelihood(X, *params, sample_weight)))
    return history
