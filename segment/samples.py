"""Deterministic synthetic sample scans with ground truth.

A BrainWeb-style T1-weighted head phantom (3-D) and a multi-phase microscopy-like image (2-D),
both generated from a seed with numpy and scipy only, so that the shipped files in
``sample_scans/`` can be rebuilt byte for byte with ``python -m segment.samples sample_scans``.

Ground-truth labels of the head phantom are numbered in ascending T1 intensity:

===== ============= ============ ======================
index name          abbreviation mean (fraction of WM)
===== ============= ============ ======================
1     background    BG           0.00 (air)
2     skull         SK           0.22
3     csf           CSF          0.42
4     grey matter   GM           0.68
5     white matter  WM           1.00
6     scalp fat     FAT          1.35
===== ============= ============ ======================

Noise follows BrainWeb's convention: Rician noise whose Gaussian sigma is ``noise`` percent of the
brightest tissue mean (scalp fat). The intensity non-uniformity field is a smooth multiplicative
polynomial field spanning ``1 ± nonuniformity/200`` over the head, applied before the noise.

References
----------
Collins DL et al. (1998) Design and construction of a realistic digital brain phantom.
IEEE Trans Med Imaging 17(3):463-468.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from segment.exceptions import InputError, SegmentError

__all__ = [
    "TISSUES",
    "DEFAULT_SHAPE",
    "make_head_phantom",
    "phantom_affine",
    "make_microscopy_image",
    "write_samples",
    "generate",
    "main",
]

#: Head phantom classes: (label, name, abbreviation, mean intensity as a fraction of WM).
TISSUES: tuple[tuple[int, str, str, float], ...] = (
    (1, "background", "BG", 0.0),
    (2, "skull", "SK", 0.22),
    (3, "csf", "CSF", 0.42),
    (4, "grey matter", "GM", 0.68),
    (5, "white matter", "WM", 1.0),
    (6, "scalp fat", "FAT", 1.35),
)
BG, SKULL, CSF, GM, WM, FAT = 1, 2, 3, 4, 5, 6

#: Default phantom grid (x: left→right, y: posterior→anterior, z: inferior→superior), 1 mm voxels.
DEFAULT_SHAPE: tuple[int, int, int] = (91, 109, 87)

_WM_INTENSITY = 500.0  # stored value of white matter before noise and bias field
_TEXTURE = 0.02  # relative standard deviation of the smooth within-class texture
_SHIPPED_NOISY = (9.0, 40.0)  # (noise %, non-uniformity %) of head_t1_noisy.nii.gz


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int], ndim: int, minimum: int) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of ints, refusing wrong length or too-small axes."""
    try:
        out = tuple(int(n) for n in shape)
    except TypeError as exc:
        raise SegmentError(f"shape must be {ndim} integers; got {shape!r}") from exc
    if len(out) != ndim or min(out) < minimum:
        raise SegmentError(
            f"shape must be {ndim} integers each >= {minimum}; got {shape!r}; "
            f"pass e.g. {DEFAULT_SHAPE if ndim == 3 else (256, 320)}"
        )
    return out


