"""The Dask layer: map the pure EM functions of :mod:`segment._em` over chunks and reduce them.

Nothing here knows any formula. Each pass over the data builds one small graph: one task per
chunk that returns a small dict of float64 statistics, and one task that sums them in chunk
order, so the result does not depend on the scheduler.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import _em, _kernels

#: Default number of voxels per chunk: big enough that numpy dominates the per-task overhead,
#: small enough that the (chunk, K) float64 temporaries stay in tens of MB.
DEFAULT_CHUNK_SIZE = 262_144


def as_feature_array(X: Any, chunk_size: int | None = None) -> da.Array:
    """Wrap ``(N, D)`` features as a Dask array chunked along voxels only.

    A numpy array (or memmap) is cut into views, one per chunk, under a fresh random key:
    ``da.from_array`` copies the whole array first (this dask does, to guard against later
    writes; about 6 ms and a second copy in memory per 10 M float32 voxels) and, by default,
    hashes every byte for its key, serial passes over the data that buy nothing here, since
    X is wrapped once per call and only read.
    """
    chunk_size = int(chunk_size or DEFAULT_CHUNK_SIZE)
    if isinstance(X, da.Array):
        return X.rechunk((chunk_size, X.shape[1]))
    if not isinstance(X, np.ndarray):
        return da.from_array(X, chunks=(chunk_size, X.shape[1]), asarray=True, name=False)
    chunks = normalize_chunks((chunk_size, X.shape[1]), X.shape, dtype=X.dtype)
    name = f"features-{uuid.uuid4().hex}"
    starts = np.cumsum((0,) + chunks[0][:-1])
    graph = {
        (name, i, 0): X[start : start + size]
        for i, (start, size) in enumerate(zip(starts.tolist(), chunks[0]))
    }
    meta = np.empty((0, X.shape[1]), dtype=X.dtype)
    return da.Array(graph, name, chunks, meta=meta, dtype=X.dtype)


def map_reduce(
    func: Callable,
    combine: Callable,
    arrays: Sequence[da.Array | None],
    args: tuple = (),
    compute_kwargs: dict | None = None,
) -> Any:
    """Apply ``func(*blocks, *args)`` to aligned row-blocks of ``arrays`` and ``combine`` the list.

    ``None`` entries of ``arrays`` are passed to ``func`` as ``None`` for every block. The graph
    is written out directly (one task per block, one combining task, keyed by a fresh name):
    going through ``dask.delayed`` tokenised the arguments of every block task, a few
    milliseconds of serial work per pass, and these passes run once per EM iteration. Arrays
    whose blocks are already in memory (:func:`as_feature_array` of a numpy array) go to a
    local scheduler's ``get`` as they are, without ``dask.compute``'s graph optimisation,
    which has nothing to fuse there (about 1 ms a pass).
    """
    compute_kwargs = dict(compute_kwargs or {})
    present = [a for a in arrays if a is not None]
    n_blocks = present[0].numblocks[0]
    name = f"{getattr(func, '__name__', 'map')}-{uuid.uuid4().hex}"

    def block(array, i):
        return None if array is None else (array.name, i) + (0,) * (array.ndim - 1)

    graph = {(name, i): (func, *[block(a, i) for a in arrays], *args) for i in range(n_blocks)}
    graph[name] = (combine, [(name, i) for i in range(n_blocks)])
    scheduler = compute_kwargs.pop("scheduler", None)
    if callable(scheduler) and not hasattr(scheduler, "submit"):  # threads, processes, sync
        inputs = [_in_memory_blocks(a) for a in present]
        if all(blocks is not None for blocks in inputs):
            for blocks in inputs:
                graph.update(blocks)
            return scheduler(graph, name, **compute_kwargs)
    total = Delayed(name, HighLevelGraph.from_collections(name, graph, dependencies=present))
    if scheduler is not None:
        compute_kwargs["scheduler"] = scheduler
    return dask.compute(total, **compute_kwargs)[0]


def _in_memory_blocks(array: da.Array) -> dict | None:
    """The ``{key: numpy block}`` graph of an array whose blocks are all in memory, or None."""
    graph = array.__dask_graph__()
    if len(graph.layers) != 1:
        return None
    blocks = dict(graph)
    return blocks if all(isinstance(b, np.ndarray) for b in blocks.values()) else None


def statistics(
    X: da.Array,
    params: tuple[np.ndarray, np.ndarray, np.ndarray],
    sample_weight: da.Array | None = None,
    compute_kwargs: dict | None = None,
) -> _em.Statistics:
    """One E-step over all chunks, reduced to the summed sufficient statistics."""
    weights, means, precisions_chol = params
    return map_reduce(
        _statistics_block,
        _em.combine_statistics,
        [X, sample_weight],
        (weights, means, precisions_chol),
        compute_kwargs,
    )


def _statistics_block(X, sample_weight, weights, means, precisions_chol):
    return _em.chunk_statistics(X, weights, means, precisions_chol, sample_weight)


def moments(
    X: da.Array, sample_weight: da.Array | None = None, compute_kwargs: dict | None = None
) -> _em.Moments:
    """Count, mean, variance, extremes and non-finite count of the features, in one pass."""
    return map_reduce(
        _em.chunk_moments, _em.combine_moments, [X, sample_weight], (), compute_kwargs
    )


def histogram(
    X: da.Array, low: float, high: float, n_bins: int, compute_kwargs: dict | None = None
) -> np.ndarray:
    """Counts of the one-channel features in ``n_bins`` equal bins over ``[low, high]``."""
    return map_reduce(_histogram_block, _sum_arrays, [X], (low, high, n_bins), compute_kwargs)


def _histogram_block(X, low, high, n_bins):
    counts = np.zeros(n_bins)
    values = np.asarray(X)[:, 0]
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    _kernels.histogram_1d(np.ascontiguousarray(values), low, high, counts)
    return counts


def _sum_arrays(parts):
    return np.sum(parts, axis=0)


def distinct_rows(
    X: da.Array, max_distinct: int, compute_kwargs: dict | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Distinct rows of integer-valued features and their counts, or None if there are too many.

    Parameters
    ----------
    X : (N, D) Dask array of integer-valued features
    max_distinct : int
        Give up (return None) when any chunk or the whole has more distinct rows than this.

    Returns
    -------
    values : (M, D) array, sorted rows
    counts : (M,) float64 array
    """
    return map_reduce(_distinct_block, _merge_distinct, [X], (max_distinct,), compute_kwargs)


