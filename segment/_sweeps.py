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

from . import _spatial


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
        self.image, self.mask, self.params = image, mask, params
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

        def keep(r0, r1, probabilities):
            out[r0:r1] = probabilities

        self._final_sweep(beta, keep)
        return out

    def labels(self, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """Labels 1..K of :meth:`probabilities` (0 outside the mask) and their column sums.

        The same sweep, keeping only the argmax of each voxel's float32 probabilities and the
        sums: no (*spatial, K) float array.
        """
        labels = np.zeros(self.mask.shape, np.uint8)

        def keep(r0, r1, probabilities):
            labels[r0:r1] = np.where(self.mask[r0:r1], probabilities.argmax(axis=-1) + 1, 0)
            return probabilities.reshape(-1, self.n_components).sum(axis=0, dtype=np.float64)

        return labels, np.sum(self._final_sweep(beta, keep), axis=0)

    def _final_sweep(self, beta: float, keep: Callable) -> list:
        """The float32 sweep slab by slab on the threads; ``keep(r0, r1, probabilities)`` each."""
        n_planes = self.mask.shape[0]

        def one(slab):
            r0, r1 = slab
            lo, hi = max(r0 - 1, 0), min(r1 + 1, n_planes)
            probabilities = self._block(
                self.state[lo:hi], lo, hi, beta, final=True, halo=(r0 - lo, hi - r1)
            )
            return keep(r0, r1, probabilities[r0 - lo : r1 - lo])

        with ThreadPoolExecutor(self.n_threads) as pool:
            return list(pool.map(one, self.slabs))

    def slab(self, start: int, stop: int, beta: float) -> np.ndarray:
        """:meth:`probabilities` of the planes ``start:stop`` of the *last* axis.

        Returns the K maps with their axes reversed, ``(K, stop - start, ..., n_0)``,
        C-contiguous: each map in the Fortran order NIfTI stores (``maps[k].T`` is the slab in
        the grid's axis order). The threads share the slab along its second-to-last axis, each
        part with a one-voxel halo there (computed and dropped).
        """
        ndim = self.mask.ndim
        lo, hi = max(start - 1, 0), min(stop + 1, self.mask.shape[-1])
        reverse = tuple(range(ndim))[::-1]
        kernel = np.ascontiguousarray(self.kernel.transpose(reverse))
        out = np.empty((self.n_components, stop - start) + self.mask.shape[:-1][::-1], np.float32)
        axis = ndim - 2  # the grid axis that is axis 1 of the reversed arrays
        size = self.mask.shape[axis]
        step = -(-size // self.n_threads)
        parts = [(a, min(a + step, size)) for a in range(0, size, step)]

        def one(part):
            a0, a1 = part
            b0, b1 = max(a0 - 1, 0), min(a1 + 1, size)
            index = [slice(None)] * ndim
            index[axis], index[-1] = slice(b0, b1), slice(lo, hi)
            offset = [0] * ndim
            offset[axis], offset[-1] = b0, lo
            index = tuple(index)
            log_bias = self.log_bias(self.mask[index].shape, tuple(offset))
            probabilities = _spatial.mean_field_sweep(
                np.ascontiguousarray(self.state[index].transpose(reverse + (ndim,))),
                np.ascontiguousarray(self.image[index].transpose(reverse + (ndim,))),
                np.ascontiguousarray(self.mask[index].transpose(reverse)),
                np.ascontiguousarray(log_bias.transpose(reverse + (ndim,))),
                *self.params,
                beta,
                kernel,
                final=True,
                halo=(start - lo, hi - stop),
            )[start - lo : stop - lo, a0 - b0 : a1 - b0]
            out[:, :, a0:a1] = np.moveaxis(probabilities, -1, 0)

        with ThreadPoolExecutor(self.n_threads) as pool:
            list(pool.map(one, parts))
        return out

    def _block(self, previous, lo, hi, beta, final, halo, skip_settled=False):
        offset = (lo,) + (0,) * (self.mask.ndim - 1)
        return _spatial.mean_field_sweep(
            previous,
            self.image[lo:hi],
            self.mask[lo:hi],
            self.log_bias(self.mask[lo:hi].shape, offset),
            *self.params,
            beta,
            self.kernel,
            final=final,
            halo=halo,
            skip_settled=skip_settled,
        )
