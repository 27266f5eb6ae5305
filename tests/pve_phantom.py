"""A partial-volume phantom: a smooth crisp anatomy on a finer grid, averaged to the output grid.

The true fractions of each output voxel are the shares of its ``factor**3`` fine voxels in each
tissue (CSF, GM, WM, in ascending T1 intensity), as BrainWeb simulates its images from a fuzzy
model; the image is the fraction-weighted mean plus Gaussian noise.
"""

from __future__ import annotations

import numpy as np

T1_MEANS = (0.3, 0.65, 1.0)


def pve_phantom(
    shape: tuple[int, int, int] = (40, 44, 36),
    *,
    factor: int = 3,
    noise: float = 0.03,
    means: tuple[float, ...] = T1_MEANS,
    field: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, true fractions and mask of a folded-shell brain.

    Parameters
    ----------
    shape : output grid
    factor : fine voxels per output voxel along each axis
    noise : standard deviation of the noise, in units of the WM mean (``means[-1]``)
    field : peak-to-peak amplitude of a smooth multiplicative field (0: none)

    Returns
    -------
    image : float32 array of ``shape``
    fractions : float32 array ``shape + (3,)``, CSF / GM / WM, summing to 1
    mask : bool array of ``shape``: a ball inside the CSF that surrounds the brain
    """
    fine = tuple(s * factor for s in shape)
    axes = [(np.arange(n) + 0.5) / factor - s / 2 for n, s in zip(fine, shape)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = 0.42 * min(shape)
    r = np.sqrt(x**2 + y**2 + z**2) / radius
    theta = np.arctan2(y, x)
    phi = np.arccos(np.clip(z / np.maximum(r * radius, 1e-9), -1, 1))
    folds = 1 + 0.10 * np.sin(6 * theta) * np.sin(5 * phi)
    rr = r * folds
    labels = np.zeros(fine, np.uint8)  # 0 CSF
    labels[rr < 0.85] = 1  # GM
    labels[rr < 0.62] = 2  # WM
    ventricle = ((x / (0.22 * radius)) ** 2 + (y / (0.10 * radius)) ** 2
                 + (z / (0.14 * radius)) ** 2) < 1  # fmt: skip
    labels[ventricle] = 0
    sulci = (np.abs(np.sin(6 * theta) * np.sin(5 * phi)) > 0.93) & (rr > 0.7)
    labels[sulci] = 0
    onehot = np.stack([labels == k for k in range(3)], -1).astype(np.float32)
    fractions = onehot.reshape(shape[0], factor, shape[1], factor, shape[2], factor, 3).mean(
        (1, 3, 5)
    )
    image = fractions @ np.asarray(means, np.float32)
    rng = np.random.default_rng(seed)
    if field:
        grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        image = image * (1 + field / 2 * (0.6 * grid[0] + 0.5 * grid[1] * grid[2] - 0.3 * grid[2]))
    image = image + rng.normal(0, noise * means[-1], shape)
    centre = [(np.arange(s) + 0.5 - s / 2) for s in shape]
    cx, cy, cz = np.meshgrid(*centre, indexing="ij")
    mask = np.sqrt(cx**2 + cy**2 + cz**2) < 0.48 * min(shape)
    return image.astype(np.float32), fractions.astype(np.float32), mask