def _distinct_block(X, max_distinct):
    X = np.asarray(X)
    if X.dtype.kind in "iub":  # integer rows -> one integer key each, counted by bincount
        low = X.min(axis=0).astype(np.int64)
        span = X.max(axis=0).astype(np.int64) - low + 1
        if np.prod(span.astype(float)) <= 1 << 24:
            keys = np.ravel_multi_index(tuple((X - low).T.astype(np.intp)), tuple(span))
            counts = np.bincount(keys)
            present = np.flatnonzero(counts)
            if len(present) > max_distinct:
                return None
            values = np.stack(np.unravel_index(present, tuple(span)), axis=1) + low
            return values.astype(X.dtype), counts[present].astype(np.float64)
    if X.shape[1] == 1:
        values, counts = np.unique(X[:, 0], return_counts=True)
        values = values[:, None]
    else:
        values, counts = np.unique(X, axis=0, return_counts=True)
    if len(values) > max_distinct:
        return None
    return values, counts.astype(np.float64)


def _merge_distinct(parts):
    if any(part is None for part in parts):
        return None
    values = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    merged, inverse = np.unique(values, axis=0, return_inverse=True)
    total = np.zeros(len(merged))
    np.add.at(total, inverse.ravel(), counts)
    return merged, total


def take_rows(X: da.Array, indices: np.ndarray, compute_kwargs: dict | None = None) -> np.ndarray:
    """The rows ``X[indices]`` (sorted indices) as a numpy array."""
    return dask.compute(X[np.sort(indices)], **(compute_kwargs or {}))[0]