def _check_percent(name: str, value: float) -> float:
    """Return ``value`` as a float in [0, 100] or raise :class:`SegmentError`."""
    value = float(value)
    if not np.isfinite(value) or not 0.0 <= value <= 100.0:
        raise SegmentError(f"{name} is a percentage in [0, 100]; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# smooth random fields
# --------------------------------------------------------------------------------------------
def _grid_mm(shape: tuple[int, int, int], voxel_size: float) -> list[np.ndarray]:
    """Broadcastable voxel-centre coordinates in mm, origin at the volume centre.

    Returns three arrays of shapes ``(X, 1, 1)``, ``(1, Y, 1)`` and ``(1, 1, Z)``.
    """
    axes = [(np.arange(n) - (n - 1) / 2.0) * voxel_size for n in shape]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _wave_field(
    rng: np.random.Generator, xyz: list[np.ndarray], wavelength_mm: float, n_waves: int = 12
) -> np.ndarray:
    """Smooth random field: a sum of plane waves of about one wavelength, unit standard deviation.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of directions, wavelengths (±25 %) and phases.
    xyz : list of 3 broadcastable arrays
        Coordinates in mm (see :func:`_grid_mm`).
    wavelength_mm : float
        Typical wavelength in mm; sets the scale of the features.
    n_waves : int
        Number of plane waves summed.

    Returns
    -------
    field : (X, Y, Z) float64 array
        Zero mean and unit variance in expectation, values mostly within ±2.5.
    """
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = 2 * np.pi / wavelength_mm * rng.uniform(0.75, 1.25, size=n_waves)
    phases = rng.uniform(0, 2 * np.pi, size=n_waves)
    field = np.zeros(np.broadcast_shapes(*(a.shape for a in xyz)))
    for d, ph in zip(directions * k[:, None], phases, strict=True):
        field += np.cos(d[0] * xyz[0] + d[1] * xyz[1] + d[2] * xyz[2] + ph)
    return field * np.sqrt(2.0 / n_waves)


def _ellipsoid(xyz: list[np.ndarray], centre, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius: < 1 inside, 1 on the surface (dimensionless)."""
    return np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(xyz, centre, semi_axes, strict=True)))


# --------------------------------------------------------------------------------------------
# head phantom
# --------------------------------------------------------------------------------------------
def _head_anatomy(shape, voxel_size: float, rng: np.random.Generator) -> np.ndarray:
    """Ground-truth labels 1..6 of the head phantom.

    Nested deformed shells give scalp fat, skull and extra-cerebral CSF; the brain is folded by
    sulci (CSF sheets along the zero set of a smooth random field) and a midline fissure; a
    cortical grey-matter ribbon of 2–4 mm lines every CSF surface; curved lateral ventricles and
    deep grey-matter nuclei sit in the white matter. Thicknesses are in mm and scale with the
    head size relative to the default grid.

    Returns
    -------
    labels : (X, Y, Z) uint8 array
    """
    xyz = _grid_mm(shape, voxel_size)
    extent = np.asarray(shape) * voxel_size
    s = float(min(extent / np.asarray(DEFAULT_SHAPE)))  # anatomical scale, 1 at default size

    def warp(wavelength):
        return _wave_field(rng, xyz, wavelength * s)

    # Head: deformed ellipsoid filling ~88 % of the field of view.
    head_r = _ellipsoid(xyz, (0, 0, 0), 0.44 * extent) + 0.03 * warp(60)
    head = head_r < 1.0
    depth = ndimage.distance_transform_edt(head, sampling=voxel_size)  # mm below the scalp surface
    t_scalp = 4.5 * s * (1 + 0.25 * warp(50))
    t_inner = t_scalp + 5.0 * s * (1 + 0.25 * warp(50))  # inner table of the skull
    t_pial = t_inner + 2.0 * s * (1 + 0.3 * warp(40))  # brain surface
    below_pial = depth - t_pial

    # Sulci: ~2 mm wide CSF sheets along the zero set of a band-limited field, 5-11 mm deep.
    g = _wave_field(rng, xyz, 22 * s, n_waves=24)
    grad = np.sqrt(sum(gi**2 for gi in np.gradient(g, voxel_size)))
    half_width = max(1.0 * s, 0.6 * voxel_size)
    sulci = (np.abs(g) < half_width * grad) & (below_pial < 8 * s * (1 + 0.35 * warp(35)))
    fissure = (np.abs(xyz[0] - 1.5 * s * warp(60)) < max(1.1 * s, 0.6 * voxel_size)) & (
        below_pial < 16 * s
    )

    # Lateral ventricles: curved ("banana") ellipsoids either side of the midline.
    ventricles = np.zeros(head.shape, dtype=bool)
    deep_gm = np.zeros(head.shape, dtype=bool)
    for side in (-1, 1):
        z_curve = 6 * s - (xyz[1] + 4 * s) ** 2 / (70 * s)
        r = _ellipsoid(
            [xyz[0], xyz[1], xyz[2] - z_curve],
            (side * 5.5 * s, -4 * s, 0),
            (4.5 * s, 18 * s, 5.5 * s),
        )
        ventricles |= r + 0.08 * warp(25) < 1.0
        r = _ellipsoid(xyz, (side * 13 * s, -2 * s, -4 * s), (5 * s, 9 * s, 6 * s))
        deep_gm |= r + 0.08 * warp(25) < 1.0

    brain = (below_pial > 0) & ~sulci & ~fissure & ~ventricles
    to_csf = ndimage.distance_transform_edt(brain | ventricles, sampling=voxel_size)
    cortex = brain & (to_csf <= 3.0 * s * (1 + 0.3 * warp(30)))  # folded WM/GM boundary

    labels = np.full(head.shape, BG, dtype=np.uint8)
    labels[head] = FAT
    labels[depth > t_scalp] = SKULL
    labels[depth > t_inner] = CSF
    labels[brain] = WM
    labels[cortex | (deep_gm & brain)] = GM
    return labels


def _bias_field(head: np.ndarray, nonuniformity: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field spanning exactly ``1 ± nonuniformity/200`` over the head.

    A random cubic polynomial in the normalised coordinates (each in [-1, 1]), rescaled so that
    its minimum and maximum over the ``head`` mask are ``1 ∓ nonuniformity/200`` (outside the
    head, where the signal is 0, it may go slightly beyond).

    Returns
    -------
    field : (X, Y, Z) float64 array, dimensionless
    """
    shape = head.shape
    u = _grid_mm(shape, 1.0)
    u = [a / max(np.abs(a).max(), 1.0) for a in u]
    powers = [(i, j, k) for i in range(4) for j in range(4) for k in range(4) if 0 < i + j + k <= 3]
    coefs = rng.normal(size=len(powers)) / np.array([1.0 + i + j + k for i, j, k in powers])
    raw = sum(
        c * u[0] ** i * u[1] ** j * u[2] ** k for c, (i, j, k) in zip(coefs, powers, strict=True)
    )
    raw = np.broadcast_to(raw, shape)
    low, high = raw[head].min(), raw[head].max()
    unit = 2 * (raw - low) / (high - low) - 1
    return 1.0 + nonuniformity / 200.0 * unit


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal + N(0, sigma) + i N(0, sigma)``; ``signal`` unchanged if sigma is 0."""
    if sigma == 0:
        return signal
    real = signal + rng.normal(0.0, sigma, size=signal.shape)
    imag = rng.normal(0.0, sigma, size=signal.shape)
    return np.hypot(real, imag)


def phantom_affine(shape: Sequence[int], voxel_size: float = 1.0) -> np.ndarray:
    """RAS+ affine with isotropic ``voxel_size`` mm voxels and the origin at the volume centre.

    Returns
    -------
    affine : (4, 4) float64 array
        Maps voxel indices (i, j, k) to millimetres (x: right, y: anterior, z: superior).
    """
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1) / 2.0 * voxel_size
    return affine


def make_head_phantom(
    shape: Sequence[int] = DEFAULT_SHAPE,
    *,
    noise: float = 3.0,
    nonuniformity: float = 0.0,
    seed: int = 0,
    voxel_size: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make a T1-weighted head phantom with ground-truth tissue labels.

    The anatomy depends only on ``shape``, ``voxel_size`` and ``seed``; ``noise`` and
    ``nonuniformity`` change the image but not the labels, so phantoms that differ only in those
    share their ground truth.

    Parameters
    ----------
    shape : 3 ints
        Grid size (x, y, z) in voxels, each >= 16. Default :data:`DEFAULT_SHAPE`.
    noise : float
        Rician noise level in percent of the brightest tissue mean (scalp fat), as BrainWeb
        (0, 1, 3, 5, 7, 9 %). The Gaussian sigma of each channel is ``noise/100 * 675``.
    nonuniformity : float
        Intensity non-uniformity in percent (BrainWeb uses 0, 20, 40 %): a smooth multiplicative
        field spanning ``1 ± nonuniformity/200`` over the head, applied before the noise.
    seed : int
        Seed of every random choice (anatomy, texture, field shape, noise).
    voxel_size : float
        Isotropic voxel size in mm.

    Returns
    -------
    image : (X, Y, Z) int16 array
        T1-like intensities (white matter 500 before noise and field).
    labels : (X, Y, Z) uint8 array
        Ground truth 1..6 in ascending T1 intensity, see :data:`TISSUES`.
    affine : (4, 4) float64 array
        RAS+ voxel-to-mm affine with the origin at the centre of the volume.

    Examples
    --------
    >>> image, labels, affine = make_head_phantom((40, 48, 36), noise=3.0, seed=1)
    >>> image.dtype, labels.dtype, sorted(set(labels.ravel().tolist()))
    (dtype('int16'), dtype('uint8'), [1, 2, 3, 4, 5, 6])
    """
    shape = _check_shape(shape, 3, 16)
    noise = _check_percent("noise", noise)
    nonuniformity = _check_percent("nonuniformity", nonuniformity)
    if not voxel_size > 0:
        raise SegmentError(f"voxel_size must be a positive number of mm; got {voxel_size!r}")
    anatomy_rng, texture_rng, field_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    labels = _head_anatomy(shape, float(voxel_size), anatomy_rng)
    means = _WM_INTENSITY * np.array([0.0] + [t[3] for t in TISSUES])
    texture = 1 + _TEXTURE * _wave_field(texture_rng, _grid_mm(shape, voxel_size), 6.0, 16)
    signal = means[labels] * texture * _bias_field(labels != BG, nonuniformity, field_rng)
    sigma = noise / 100.0 * means.max()
    image = np.rint(_rician(signal, sigma, noise_rng))
    image = np.clip(image, 0, np.iinfo(np.int16).max).astype(np.int16)
    return image, labels, phantom_affine(shape, voxel_size)


# --------------------------------------------------------------------------------------------
# 2-D microscopy-like sample
# --------------------------------------------------------------------------------------------
def make_microscopy_image(
    shape: Sequence[int] = (256, 320),
    *,
    n_phases: int = 3,
    noise: float = 4.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Make a multi-phase, microscopy-like 2-D image with ground-truth phase labels.

    Each pixel belongs to the phase whose smoothed random field (Gaussian, sigma 8 px) is
    largest, which gives smooth blobby grains. Phase means are evenly spaced over a 12-bit
    range, the image is blurred by the optics (sigma 0.7 px) and Gaussian noise is added.

    Parameters
    ----------
    shape : 2 ints
        Image size (rows, columns) in pixels, each >= 16.
    n_phases : int
        Number of phases, 2 to 6.
    noise : float
        Gaussian noise sigma in percent of the brightest phase mean.
    seed : int
        Seed of the random fields and the noise.

    Returns
    -------
    image : (rows, cols) uint16 array
        Intensities in counts, 12-bit range.
    labels : (rows, cols) uint8 array
        Phases 1..n_phases in ascending mean intensity.
    """
    shape = _check_shape(shape, 2, 16)
    noise = _check_percent("noise", noise)
    if not 2 <= int(n_phases) <= 6:
        raise SegmentError(f"n_phases must be between 2 and 6; got {n_phases!r}")
    field_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    fields = [
        ndimage.gaussian_filter(field_rng.normal(size=shape), 8.0, mode="wrap")
        for _ in range(int(n_phases))
    ]
    labels = (np.argmax(np.stack(fields), axis=0) + 1).astype(np.uint8)
    means = np.linspace(600.0, 3400.0, int(n_phases))
    image = ndimage.gaussian_filter(means[labels - 1], 0.7)
    image = image + noise_rng.normal(0.0, noise / 100.0 * means.max(), size=shape)
    return np.clip(np.rint(image), 0, 4095).astype(np.uint16), labels


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``.<name>.tmp`` beside ``path``, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray, description: str, label=False) -> bytes:
    """Reproducible ``.nii.gz`` bytes: gzip header with mtime 0 and no file name."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units("mm")
    header["descrip"] = description[:79].encode()
    if label:
        header.set_intent("label")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(img.to_bytes())
    return buffer.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D uint8 or uint16 array as a greyscale PNG (deterministic, no metadata)."""
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise SegmentError(f"PNG needs a 2-D uint8/uint16 array; got {image.dtype} {image.shape}")
    bit_depth = 8 * image.dtype.itemsize
    rows = image.astype(image.dtype.newbyteorder(">"), copy=False)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", image.shape[1], image.shape[0], bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _axial_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` for display: anterior at the top, subject's right on the right."""
    return np.ascontiguousarray(np.flipud(volume[:, :, k].T))


def _labels_tsv() -> bytes:
    """BIDS ``dseg.tsv``-style table (index, name, abbreviation) of :data:`TISSUES`."""
    lines = ["index\tname\tabbreviation"] + [f"{i}\t{n}\t{a}" for i, n, a, _ in TISSUES]
    return ("\n".join(lines) + "\n").encode()


def _write_all(files: dict[str, bytes], out_dir: Path, overwrite: bool) -> list[Path]:
    """Write ``{name: bytes}`` atomically into ``out_dir``; refuse to overwrite unless asked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in files]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise InputError(path, "exists; pass overwrite=True (--overwrite) to replace it")
    for path, data in zip(paths, files.values(), strict=True):
        _atomic_write(path, data)
    return paths


def write_samples(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write the shipped sample set into ``out_dir``.

    Files: ``head_t1.nii.gz`` (3 % noise, 0 % non-uniformity, int16), ``head_t1_labels.nii.gz``
    (ground truth 1..6, uint8), ``head_t1_brainmask.nii.gz`` (CSF+GM+WM, uint8),
    ``head_t1_noisy.nii.gz`` (9 % noise, 40 % non-uniformity, same anatomy), ``head_t1_labels.tsv``
    (class table), ``head_slice.png`` / ``head_slice_labels.png`` (axial slice of ``head_t1``,
    16-bit / 8-bit), ``microscopy.png`` / ``microscopy_labels.png`` (3-phase 2-D example).
    Every file is byte-for-byte reproducible for a given seed and written atomically.

    Parameters
    ----------
    out_dir : str or Path
        Output folder, created if missing.
    seed : int
        Seed passed to the generators.
    overwrite : bool
        Replace existing files; otherwise an existing file raises :class:`InputError` and
        nothing is written.

    Returns
    -------
    paths : list of Path
        The files written, in the order listed above.
    """
    image, labels, affine = make_head_phantom(noise=3.0, seed=seed)
    noisy, _, _ = make_head_phantom(
        noise=_SHIPPED_NOISY[0], nonuniformity=_SHIPPED_NOISY[1], seed=seed
    )
    brainmask = np.isin(labels, (CSF, GM, WM)).astype(np.uint8)
    micro, micro_labels = make_microscopy_image(seed=seed)
    k = int(np.argmax(np.count_nonzero(np.isin(labels, (GM, WM)), axis=(0, 1))))
    tag = f"segment phantom seed={seed}"
    files = {
        "head_t1.nii.gz": _nifti_gz_bytes(image, affine, f"{tag} noise=3% rf=0%"),
        "head_t1_labels.nii.gz": _nifti_gz_bytes(labels, affine, f"{tag} labels", label=True),
        "head_t1_brainmask.nii.gz": _nifti_gz_bytes(brainmask, affine, f"{tag} brain mask"),
        "head_t1_noisy.nii.gz": _nifti_gz_bytes(noisy, affine, f"{tag} noise=9% rf=40%"),
        "head_t1_labels.tsv": _labels_tsv(),
        "head_slice.png": _png_bytes(_axial_slice(image, k).astype(np.uint16)),
        "head_slice_labels.png": _png_bytes(_axial_slice(labels, k)),
        "microscopy.png": _png_bytes(micro),
        "microscopy_labels.png": _png_bytes(micro_labels),
    }
    return _write_all(files, Path(out_dir), overwrite)


def generate(
    out_dir: str | Path,
    *,
    noise: float | None = None,
    nonuniformity: float | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write the shipped sample set, or one custom head phantom and its labels.

    With ``noise``, ``nonuniformity`` and ``shape`` all None this is :func:`write_samples`.
    Otherwise it writes ``head_t1_n{noise}_rf{nonuniformity}.nii.gz`` and
    ``head_t1_n{noise}_rf{nonuniformity}_labels.nii.gz`` (missing values default to 3 %, 0 % and
    :data:`DEFAULT_SHAPE`).

    Parameters
    ----------
    out_dir : str or Path
        Output folder, created if missing.
    noise, nonuniformity : float or None
        Percentages, see :func:`make_head_phantom`.
    shape : 3 ints or None
        Grid size in voxels.
    seed : int
        Seed of the generator.
    overwrite : bool
        Replace existing files instead of raising :class:`InputError`.

    Returns
    -------
    paths : list of Path
        The files written.
    """
    if noise is None and nonuniformity is None and shape is None:
        return write_samples(out_dir, seed=seed, overwrite=overwrite)
    noise = 3.0 if noise is None else noise
    nonuniformity = 0.0 if nonuniformity is None else nonuniformity
    image, labels, affine = make_head_phantom(
        DEFAULT_SHAPE if shape is None else shape,
        noise=noise,
        nonuniformity=nonuniformity,
        seed=seed,
    )
    stem = f"head_t1_n{float(noise):g}_rf{float(nonuniformity):g}"
    tag = f"segment phantom seed={seed} noise={noise:g}% rf={nonuniformity:g}%"
    files = {
        f"{stem}.nii.gz": _nifti_gz_bytes(image, affine, tag),
        f"{stem}_labels.nii.gz": _nifti_gz_bytes(labels, affine, f"{tag} labels", label=True),
    }
    return _write_all(files, Path(out_dir), overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segment.samples OUT_DIR [options]``: write sample scans, print their paths."""
    parser = argparse.ArgumentParser(
        prog="python -m segment.samples",
        description="Write the shipped sample scans, or one custom head phantom and its labels.",
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument("--noise", type=float, help="Rician noise, %% of brightest tissue")
    parser.add_argument("--nonuniformity", type=float, help="intensity non-uniformity, %%")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="grid size")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        paths = generate(
            args.out_dir,
            noise=args.noise,
            nonuniformity=args.nonuniformity,
            shape=args.shape,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except SegmentError as exc:
        parser.exit(1, f"error: {exc}\n")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
