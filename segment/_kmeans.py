"""Deterministic weighted k-means (k-means++ seeding, Lloyd steps) for EM initialisation.

Runs in memory on a small weighted sample: the distinct intensities with their counts (exact
for integer-valued scans) or a seeded subsample of voxels. Pure numpy, no Dask.

References
----------
Arthur & Vassilvitskii (2007), k-means++: the advantages of careful seeding. SODA.
"""

from __future__ import annotations

import numpy as np


def kmeans_plusplus(
    X: np.ndarray, sample_weight: np.ndarray, n_clusters: int, rng: np.random.Generator
) -> np.ndarray:
    """Choose ``n_clusters`` seeds among the rows of ``X`` by greedy weighted k-means++.

    Parameters
    ----------
    X : (N, D) float64 array
    sample_weight : (N,) array of non-negative weights
    n_clusters : int
    rng : numpy Generator

    Returns
    -------
    centers : (n_clusters, D) array
    """
    n_trials = 2 + int(np.log(n_clusters))
    centers = [X[_weighted_choice(rng, sample_weight / sample_weight.sum())]]
    closest = _squared_distances(X, centers[0][None, :])[0]
    for _ in range(1, n_clusters):
        potential = sample_weight * closest
        total = potential.sum()
        if total <= 0:  # fewer distinct points than clusters: caller checks first
            break
        candidates = _weighted_choice(rng, potential / total, n_trials)
        distances = _squared_distances(X, X[candidates])
        candidate_closest = np.minimum(closest[None, :], distances, out=distances)
        best = int(np.argmin(candidate_closest @ sample_weight))
        centers.append(X[candidates[best]])
        closest = candidate_closest[best]
    return np.array(centers)


def _weighted_choice(rng: np.random.Generator, p: np.ndarray, size: int | None = None):
    """``rng.choice(len(p), size, p=p)``: the same random draws and indices, without its checks.

    numpy's ``Generator.choice`` inverts the cumulative sum of ``p`` at uniform draws, after
    checking ``p`` in three more passes (NaN, sign, a compensated sum); these passes over the
    200 000-voxel sample cost more than the draw itself. ``p`` is non-negative here by
    construction.
    """
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return cdf.searchsorted(rng.random(size), side="right")