def map_rows(X: da.Array, func: Callable, n_out: int, dtype, args: tuple = ()) -> da.Array:
    """Lazy ``func(block, *args)`` over row-blocks, giving an ``(N, n_out)`` Dask array."""
    return X.map_blocks(
        _apply,
        block_func=func,
        block_args=args,
        chunks=(X.chunks[0], (n_out,)),
        dtype=dtype,
        meta=np.empty((0, 0), dtype=dtype),
    )


def _apply(block, block_func, block_args):
    return block_func(block, *block_args)


# --------------------------------------------------------------------------------------------
# Image-grid passes for the spatial extensions (MRF prior, bias field)
# --------------------------------------------------------------------------------------------
def grid_chunks(spatial_shape: tuple[int, ...], chunk_size: int | None) -> tuple[int, ...]:
    """Slabs along the first axis holding about ``chunk_size`` voxels each."""
    per_slab = int(np.prod(spatial_shape[1:]))
    rows = max(1, int(chunk_size or DEFAULT_CHUNK_SIZE) // max(per_slab, 1))
    return (min(rows, spatial_shape[0]),) + tuple(spatial_shape[1:])


def as_grid_array(array: Any, spatial_chunks: tuple[int, ...]) -> da.Array:
    """A Dask array chunked spatially, any trailing (channel) axes in one chunk."""
    chunks = spatial_chunks + tuple(array.shape[len(spatial_chunks) :])
    if isinstance(array, da.Array):
        return array.rechunk(chunks)
    return da.from_array(array, chunks=chunks, asarray=True)


def _block_offsets(array: da.Array, n_spatial: int) -> dict[tuple[int, ...], tuple[int, ...]]:
    starts = [np.cumsum((0,) + c[:-1]) for c in array.chunks[:n_spatial]]
    return {
        index: tuple(int(starts[axis][i]) for axis, i in enumerate(index))
        for index in np.ndindex(*array.numblocks[:n_spatial])
    }


def grid_blocks(
    arrays: Sequence[np.ndarray], spatial_chunks: tuple[int, ...]
) -> list[tuple[tuple[int, ...], list[np.ndarray]]]:
    """The blocks :func:`as_grid_array` cuts, as numpy views: ``(offset, [block of each array])``.

    In the order :func:`map_reduce_grid` visits them (C order of the block indices), so that
    :func:`reduce_grid_blocks` gives the same parts to the same ``combine``.
    """
    shape = arrays[0].shape[: len(spatial_chunks)]
    starts = [range(0, size, step) for size, step in zip(shape, spatial_chunks)]
    blocks = []
    for offset in itertools.product(*starts):
        picks = tuple(slice(o, o + c) for o, c in zip(offset, spatial_chunks))
        blocks.append((offset, [a[picks] for a in arrays]))
    return blocks


def reduce_grid_blocks(
    func: Callable,
    combine: Callable,
    blocks: Sequence[tuple[tuple[int, ...], list[np.ndarray]]],
    args: tuple = (),
    with_offset: bool = False,
) -> Any:
    """:func:`map_reduce_grid` on in-memory :func:`grid_blocks`, in a plain loop.

    The same parts in the same order reach the same ``combine``, so the result is the one the
    scheduler gives, without a graph per pass: the bias field's EM runs one pass an iteration
    over a sub-grid of about 100,000 voxels, where a Dask pass costs more than the numpy work.
    """
    return combine(
        [func(*arrays, *((offset,) if with_offset else ()), *args) for offset, arrays in blocks]
    )


def map_reduce_grid(
    func: Callable,
    combine: Callable,
    arrays: Sequence[da.Array],
    n_spatial: int,
    args: tuple = (),
    compute_kwargs: dict | None = None,
    with_offset: bool = False,
) -> Any:
    """Like :func:`map_reduce` over spatial blocks; ``func(*blocks, [offset,] *args)``."""
    delayed_blocks = [a.to_delayed() for a in arrays]
    func_ = dask.delayed(func, pure=True)
    parts = []
    for index, offset in _block_offsets(arrays[0], n_spatial).items():
        blocks = [d[index + (0,) * (d.ndim - n_spatial)] for d in delayed_blocks]
        parts.append(func_(*blocks, *((offset,) if with_offset else ()), *args))
    return dask.compute(dask.delayed(combine, pure=True)(parts), **(compute_kwargs or {}))[0]
