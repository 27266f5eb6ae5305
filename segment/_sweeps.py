"""The MRF posterior on the image grid: mean-field sweeps over slabs, run on threads.

The per-block maths is :func:`segment._spatial.mean_field_sweep` (compiled); this module only
walks it over slabs of the first axis. The posterior is one uint8 grid (K + 1 bytes a voxel)
updated in place: before a sweep overwrites any slab, the planes that border another slab are
copied, and every slab reads its neighbours' planes from those copies, so each voxel is
updated from the previous sweep exactly as with two grids (the result does not depend on the
slabs) at half the memory. Because the grid is updated in place, the sweeps run on threads of
the calling process (the kernel releases the GIL), whatever scheduler the EM's passes use.

The final probabilities are one more sweep, kept in memory (:meth:`PosteriorGrid.probabilities`)
or recomputed slab by slab along the last axis when written (:meth:`PosteriorGrid.slab`), so a
scan too large for its K float32 maps never holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _kernels, _spatial


class PosteriorGrid:
    """The MRF posterior of one fitted grid and what a sweep needs to update it.

    Parameters
    ----------
    image : (*spatial, D) array, the raw intensities
    mask : (*spatial) bool array, the fitted voxels
    params : (weights, means, precisions_chol) of the mixture
    kernel : neighbour weights, see :func:`segment._spatial.neighbour_kernel`
    log_bias : callable ``(shape, offset) -> (*shape, D) float32``
        The log bias field on a block of the grid.
    rows : int
        Planes of the first axis per slab.
    n_threads : int
    """

    def __init__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        params: tuple[np.ndarray, np.ndarray, np.ndarray],
        kernel: np.ndarray,
        log_bias: Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray],
        rows: int,
        n_threads: int,
    ):
        self.image, self.mask, self.params = image, np.ascontiguousarray(mask), params
        self.kernel, self.log_bias, self.n_threads = kernel, log_bias, max(1, n_threads)
        n_components = params[1].shape[0]
        self.state = np.zeros(mask.shape + (n_components + 1,), np.uint8)
        n_planes = mask.shape[0]
        self.slabs = [(r, min(r + rows, n_planes)) for r in range(0, n_planes, max(1, rows))]

    @property
    def n_components(self) -> int:
        return self.params[1].shape[0]

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
        out = np.zeros(self.mask.shape + (self.n_components,), np.float32)
        self._final_sweep(beta, probabilities=out)
        return out

    def labels(self, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Labels 1..K of :meth:`probabilities` (0 outside the mask) and their column sums.

        The same sweep, keeping only the argmax of each voxel's float32 probabilities and the
        sums: no (*spatial, K) float array.
        """
        labels = np.zeros(self.mask.shape, np.uint8)
        return labels, self._final_sweep(beta, labels=labels)

    def _final_sweep(self, beta: float, probabilities=None, labels=None) -> np.ndarray:
        """The float32 sweep slab by slab on the threads, into the given arrays; column sums."""
        n_planes = self.mask.shape[0]

        def one(slab):
            r0, r1 = slab
            lo, hi = max(r0 - 1, 0), min(r1 + 1, n_planes)
            return _spatial.mean_field_final(
                self.state[lo:hi], self.image[r0:r1], self.mask[lo:hi],
                self.log_bias(self.mask[r0:r1].shape, (r0,) + (0,) * (self.mask.ndim - 1)),
                self.params, beta, self.kernel, halo=(r0 - lo, hi - r1),
                probabilities=None if probabilities is None else probabilities[lo:hi],
                labels=None if labels is None else labels[lo:hi],
            )  # fmt: skip

        with ThreadPoolExecutor(self.n_threads) as pool:
            return np.sum(list(pool.map(one, self.slabs)), axis=0)

    def slab(self, start: int, stop: int, beta: float, maps=None, labels=None):
        """:meth:`probabilities` and :meth:`labels` of the planes ``start:stop`` of the *last* axis.

        Returns ``(maps, labels, sums)``: the K maps with their axes reversed,
        ``(K, stop - start, ..., n_0)`` (each map in the Fortran order NIfTI stores:
        ``maps[k].T`` is the slab in the grid's axis order), the labels likewise
        ``(stop - start, ..., n_0)``, and the maps' column sums (K,). ``maps`` and ``labels``
        may be given (zeros, or views of larger arrays), to be written into. The planes and
        their neighbours are copied with their axes reversed; the threads share the rows.
        """
        K, ndim = self.n_components, self.mask.ndim
        width = stop - start
        reversed_shape = (width,) + self.mask.shape[:-1][::-1]
        maps = np.zeros((K,) + reversed_shape, np.float32) if maps is None else maps
        labels = np.zeros(reversed_shape, np.uint8) if labels is None else labels
        if ndim == 2:  # a picture: small, computed whole
            whole = np.zeros(self.mask.shape + (K,), np.float32)
            whole_labels = np.zeros(self.mask.shape, np.uint8)
            self._final_sweep(beta, probabilities=whole, labels=whole_labels)
            maps[...] = whole[:, start:stop].transpose(2, 1, 0)
            labels[...] = whole_labels[:, start:stop].T
            return maps, labels, whole[:, start:stop].reshape(-1, K).sum(axis=0, dtype=float)
        # the planes with their neighbours, axes reversed (the sweep's rows run along the
        # grid's first axis, and its output is already in NIfTI order)
        n0, n_rows, n_last = self.mask.shape
        lo, hi = max(start - 1, 0), min(stop + 1, n_last)
        state = np.empty((hi - lo, n_rows, n0, K + 1), np.uint8)
        mask = np.empty((hi - lo, n_rows, n0, 1), np.bool_)
        kernel = np.ascontiguousarray(self.kernel.transpose(2, 1, 0))
        image = self.image[:, :, start:stop].transpose(2, 1, 0, 3)  # views
        log_bias = self.log_bias(self.mask[:, :, start:stop].shape, (0, 0, start))
        log_bias = log_bias.transpose(2, 1, 0, 3)
        step = -(-n_rows // (2 * self.n_threads))
        parts = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]

        def reverse(part):
            _kernels.reverse_axes(self.state, lo, hi, *part, state)
            _kernels.reverse_axes(self.mask[..., None], lo, hi, *part, mask)

        def one(part):
            rows = slice(*part)
            return _spatial.mean_field_final_by_component(
                state, image[:, rows], mask, log_bias[:, rows], self.params, beta, kernel,
                halo=(start - lo, hi - stop), rows=part, probabilities=maps, labels=labels,
            )  # fmt: skip

        with ThreadPoolExecutor(self.n_threads) as pool:
            list(pool.map(reverse, parts))
            mask = mask[..., 0]
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
