"""Deterministic weighted k-means (k-means++ seeding, Lloyd steps) for EM initialisation.

Runs in memory on a small weighted sample: the distinct intensities with their counts (exact
for integer-valued scans) or a seeded subsample of voxels (:func:`stratified_indices`). Pure
numpy, no Dask.

References
----------
Arthur & Vassilvitskii (2007), k-means++: the advantages of careful seeding. SODA.
"""

from __future__ import annotations

import numpy as np


def stratified_indices(n_total: int, n_sample: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded stratified sample of ``n_sample`` of the indices ``0 .. n_total - 1``.

    The indices are cut into ``n_sample`` strata of consecutive indices (lengths differ by at
    most one) and one index is drawn uniformly in each: the sample is sorted and distinct by
    construction, spread over the whole volume, and costs O(n_sample) (``rng.choice`` without
    replacement, then sorting, cost several times more on 10^7 voxels).

    Parameters
    ----------
    n_total : int
    n_sample : int
        At most ``n_total``.
    rng : numpy Generator

    Returns
    -------
    indices : (n_sample,) int64 array, strictly increasing
    """
    if not 0 < n_sample <= n_total:
        raise ValueError(f"need 0 < n_sample <= n_total, got {n_sample} and {n_total}")
    bounds = np.arange(n_sample + 1, dtype=np.int64) * n_total // n_sample
    lengths = np.diff(bounds)
    offsets = (rng.random(n_sample) * lengths).astype(np.int64)
    return bounds[:-1] + np.minimum(offsets, lengths - 1)  # u * length < length, even rounded


def count_distinct(X: np.ndarray, limit: int) -> int:
    """Number of distinct rows of ``X`` (N, D), counted up to ``limit``.

    ``min(n_distinct, limit)`` in O(limit N): each step drops the rows equal to the first
    remaining one. Faster than ``np.unique`` (a sort) when only "at least ``limit``?" matters.
    """
    if len(X) > 1024 and count_distinct(X[:1024], limit) == limit:  # the usual case, at once
        return limit
    rest, count = X, 0
    while count < limit and len(rest):
        rest = rest[(rest != rest[0]).any(axis=1)]
        count += 1
    return count


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
    # one (n_trials, N) buffer for all rounds: fresh ones cost page faults, round after round
    buffer = np.empty((n_trials, len(X)))
    for _ in range(1, n_clusters):
        potential = sample_weight * closest
        total = potential.sum()
        if total <= 0:  # fewer distinct points than clusters: caller checks first
            break
        candidates = _weighted_choice(rng, np.divide(potential, total, out=potential), n_trials)
        distances = _squared_distances(X, X[candidates], out=buffer[: len(candidates)])
        candidate_closest = np.minimum(closest[None, :], distances, out=distances)
        # einsum, not @: OpenBLAS runs products this long on its own threads (see
        # parameters_from_clusters)
        best = int(np.argmin(np.einsum("jn,n->j", candidate_closest, sample_weight)))
        centers.append(X[candidates[best]])
        closest = candidate_closest[best].copy()
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
    if np.all(x[1:] >= x[:-1]):  # sorted already, as the distinct values are
        values, weights = x, sample_weight
    elif np.all(sample_weight == sample_weight[0]):  # a voxel sample: equal weights
        values, weights = np.sort(x), sample_weight  # the same sums as below, sooner
    else:
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


def _squared_distances(
    X: np.ndarray, centers: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``|x_n - c_j|^2`` as a (J, N) array (centre-major, so each row is contiguous).

    ``out`` (J, N), if given, receives the result (one channel only).
    """
    if X.shape[1] == 1:  # the same numbers as the general sum, without its length-1 axis
        distances = np.subtract(X[:, 0], centers[:, :1], out=out)
        return np.square(distances, out=distances)
    return ((X[None, :, :] - centers[:, None, :]) ** 2).sum(axis=2)


def _nearest(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row (the first on a tie), (N,).

    One centre at a time, keeping the running minimum: no (K, N) array of distances.
    """
    nearest = _squared_distances(X, centers[:1])[0]
    distance = np.empty_like(nearest)
    labels = np.zeros(len(nearest), dtype=np.intp)
    for k in range(1, len(centers)):
        distance = _squared_distances(X, centers[k : k + 1], out=distance[None, :])[0]
        labels[distance < nearest] = k
        np.minimum(nearest, distance, out=nearest)
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
    sample_weight = np.asarray(sample_weight, dtype=np.float64)
    n_features = X.shape[1]
    # Sums per cluster by bincount: one pass over the rows per moment, no sort or copies.
    weights = np.bincount(labels, weights=sample_weight, minlength=n_clusters)
    occupied = weights > 0
    safe = np.where(occupied, weights, 1.0)
    means = np.stack(
        [np.bincount(labels, weights=sample_weight * X[:, d], minlength=n_clusters)
         for d in range(n_features)], axis=1,
    ) / safe[:, None]  # fmt: skip
    means[~occupied] = 0.0
    diff = X - means[labels]
    covariances = np.zeros((n_clusters, n_features, n_features))
    for d in range(n_features):
        weighted = sample_weight * diff[:, d]
        for e in range(d + 1):
            column = np.bincount(labels, weights=weighted * diff[:, e], minlength=n_clusters)
            covariances[:, d, e] = covariances[:, e, d] = column / safe
    return weights / weights.sum(), means, covariances
