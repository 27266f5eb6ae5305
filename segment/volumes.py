"""The K probability maps of a result as lazy sequences: kept flat, or recomputed slab by slab.

:class:`Volumes` unflattens kept (N, K) probabilities one map at a time;
:class:`StreamedVolumes` recomputes them from the fitted mixture and the image channels, and
:class:`StreamedPosterior` from a spatial fit's posterior grid, a slab of all K maps at a time
(what :func:`segment.io.write_probabilities` streams into a file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from . import masking

__all__ = ["Volumes", "StreamedVolumes", "StreamedPosterior"]


class Volumes:
    """Sequence of the K probability maps stored as (N, K) flat values, unflattened per index."""

    def __init__(self, flat: np.ndarray, mask: np.ndarray):
        self.flat, self.mask = flat, mask

    def __len__(self) -> int:
        return self.flat.shape[1]

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return masking.unflatten(self.flat[:, k], self.mask)


class StreamedVolumes:
    """The K probability maps recomputed from the fitted model, a slab of all K at a time.

    For results whose (N, K) probabilities were too big to keep. :meth:`slabs` walks the last
    spatial axis once: per slab it gathers the mask's voxels from the image channels in
    Fortran order (the order NIfTI stores them), runs the E-step on them ``chunk_size`` voxels
    at a time, and scatters each component into its own slab. Memory: the channels (memory
    maps for ``.nii`` inputs) and a few slabs of K maps; no whole map, no (N, D) features.
    Values are those of :meth:`GaussianMixtureEM.predict_with_proba`: the same
    E-step per voxel, rounded to float32.
    """

    def __init__(self, channels: list[np.ndarray], mask: np.ndarray, estimator):
        self.channels, self.mask, self.estimator = channels, mask, estimator

    def __len__(self) -> int:
        return self.estimator.n_components

    def slabs(self, step: int) -> Iterator[list[np.ndarray]]:
        """Yield, for ``start = 0, step, ...`` along the last axis, the K maps' slabs.

        Each slab is a list of K float32 arrays of shape ``(*S[:-1], n)``, n <= step, each
        Fortran-contiguous (zeros outside the mask).
        """
        from . import _em
        from ._chunked import DEFAULT_CHUNK_SIZE

        chunk = int(self.estimator.chunk_size or DEFAULT_CHUNK_SIZE)
        params = (
            self.estimator.weights_,
            self.estimator.means_,
            self.estimator.precisions_cholesky_,
        )
        for start in range(0, self.mask.shape[-1], step):
            where = (Ellipsis, slice(start, start + step))
            # Transposed Fortran-order copies: C-contiguous arrays in the slab's NIfTI order.
            inside = np.asfortranarray(self.mask[where]).T
            slab = [np.asfortranarray(c[where]).T for c in self.channels]
            X = masking.flatten(slab[0] if len(slab) == 1 else np.stack(slab, -1), inside)
            del slab
            probabilities = np.empty((len(self), len(X)), np.float32)
            for first in range(0, len(X), chunk):
                stop = first + chunk
                probabilities[:, first:stop] = _em.responsibilities(X[first:stop], *params).T
            del X
            maps = np.zeros((len(self),) + inside.shape, np.float32)
            for k in range(len(self)):
                maps[k][inside] = probabilities[k]
            del probabilities
            yield [maps[k].T for k in range(len(self))]
            del maps

    def _by_slab(self) -> Iterator[tuple[tuple[slice, ...], list[np.ndarray]]]:
        """``(index into the grid, the K maps' slabs)`` for each slab of the default size."""
        from .io import slab_step

        step = slab_step(self.mask.shape, np.float32)
        leading = (slice(None),) * (self.mask.ndim - 1)
        for start, maps in zip(range(0, self.mask.shape[-1], step), self.slabs(step)):
            yield leading + (slice(start, start + step),), maps

    def stacked(self) -> np.ndarray:
        """All K maps as one (*S, K) float32 array, in one pass."""
        out = np.zeros(self.mask.shape + (len(self),), np.float32)
        for where, maps in self._by_slab():
            out[where] = np.stack(maps, axis=-1)
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        """Map ``k`` alone (a whole pass over the data; :meth:`slabs` gives all K in one)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        out = np.zeros(self.mask.shape, np.float32)
        for where, maps in self._by_slab():
            out[where] = maps[k]
        return out


class StreamedPosterior(StreamedVolumes):
    """The MRF posterior's K maps, recomputed a slab of the last axis at a time.

    For spatial fits whose float32 maps were too big to keep: each slab is one more
    mean-field sweep of the fitted uint8 posterior grid over those planes (and their
    neighbours), :meth:`segment._sweeps.PosteriorGrid.slab`. Memory: the grid the fit holds
    and a few slabs of K maps.
    """

    def __init__(self, mask: np.ndarray, estimator, keep_labels: Callable | None = None):
        super().__init__([], mask, estimator)
        self.keep_labels = keep_labels

    #: Writer slabs computed together. The grid is held in NIfTI order, so a block of writer
    #: slabs is a slab of the grid; its neighbours are read in place. 1 and 2 took the same
    #: time at 8x (28.8 s); 2 held 74 MB more.
    GROUP = 1

    def slabs(self, step: int) -> Iterator[list[np.ndarray]]:
        grid, beta = self.estimator.posterior_grid_, self.estimator.mrf_beta
        box = self.estimator.bounding_box_  # the grid covers the mask's bounding box
        first, last = box[-1].start, box[-1].stop
        reverse = tuple(range(self.mask.ndim))[::-1]
        n_last = self.mask.shape[-1]
        if self.keep_labels is not None:  # the argmax and column sums of every slab
            labels, soft_counts = np.zeros(self.mask.shape, np.uint8), np.zeros(len(self))
        for begin in range(0, n_last, step * self.GROUP):
            end = min(begin + step * self.GROUP, n_last)
            maps = np.zeros((len(self), end - begin) + self.mask.shape[:-1][::-1], np.float32)
            lo, hi = max(begin, first), min(end, last)
            if lo < hi:  # the box's planes, axes reversed: (K, planes, ..., first axis)
                inner = (slice(lo - begin, hi - begin),) + tuple(box[a] for a in reverse[1:])
                box_labels = np.zeros(maps[(0,) + inner].shape, np.uint8)
                _, _, sums = grid.slab(lo - first, hi - first, beta, maps[(slice(None),) + inner],
                                       box_labels)  # fmt: skip
                if self.keep_labels is not None:
                    labels[box[:-1] + (slice(lo, hi),)] = box_labels.T
                    soft_counts += sums
            for start in range(begin, end, step):
                part = maps[:, start - begin : min(start + step, end) - begin]
                yield [part[k].T for k in range(len(self))]
            del maps, part
        if self.keep_labels is not None:  # only once every slab is done
            self.estimator.soft_counts_ = soft_counts
            self.keep_labels(labels)
