"""The MRF posterior on the image grid: mean-field sweeps over slabs, run on threads.

The per-block maths is :func:`segment._spatial.mean_field_sweep` (compiled); this module only
walks it over slabs. The grid is held with its axes reversed (last axis first): for NIfTI data,
which are stored in Fortran order, the intensities are then read in the order they lie in
memory, and a slab of the first axis is a slab of the file's last axis, the one the maps are
written in (so they are computed in the order they are written, without transposed copies).
The posterior is one uint8 grid (K + 1 bytes a voxel)
updated in place: before a sweep overwrites any slab, the planes that border another slab are
copied, and every slab reads its neighbours' planes from those copies, so each voxel is
updated from the previous sweep exactly as with two grids (the result does not depend on the
slabs) at half the memory. Because the grid is updated in place, the sweeps run on threads of
the calling process (the kernel releases the GIL), whatever scheduler the EM's passes use.

The final probabilities are one more sweep, kept in memory (:meth:`PosteriorGrid.probabilities`,
in the grid's own axis order) or recomputed slab by slab along the grid's last axis when
written, with their labels (:meth:`PosteriorGrid.slab`), so a scan too large for its K float32
maps never holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _spatial


class PosteriorGrid:
    """The MRF posterior of one fitted grid and what a sweep needs to update it.

    Parameters
    ----------
    image : (*spatial, D) array, the raw intensities
    mask : (*spatial) bool array, the fitted voxels
    params : (weights, means, precisions_chol) of the mixture
    kernel : neighbour weights, see :func:`segment._spatial.neighbour_kernel`
    log_bias : callable ``(shape, offset, reverse) -> (*shape, D) float32``
        The log bias field on a block of the grid (with ``reverse``, the block's shape and
        offset are given last axis first, and so is the result).
    rows : int
        Planes of the grid's *last* axis per slab (the first axis of :attr:`state`).
    n_threads : int

    Attributes
    ----------
    state : (*spatial[::-1], K + 1) uint8
        The posterior in units of 1/255 and the last sweep's change, axes reversed.
    """

    def __init__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        params: tuple[np.ndarray, np.ndarray, np.ndarray],
        kernel: np.ndarray,
        log_bias: Callable[..., np.ndarray],
        rows: int,
        n_threads: int,
    ):
        ndim = mask.ndim
        self.reverse = tuple(range(ndim))[::-1]
        # C-contiguous as it is for NIfTI (Fortran-order) data; a C-ordered array is copied once
        # here rather than read with strides in every sweep
        self.image = np.ascontiguousarray(image.transpose(self.reverse + (ndim,)))
        self.mask = np.ascontiguousarray(mask.transpose(self.reverse))
        self.kernel = np.ascontiguousarray(kernel.transpose(self.reverse))
        self.params, self.grid_log_bias, self.n_threads = params, log_bias, max(1, n_threads)
        n_components = params[1].shape[0]
        self.state = np.zeros(self.mask.shape + (n_components + 1,), np.uint8)
        n_planes = self.mask.shape[0]
        self.slabs = [(r, min(r + rows, n_planes)) for r in range(0, n_planes, max(1, rows))]

    @property
    def n_components(self) -> int:
        return self.params[1].shape[0]

    def log_bias(self, shape: tuple[int, ...], offset: tuple[int, ...]) -> np.ndarray:
        """The log bias field on a block of :attr:`state`'s (reversed) axes."""
        return self.grid_log_bias(shape, offset, reverse=True)

    def sweep(self, beta: float, skip_settled: bool = False) -> float:
        """One sweep in place; returns the mean change of the posterior per fitted voxel.

        ``skip_settled``: see :func:`segment._spatial.mean_field_sweep` (valid from the second
        MRF sweep on).
        """
        n_planes = self.mask.shape[0]
        borders = {r0 - 1 for r0, _ in self.slabs if r0 > 0}
        borders |= {r1 for _, r1 in self.slabs if r1 < n_planes}
        old = {plane: self.state[plane : plane + 1].copy() for plane in sorted(borders)}

        def one(slab):
            r0, r1 = slab
            lo, hi = max(r0 - 1, 0), min(r1 + 1, n_planes)
            before = [old[lo]] if lo < r0 else []
            after = [old[r1]] if hi > r1 else []
            previous = np.concatenate(before + [self.state[r0:r1]] + after)
            new = self._block(
                previous, lo, hi, beta, final=False, halo=(r0 - lo, hi - r1),
                skip_settled=skip_settled,
            )  # fmt: skip
            new = new[r0 - lo : r1 - lo]
            self.state[r0:r1] = new
            inside = self.mask[r0:r1]
            return int(new[..., -1][inside].sum(dtype=np.int64)), int(inside.sum())

        with ThreadPoolExecutor(self.n_threads) as pool:
            parts = list(pool.map(one, self.slabs))
        change, count = (sum(values) for values in zip(*parts))
        return change / _spatial.POSTERIOR_LEVELS / max(count, 1)

    def probabilities(self, beta: float) -> np.ndarray:
        """One more sweep, as float32 probabilities (*spatial, K) (zeros outside the mask)."""
        out = np.zeros(self.mask.shape[::-1] + (self.n_components,), np.float32)
        self._final_sweep(beta, probabilities=out)
        return out

    def labels(self, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Labels 1..K of :meth:`probabilities` (0 outside the mask) and their column sums.

        The same sweep, keeping only the argmax of each voxel's float32 probabilities and the
        sums: no (*spatial, K) float array.
        """
        labels = np.zeros(self.mask.shape[::-1], np.uint8)
        return labels, self._final_sweep(beta, labels=labels)

    def _final_sweep(self, beta: float, probabilities=None, labels=None) -> np.ndarray:
        """The float32 sweep slab by slab on the threads, into the given arrays (grid order).

        Returns the column sums.
        """
        n_planes = self.mask.shape[0]

        def one(slab):
            r0, r1 = slab
            lo, hi = max(r0 - 1, 0), min(r1 + 1, n_planes)
            block = (Ellipsis, slice(lo, hi))  # the same planes, in the grid's axis order
            if probabilities is not None:
                block += (slice(None),)
            return _spatial.mean_field_final(
                self.state[lo:hi], self.image[r0:r1], self.mask[lo:hi],
                self.log_bias(self.mask[r0:r1].shape, (r0,) + (0,) * (self.mask.ndim - 1)),
                self.params, beta, self.kernel, halo=(r0 - lo, hi - r1),
                probabilities=None if probabilities is None else probabilities[block],
                labels=None if labels is None else labels[..., lo:hi],
            )  # fmt: skip

        with ThreadPoolExecutor(self.n_threads) as pool:
            return np.sum(list(pool.map(one, self.slabs)), axis=0)

    def slab(self, start: int, stop: int, beta: float, maps=None, labels=None):
        """:meth:`probabilities` and :meth:`labels` of the planes ``start:stop`` of the *last* axis.

        Returns ``(maps, labels, sums)``: the K maps with their axes reversed,
        ``(K, stop - start, ..., n_0)`` (each map in the Fortran order NIfTI stores:
        ``maps[k].T`` is the slab in the grid's axis order), the labels likewise
        ``(stop - start, ..., n_0)``, and the maps' column sums (K,). ``maps`` and ``labels``
        may be given (zeros, or views of larger arrays), to be written into. These planes are
        a slab of :attr:`state`, whose threads share its rows.
        """
        K = self.n_components
        n_planes, n_rows = self.mask.shape[:2]
        reversed_shape = (stop - start,) + self.mask.shape[1:]
        maps = np.zeros((K,) + reversed_shape, np.float32) if maps is None else maps
        labels = np.zeros(reversed_shape, np.uint8) if labels is None else labels
        lo, hi = max(start - 1, 0), min(stop + 1, n_planes)
        offset = (start,) + (0,) * (self.mask.ndim - 1)
        log_bias = self.log_bias(reversed_shape, offset)
        step = -(-n_rows // (2 * self.n_threads))
        parts = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]

        def one(part):
            rows = slice(*part)
            return _spatial.mean_field_final(
                self.state[lo:hi], self.image[start:stop, rows], self.mask[lo:hi],
                log_bias[:, rows], self.params, beta, self.kernel,
                halo=(start - lo, hi - stop), rows=part, probabilities=maps, labels=labels,
            )  # fmt: skip

        with ThreadPoolExecutor(self.n_threads) as pool:
            sums = np.sum(list(pool.map(one, parts)), axis=0)
        return maps, labels, sums

    def _block(self, previous, lo, hi, beta, final, halo, skip_settled=False):
        r0, r1 = lo + halo[0], hi - halo[1]  # the computed planes
        offset = (r0,) + (0,) * (self.mask.ndim - 1)
        return _spatial.mean_field_sweep(
            previous,
            self.image[r0:r1],
            self.mask[lo:hi],
            self.log_bias(self.mask[r0:r1].shape, offset),
            *self.params,
            beta,
            self.kernel,
            final=final,
            halo=halo,
            skip_settled=skip_settled,
        )
