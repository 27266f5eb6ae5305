"""Before the EM loop: the features as the loop sees them, and the initial parameters.

:func:`prepare` chunks and checks the features in one pass and picks the fit path (distinct
values or per voxel); :func:`initial_parameters` completes the user's initial parameters by
weighted k-means (:mod:`segment._kmeans`) on all distinct values, a fine histogram or a
stratified subsample. Used by :class:`segment.GaussianMixtureEM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from . import _chunked, _em, _kmeans, _validation
from ._scheduler import is_distributed
from .exceptions import SegmentError

#: The distinct-values fast path is used while the data have at most this many distinct rows.
MAX_DISTINCT = 1 << 17
#: Bins of the histogram that one-channel float fits are initialised from (see
#: :func:`histogram_sample`).
INIT_HISTOGRAM_BINS = 4096


@dataclass
class FitData:
    """The features as the EM loop sees them: in memory (distinct values) or chunked."""

    X: Any  # (M, D) numpy array of distinct rows, or (N, D) Dask array
    sample_weight: Any  # (M,) counts, (N,) Dask weights, or None
    path: str  # "distinct-values" or "per-voxel"
    moments: _em.Moments
    in_memory: np.ndarray | None = None  # the (N, D) features when given as numpy


def prepare(
    X: Any,
    sample_weight: Any,
    n_components: int,
    chunk_size: int | None,
    distinct_values: bool | str,
    ckw: dict,
) -> FitData:
    """Chunk the features, check them in one pass, and pick the fit path."""
    Xd = _chunked.as_feature_array(X, chunk_size)
    wd = None
    if sample_weight is not None:
        wd = (
            sample_weight.rechunk((Xd.chunks[0],))
            if isinstance(sample_weight, da.Array)
            else da.from_array(sample_weight, chunks=(Xd.chunks[0],))
        )
    if is_distributed(ckw):
        Xd, wd = (
            ckw["scheduler"].persist([Xd, wd])
            if wd is not None
            else (ckw["scheduler"].persist(Xd), None)
        )
    moments = _chunked.moments(Xd, wd, ckw)
    _validation.check_data_summary(moments, n_components)

    use_distinct = distinct_values is True or (distinct_values == "auto" and Xd.dtype.kind in "iub")
    if use_distinct and wd is None:
        distinct = _chunked.distinct_rows(Xd, MAX_DISTINCT, ckw)
        if distinct is not None:
            values, counts = distinct
            _validation.check_n_distinct(len(values), n_components)
            return FitData(values, counts, "distinct-values", moments)
    if use_distinct and distinct_values is True:
        raise SegmentError(
            "distinct_values=True needs no sample_weight and at most "
            f"{MAX_DISTINCT} distinct rows; use distinct_values='auto'"
        )
    in_memory = X if isinstance(X, np.ndarray) and sample_weight is None else None
    return FitData(Xd, wd, "per-voxel", moments, in_memory)


def initial_parameters(
    data: FitData,
    init: tuple,
    floor: np.ndarray,
    n_components: int,
    random_state: int | None,
    init_sample_size: int,
    ckw: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explicit initial parameters ``init`` = (means, covariances, weights), completed by
    weighted k-means where not given. Returns (weights, means, covariances)."""
    means, covariances, weights = init
    if means is not None and covariances is not None and weights is not None:
        return weights, means, covariances
    rng = np.random.default_rng(random_state)
    sample, sample_weight = init_sample(data, rng, n_components, init_sample_size, ckw)
    _, labels = _kmeans.kmeans(sample, sample_weight, n_components, rng)
    k_weights, k_means, k_covariances = _kmeans.parameters_from_clusters(
        sample, sample_weight, labels, n_components
    )
    k_weights = np.maximum(k_weights, _em.EPS)
    return (
        k_weights / k_weights.sum() if weights is None else weights,
        k_means if means is None else means,
        _em.floor_covariances(k_covariances, floor) if covariances is None else covariances,
    )


def init_sample(
    data: FitData, rng: np.random.Generator, n_components: int, init_sample_size: int, ckw: dict
) -> tuple[np.ndarray, np.ndarray]:
    """All distinct rows with their counts, a histogram, or a seeded subsample of voxels.

    One float channel with more voxels than ``init_sample_size`` is summarised by a fine
    histogram of all its voxels (:func:`histogram_sample`). Otherwise the subsample is
    stratified (:func:`segment._kmeans.stratified_indices`): one voxel drawn with ``rng`` in
    each run of ``N / init_sample_size`` consecutive voxels (``rng.choice`` without
    replacement, sorted, cost 0.2 s of serial time per 10^7 voxels before the first E-step).
    Returns the (M, D) float64 sample and its (M,) weights.
    """
    if data.path == "distinct-values":
        return data.X.astype(np.float64), data.sample_weight
    n_samples = data.X.shape[0]
    if (
        data.X.shape[1] == 1 and data.sample_weight is None
        and data.X.dtype.kind == "f" and n_samples > init_sample_size
    ):  # fmt: skip
        centres, counts = histogram_sample(data, ckw)
        if len(centres) >= n_components:  # else: a few values, counted below
            return centres, counts
    if n_samples > init_sample_size:
        indices = _kmeans.stratified_indices(n_samples, init_sample_size, rng)
    else:
        indices = np.arange(n_samples)
    if data.in_memory is not None:  # plain indexing: dask's fancy indexing is serial work
        sample = data.in_memory[indices].astype(np.float64)
    else:
        sample = _chunked.take_rows(data.X, indices, ckw).astype(np.float64)
    weight = (
        np.ones(len(sample))
        if data.sample_weight is None
        else _chunked.take_rows(data.sample_weight[:, None], indices, ckw)[:, 0]
    )
    n_distinct = _kmeans.count_distinct(sample, n_components)
    if n_distinct < n_components:  # the subsample may miss rare values: count them all
        distinct = _chunked.distinct_rows(data.X, MAX_DISTINCT, ckw)
        if distinct is None:
            raise SegmentError(
                f"the initialisation sample holds only {n_distinct} distinct values; "
                "raise init_sample_size or give means_init"
            )
        _validation.check_n_distinct(len(distinct[0]), n_components)
        return distinct[0].astype(np.float64), distinct[1]
    return sample, weight


def histogram_sample(data: FitData, ckw: dict) -> tuple[np.ndarray, np.ndarray]:
    """The occupied bins of a fine histogram of all voxels, weighted by their counts.

    For one float channel with more voxels than ``init_sample_size``: a parallel pass counts
    the voxels in :data:`INIT_HISTOGRAM_BINS` equal bins between the extremes the moments pass
    found, and k-means runs on the centres of the occupied bins. It sees every voxel, its
    k-means costs nothing next to one on 200 000 points, and the counts do not depend on the
    chunks. A bin is (max - min) / 4096 wide: k-means centres land within half of that, a
    negligible shift for a starting point. Returns (M, 1) centres and (M,) counts.
    """
    low = float(data.moments["minimum"][0])
    high = float(data.moments["maximum"][0])
    counts = _chunked.histogram(data.X, low, high, INIT_HISTOGRAM_BINS, ckw)
    width = (high - low) / INIT_HISTOGRAM_BINS
    centres = low + (np.arange(INIT_HISTOGRAM_BINS) + 0.5) * width
    occupied = counts > 0
    return centres[occupied][:, None], counts[occupied]
