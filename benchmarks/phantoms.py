"""Realistic test images for the accuracy benchmark: ICBM152 T1, partial-volume phantoms, fields.

Pure functions of numpy/scipy (plus nilearn, only to read the ICBM152 2009 files it ships inside
its package: nothing is downloaded). Every random draw is seeded.

* :func:`icbm152` -- the real (template) T1, its brain mask and the CSF/GM/WM fraction maps.
* :func:`partial_volume_phantom` -- a fuzzy anatomical model: a crisp anatomy on a grid twice
  finer than the output, averaged over 2x2x2 blocks, so that boundary voxels mix tissues; the
  intensities mix the tissue means by those fractions, are multiplied by a smooth random field and
  get Gaussian (or Rician) noise with sd = ``noise_pct`` % of the WM mean (BrainWeb's convention).
* :func:`smooth_random_field` / :func:`coil_field` -- multiplicative fields that are not low-order
  polynomials (so not in the bias-field model's basis), with a given max/min - 1 over the mask
  and geometric mean 1 in the mask.

Grids: resolution 1 is nilearn's 1 mm grid (197 x 233 x 189). Resolution 2 block-averages the
1 mm data over 2 x 2 x 2 blocks (the last odd slice of each axis dropped: 98 x 116 x 94), which
is what a 2 mm acquisition of the same head would record (partial volume included), rather than
re-interpolating the template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Tissue order of every fraction array: index 0 CSF, 1 GM, 2 WM (ascending T1 intensity).
TISSUES = ("CSF", "GM", "WM")
#: T1-like tissue means relative to white matter (CSF, GM, WM).
T1_MEANS = (0.3, 0.65, 1.0)


@dataclass
class Volume:
    """A test image with its truth.

    Attributes
    ----------
    image : (X, Y, Z) float32
        Intensities (field and noise included).
    mask : (X, Y, Z) bool
        Brain mask (the voxels to segment).
    fractions : (3, X, Y, Z) float32
        True tissue fractions (CSF, GM, WM); inside the mask they sum to 1, outside they are 0.
    truth : (X, Y, Z) uint8
        Crisp truth: 1 + argmax of ``fractions`` inside the mask (1 CSF, 2 GM, 3 WM), 0 outside.
    field : (X, Y, Z) float32
        The multiplicative field applied (ones for a uniform image).
    affine : (4, 4) float64
        Voxel-to-world matrix (mm).
    """

    image: np.ndarray
    mask: np.ndarray
    fractions: np.ndarray
    truth: np.ndarray
    field: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _check_resolution(resolution_mm: int) -> int:
    if resolution_mm not in (1, 2):
        raise ValueError(f"resolution_mm must be 1 or 2 (mm), got {resolution_mm!r}")
    return int(resolution_mm)


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``-cubed blocks of the last three axes (odd trailing slices dropped).

    Parameters
    ----------
    a : (..., X, Y, Z) array
    factor : int

    Returns
    -------
    (..., X // factor, Y // factor, Z // factor) float32
    """
    if factor == 1:
        return np.asarray(a, dtype=np.float32)
    lead = a.shape[:-3]
    x, y, z = (s // factor for s in a.shape[-3:])
    a = np.asarray(a, dtype=np.float32)[..., : x * factor, : y * factor, : z * factor]
    a = a.reshape(*lead, x, factor, y, factor, z, factor)
    return a.mean(axis=(-5, -3, -1), dtype=np.float32)


def _coarse_affine(affine_1mm: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid whose voxel j covers 1 mm voxels factor*j .. factor*j + factor - 1."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return affine_1mm @ scale


def _load_icbm152_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1 (rescaled to max 1), brain mask, (3, X, Y, Z) CSF/GM/WM maps and affine at 1 mm."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)  # nilearn ships no CSF map: the rest
    maps = np.stack([csf, gm, wm])
    maps /= np.maximum(maps.sum(axis=0), 1e-6)
    return t1, mask, maps.astype(np.float32), np.asarray(t1_img.affine, dtype=np.float64)


def icbm152(resolution_mm: int = 1) -> Volume:
    """The ICBM152 2009 T1 template shipped with nilearn, with its tissue maps as the truth.

    CSF is ``1 - GM - WM`` (nilearn ships grey- and white-matter maps only); the brain mask is
    nilearn's (template > 0.2). Crisp truth = argmax of the fractions inside the mask. At 2 mm
    every map is block-averaged and the mask is the voxels more than half inside the 1 mm mask.

    Parameters
    ----------
    resolution_mm : {1, 2}

    Returns
    -------
    Volume
        ``field`` is all ones.
    """
    factor = _check_resolution(resolution_mm)
    t1, mask, maps, affine = _load_icbm152_1mm()
    if factor > 1:
        t1 = block_mean(t1, factor)
        maps = block_mean(maps, factor)
        mask = block_mean(mask, factor) > 0.5
        affine = _coarse_affine(affine, factor)
    fractions = np.where(mask, maps, 0.0).astype(np.float32)
    fractions /= np.maximum(fractions.sum(axis=0), 1e-6)
    truth = np.where(mask, fractions.argmax(axis=0) + 1, 0).astype(np.uint8)
    return Volume(
        image=t1.astype(np.float32),
        mask=mask,
        fractions=fractions,
        truth=truth,
        field=np.ones(t1.shape, np.float32),
        affine=affine,
    )


def _upsample2_linear(a: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation at positions j - 1/4 and j + 1/4 along ``axis`` (edges replicated).

    Parameters
    ----------
    a : (..., n, ...) array

    Returns
    -------
    (..., 2n, ...) float32
    """
    a = np.moveaxis(np.asarray(a, np.float32), axis, 0)
    prev = np.concatenate([a[:1], a[:-1]])
    nxt = np.concatenate([a[1:], a[-1:]])
    out = np.empty((2 * a.shape[0],) + a.shape[1:], np.float32)
    out[0::2] = 0.75 * a + 0.25 * prev
    out[1::2] = 0.75 * a + 0.25 * nxt
    return np.moveaxis(out, 0, axis)


def crisp_to_fractions(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Fractions of each class in 2 x 2 x 2 blocks of a crisp label volume.

    Parameters
    ----------
    labels : (2X, 2Y, 2Z) int
        Class index 0 .. n_classes - 1 per fine voxel.

    Returns
    -------
    (n_classes, X, Y, Z) float32
        Multiples of 1/8 summing to 1.
    """
    return np.stack([block_mean(labels == k, 2) for k in range(n_classes)])


def partial_volume_anatomy(resolution_mm: int = 1, slab: int = 16) -> Volume:
    """The fuzzy anatomy of the partial-volume phantom (no field, no noise).

    A crisp anatomy is built on a grid of ``resolution_mm / 2`` mm: the argmax of the ICBM152
    CSF/GM/WM maps (linearly interpolated at 0.5 mm for a 1 mm phantom; the 1 mm maps as they
    are for a 2 mm phantom); its 2 x 2 x 2 blocks give the fractions. Inside the output mask the
    fractions sum to 1; the image is ``sum_k f_k mu_k`` with :data:`T1_MEANS`.

    Parameters
    ----------
    resolution_mm : {1, 2}
    slab : int
        Output slices along the last axis processed at a time (memory only).

    Returns
    -------
    Volume
        ``image`` noiseless, ``field`` all ones.
    """
    factor = _check_resolution(resolution_mm)
    _, mask1, maps, affine = _load_icbm152_1mm()
    if factor == 2:
        labels = maps.argmax(axis=0)
        fractions = crisp_to_fractions(labels)
        mask = block_mean(mask1, 2) > 0.5
        affine = _coarse_affine(affine, 2)
    else:
        mask = mask1
        nz = maps.shape[-1]
        parts = []
        for z0 in range(0, nz, slab):
            z1 = min(z0 + slab, nz)
            lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
            fine = maps[..., lo:hi]
            for axis in (1, 2, 3):
                fine = _upsample2_linear(fine, axis)
            fine = fine[..., 2 * (z0 - lo) : 2 * (z0 - lo) + 2 * (z1 - z0)]
            parts.append(crisp_to_fractions(fine.argmax(axis=0)))
        fractions = np.concatenate(parts, axis=-1)
    fractions = np.where(mask, fractions, 0.0).astype(np.float32)
    truth = np.where(mask, fractions.argmax(axis=0) + 1, 0).astype(np.uint8)
    means = np.asarray(T1_MEANS, np.float32).reshape(3, 1, 1, 1)
    image = (fractions * means).sum(axis=0, dtype=np.float32)
    return Volume(image, mask, fractions, truth, np.ones(image.shape, np.float32), affine)


def smooth_random_field(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    peak_to_peak: float = 0.4,
    seed: int = 0,
    mask: np.ndarray | None = None,
    sigma_mm: float = 40.0,
) -> np.ndarray:
    """A smooth random multiplicative field, not a low-order polynomial.

    White noise on a coarse grid (``sigma_mm / 4`` spacing) is smoothed by a Gaussian of
    ``sigma_mm``, interpolated (cubic) to the image grid and exponentiated, scaled so that
    ``max / min - 1 == peak_to_peak`` over the mask and divided by its geometric mean in the mask.

    Parameters
    ----------
    shape : (3,) int
    spacing : (3,) float
        Voxel size in mm.
    peak_to_peak : float
        0.2 for a 20 % field, 0.4 for 40 %; 0 gives ones.
    seed : int
    mask : (X, Y, Z) bool, optional
        Where the range and the mean are measured (default everywhere).
    sigma_mm : float
        Correlation length of the field.

    Returns
    -------
    (X, Y, Z) float32
    """
    mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if peak_to_peak <= 0:
        return np.ones(shape, np.float32)
    step = sigma_mm / 4.0
    coarse_shape = [int(np.ceil(n * s / step)) + 9 for n, s in zip(shape, spacing)]
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 4.0, mode="wrap")
    coords = np.meshgrid(
        *[np.arange(n) * s / step + 4.5 for n, s in zip(shape, spacing)],
        indexing="ij",
        sparse=True,
    )
    grids = np.broadcast_arrays(*coords)
    g = ndimage.map_coordinates(coarse, grids, order=3, mode="nearest").astype(np.float32)
    return _scale_log_field(g, peak_to_peak, mask)


def coil_field(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    peak_to_peak: float = 0.4,
    seed: int = 0,
    mask: np.ndarray | None = None,
    n_coils: int = 4,
) -> np.ndarray:
    """A coil-like receive profile: a sum of a few broad radial blobs outside the brain.

    Each coil sits at a random direction just outside the mask's bounding box and contributes
    ``exp(-d^2 / (2 w^2))`` with ``w`` half the head's extent; the log of the sum is scaled like
    :func:`smooth_random_field`.

    Parameters and returns as :func:`smooth_random_field`.
    """
    mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if peak_to_peak <= 0:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng(seed)
    idx = np.argwhere(mask)
    centre = idx.mean(axis=0) * spacing
    radius = (idx.max(axis=0) - idx.min(axis=0)) * np.asarray(spacing) / 2.0
    width = float(radius.mean())
    coords = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    total = np.zeros(shape, np.float64)
    for _ in range(n_coils):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        position = centre + 1.1 * radius * direction
        d2 = sum((c - p) ** 2 for c, p in zip(coords, position))
        total += rng.uniform(0.5, 1.0) * np.exp(-d2 / (2 * width**2))
    return _scale_log_field(np.log(total).astype(np.float32), peak_to_peak, mask)


def _scale_log_field(g: np.ndarray, peak_to_peak: float, mask: np.ndarray) -> np.ndarray:
    """exp(a * g) with max/min - 1 = peak_to_peak and geometric mean 1 over ``mask``."""
    inside = g[mask]
    a = np.log1p(peak_to_peak) / float(inside.max() - inside.min())
    log_field = a * (g - float(inside.mean()))
    return np.exp(log_field).astype(np.float32)


def add_noise(
    image: np.ndarray, noise_pct: float, reference: float, seed: int, kind: str = "gaussian"
) -> np.ndarray:
    """Add noise of sd ``noise_pct`` % of ``reference`` (Gaussian, or Rician magnitude).

    Parameters
    ----------
    image : (X, Y, Z) float
    noise_pct : float
    reference : float
        The WM mean, BrainWeb's reference for the noise level.
    seed : int
    kind : {"gaussian", "rician"}

    Returns
    -------
    (X, Y, Z) float32
    """
    if noise_pct <= 0:
        return np.asarray(image, np.float32)
    sd = noise_pct / 100.0 * reference
    rng = np.random.default_rng(seed)
    real = image + sd * rng.standard_normal(image.shape, dtype=np.float32)
    if kind == "gaussian":
        return real.astype(np.float32)
    if kind == "rician":
        imag = sd * rng.standard_normal(image.shape, dtype=np.float32)
        return np.hypot(real, imag).astype(np.float32)
    raise ValueError(f"kind must be 'gaussian' or 'rician', got {kind!r}")


def partial_volume_phantom(
    noise_pct: float = 3.0,
    field_pct: float = 20.0,
    seed: int = 0,
    resolution_mm: int = 1,
    *,
    field_kind: str = "smooth",
    noise_kind: str = "gaussian",
    anatomy: Volume | None = None,
) -> Volume:
    """A partial-volume T1 phantom: fuzzy ICBM152 anatomy x smooth field + noise.

    Parameters
    ----------
    noise_pct : float
        Noise sd in % of the WM mean (1.0).
    field_pct : float
        Field max/min - 1 over the brain, in % (0 = uniform).
    seed : int
        Seeds the field and the noise (the anatomy is fixed).
    resolution_mm : {1, 2}
    field_kind : {"smooth", "coil"}
        :func:`smooth_random_field` or :func:`coil_field`.
    noise_kind : {"gaussian", "rician"}
    anatomy : Volume, optional
        A precomputed :func:`partial_volume_anatomy` of the same resolution (saves its cost).

    Returns
    -------
    Volume
    """
    anatomy = partial_volume_anatomy(resolution_mm) if anatomy is None else anatomy
    field_seed, noise_seed = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2)
    )
    make_field = {"smooth": smooth_random_field, "coil": coil_field}[field_kind]
    field = make_field(
        anatomy.image.shape, anatomy.spacing, field_pct / 100.0, field_seed, anatomy.mask
    )
    image = add_noise(anatomy.image * field, noise_pct, T1_MEANS[2], noise_seed, noise_kind)
    return Volume(image, anatomy.mask, anatomy.fractions, anatomy.truth, field, anatomy.affine)