def kmeans(
    X: np.ndarray,
    sample_weight: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    max_iter: int = 300,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Lloyd iterations from k-means++ seeds.

    Parameters
    ----------
    X : (N, D) array
    sample_weight : (N,) array
    n_clusters : int
    rng : numpy Generator
    max_iter : int
    tol : float
        Stop when no center moves more than ``tol`` times the data's standard deviation.

    Returns
    -------
    centers : (n_clusters, D) array
    labels : (N,) int array
    """
    X = np.asarray(X, dtype=np.float64)
    sample_weight = np.asarray(sample_weight, dtype=np.float64)
    centers = kmeans_plusplus(X, sample_weight, n_clusters, rng)
    scale = np.sqrt(((X - X.mean(axis=0)) ** 2).mean()) or 1.0
    if X.shape[1] == 1:
        centers = _lloyd_1d(X[:, 0], sample_weight, centers, max_iter, tol * scale)
        return centers, _nearest(X, centers)
    for _ in range(max_iter):
        labels = _nearest(X, centers)
        totals = np.bincount(labels, weights=sample_weight, minlength=n_clusters)
        sums = np.stack(
            [np.bincount(labels, weights=sample_weight * X[:, d], minlength=n_clusters)
             for d in range(X.shape[1])], axis=1,
        )  # fmt: skip
        occupied = totals > 0
        new_centers = centers.copy()
        new_centers[occupied] = sums[occupied] / totals[occupied, None]
        shift = np.abs(new_centers - centers).max()
        centers = new_centers
        if shift <= tol * scale:
            break
    return centers, _nearest(X, centers)


def _lloyd_1d(
    x: np.ndarray, sample_weight: np.ndarray, centers: np.ndarray, max_iter: int, tol: float
) -> np.ndarray:
    """Lloyd iterations in one dimension, where each cluster is an interval of sorted values.

    The same steps as the general loop (nearest centre, then weighted means), but each costs
    O(K log N) with cumulative sums instead of O(N K).
    """
    # Tied values may come in any order: it changes no cluster, only the order of a cumsum.
    order = np.argsort(x)  # several times faster than kind="stable" on 10^5 floats
    values, weights = x[order], sample_weight[order]
    cum_weight = np.concatenate([[0.0], np.cumsum(weights)])
    cum_moment = np.concatenate([[0.0], np.cumsum(weights * values)])
    centers = centers.copy()
    for _ in range(max_iter):
        rank = np.argsort(centers[:, 0], kind="stable")
        sorted_centers = centers[rank, 0]
        cuts = np.searchsorted(values, (sorted_centers[:-1] + sorted_centers[1:]) / 2, "right")
        cuts = np.concatenate([[0], cuts, [len(values)]])
        totals = cum_weight[cuts[1:]] - cum_weight[cuts[:-1]]
        moments = cum_moment[cuts[1:]] - cum_moment[cuts[:-1]]
        updated = np.where(totals > 0, moments / np.where(totals > 0, totals, 1.0), sorted_centers)
        new_centers = centers.copy()
        new_centers[rank, 0] = updated
        shift = np.abs(new_centers - centers).max()
        centers = new_centers
        if shift <= tol:
            break
    return centers


def _squared_distances(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``|x_n - c_j|^2`` as a (J, N) array (centre-major, so each row is contiguous)."""
    if X.shape[1] == 1:  # the same numbers as the general sum, without its length-1 axis
        distances = np.subtract(X[:, 0], centers[:, :1])
        return np.square(distances, out=distances)
    return ((X[None, :, :] - centers[:, None, :]) ** 2).sum(axis=2)


def _nearest(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row (the first on a tie), (N,).

    ``argmin(distances, axis=0)`` row by row: argmin across the short axis would copy the array.
    """
    distances = _squared_distances(X, centers)
    labels = np.zeros(distances.shape[1], dtype=np.intp)
    nearest = distances[0]
    for k in range(1, len(distances)):
        labels[distances[k] < nearest] = k
        nearest = np.minimum(nearest, distances[k], out=nearest)
    return labels


def parameters_from_clusters(
    X: np.ndarray, sample_weight: np.ndarray, labels: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial mixture parameters from a hard clustering.

    Returns
    -------
    weights : (K,) array, cluster sizes / N
    means : (K, D) array, cluster centroids
    covariances : (K, D, D) array, cluster covariances (before any variance floor)
    """
    X = np.asarray(X, dtype=np.float64)
    n_features = X.shape[1]
    weights = np.zeros(n_clusters)
    means = np.zeros((n_clusters, n_features))
    covariances = np.zeros((n_clusters, n_features, n_features))
    # Group the rows by cluster once (a stable sort keeps each cluster's rows in their order),
    # then each cluster is a contiguous slice instead of a mask and two copies per cluster.
    order = np.argsort(labels, kind="stable")
    X, sample_weight = X[order], np.asarray(sample_weight)[order]
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    for k in range(n_clusters):
        members = slice(bounds[k], bounds[k + 1])
        w = sample_weight[members]
        weights[k] = w.sum()
        if weights[k] > 0:
            # einsum, not @: OpenBLAS runs products this long on its own threads, which then
            # spin for about 0.1 s, taking a core from the first E-step of a multi-threaded fit.
            means[k] = np.einsum("n,nd->d", w, X[members]) / weights[k]
            diff = X[members] - means[k]
            covariances[k] = np.einsum("n,nd,ne->de", w, diff, diff) / weights[k]
    return weights / weights.sum(), means, covariances
