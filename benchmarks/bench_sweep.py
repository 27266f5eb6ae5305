"""Time the MRF's mean-field sweeps on the sample head and on the head upsampled 2x.

    python benchmarks/bench_sweep.py [1x] [2x]

For each image: a 6-class mixture is fitted to the voxels above the 5th percentile, then a
:class:`segment._sweeps.PosteriorGrid` (2 threads, slabs of 8 planes) times a plain sweep
(beta = 0), an MRF sweep (beta = 0.2, mean of 10), the final sweep as labels and as
probabilities (best of 3 each), and the whole ``segment_array(K=3, mrf_beta=0.2)``. The
checksum line lets two builds be compared (same state, labels and probability sums).
``SEGMENT_NO_COMPILED=1`` times the numpy twins.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from segment import GaussianMixtureEM, _kernels, _spatial, _sweeps, segment_array

HEAD = Path(__file__).resolve().parents[1] / "sample_scans" / "head_t1.nii.gz"


def no_field(shape, offset, reverse=False):
    return np.zeros(tuple(shape) + (1,), np.float32)


def main(which: list[str]) -> None:
    print("kernels:", "compiled C" if _kernels.compiled else "numpy twins")
    head = np.asarray(nib.load(HEAD).dataobj, dtype=np.float32)
    for name in which:
        image = head if name == "1x" else ndimage.zoom(head, 2, order=1).astype(np.float32)
        image = np.asfortranarray(image)  # as NIfTI data lie in memory
        mask = image > np.percentile(image, 5)
        fit = GaussianMixtureEM(6, random_state=0).fit(image[mask][:, None])
        params = (fit.weights_, fit.means_, fit.precisions_cholesky_)
        kernel = _spatial.neighbour_kernel((1.0, 1.0, 1.0))
        best: dict[str, float] = {}
        for _ in range(3):
            grid = _sweeps.PosteriorGrid(image[..., None], mask, params, kernel, no_field, 8, 2)
            times = {}
            start = time.perf_counter()
            grid.sweep(0.0)
            times["plain sweep"] = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(10):
                grid.sweep(0.2)
            times["MRF sweep"] = (time.perf_counter() - start) / 10
            start = time.perf_counter()
            labels, _ = grid.labels(0.2)
            times["final labels"] = time.perf_counter() - start
            start = time.perf_counter()
            probabilities = grid.probabilities(0.2)
            times["final probabilities"] = time.perf_counter() - start
            for key, value in times.items():
                best[key] = min(best.get(key, np.inf), value)
        n = int(mask.sum())
        print(f"{name} {image.shape}, {n} voxels, K=6, 2 threads (best of 3):")
        for key, value in best.items():
            print(f"   {key:20s} {value:.4f} s  ({value / n * 1e9:.1f} ns/voxel)")
        print("   checksum", int(grid.state.sum(dtype=np.int64)),
              int(labels.sum(dtype=np.int64)), float(probabilities.sum()))  # fmt: skip
        start = time.perf_counter()
        segment_array(image, n_components=3, mrf_beta=0.2)
        print(f"   segment_array(K=3, mrf_beta=0.2): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:] or ["1x", "2x"])
