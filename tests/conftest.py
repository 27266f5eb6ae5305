"""Shared fixtures for the `segment` test-suite.

Fixtures
--------
rng
    ``numpy.random.Generator`` seeded with 12345 (fresh per test).
shape3d
    The asymmetric volume shape ``(7, 8, 9)``: axis mix-ups change the shape.
shape2d
    The asymmetric image shape ``(11, 13)``.
affine
    A non-trivial (4, 4) affine: axes permuted and flipped, anisotropic voxels
    (zooms (1.5, 2.0, 2.5) mm) and a translation.
volume
    An int16 array of ``shape3d``: a brighter box (~1000) in a darker background (~200) with
    noise; values are integers.
make_nifti
    Factory writing a NIfTI file into ``tmp_path`` and returning its Path::

        make_nifti(data=None, name="scan.nii.gz", *, affine=None, nifti2=False,
                   slope=None, inter=None, dtype=np.int16, xyzt_units=("mm", "sec"))

    ``data`` defaults to ``volume``; ``affine`` to the ``affine`` fixture.  The sform (code 2,
    aligned) and qform (code 1, scanner) are both set.  ``slope``/``inter`` set scl_slope/scl_inter.
    Use a ``.nii`` name for an uncompressed file.
make_image
    Factory writing a 2-D picture into ``tmp_path`` and returning its Path::

        make_image(data=None, name="image.png")

    ``data`` defaults to a uint8 (11, 13) ramp with a bright square.  The format follows the
    extension: ``.png``/``.jpg``/``.jpeg``/``.bmp`` through scikit-image (imageio/Pillow),
    ``.tif``/``.tiff`` through tifffile (a (P, rows, cols) array becomes a P-page TIFF).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded random generator."""
    return np.random.default_rng(12345)


@pytest.fixture
def shape3d() -> tuple[int, int, int]:
    """Asymmetric volume shape (7, 8, 9)."""
    return (7, 8, 9)


@pytest.fixture
def shape2d() -> tuple[int, int]:
    """Asymmetric image shape (11, 13)."""
    return (11, 13)


@pytest.fixture
def affine() -> np.ndarray:
    """Oblique-free but permuted/flipped affine with zooms (1.5, 2.0, 2.5) mm and an offset."""
    return np.array(
        [
            [0.0, -2.0, 0.0, 90.0],
            [1.5, 0.0, 0.0, -126.0],
            [0.0, 0.0, 2.5, -72.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


@pytest.fixture
def volume(rng, shape3d) -> np.ndarray:
    """int16 volume: bright box (~1000) in a darker background (~200), Gaussian noise."""
    data = np.full(shape3d, 200.0)
    data[2:5, 2:6, 3:7] = 1000.0
    data += rng.normal(0.0, 20.0, size=shape3d)
    return np.round(data).astype(np.int16)


@pytest.fixture
def make_nifti(tmp_path, volume, affine):
    """Factory: write a NIfTI file into tmp_path (see the module docstring)."""

    def _make(
        data: np.ndarray | None = None,
        name: str = "scan.nii.gz",
        *,
        affine: np.ndarray | None = None,
        nifti2: bool = False,
        slope: float | None = None,
        inter: float | None = None,
        dtype=np.int16,
        xyzt_units: tuple[str, str] = ("mm", "sec"),
    ) -> Path:
        array = np.asarray(volume if data is None else data).astype(dtype)
        aff = default_affine if affine is None else np.asarray(affine, dtype=float)
        klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        img = klass(array, aff)
        img.header.set_data_dtype(dtype)
        img.header.set_xyzt_units(*xyzt_units)
        img.set_sform(aff, code=2)
        img.set_qform(aff, code=1)
        if slope is not None or inter is not None:
            # Set after construction: nibabel keeps explicit scaling and stores ``array`` as is.
            img.header.set_slope_inter(
                1.0 if slope is None else slope, 0.0 if inter is None else inter
            )
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(path)
        return path

    default_affine = affine
    return _make


@pytest.fixture
def make_image(tmp_path, shape2d):
    """Factory: write a 2-D picture into tmp_path (see the module docstring)."""

    def _make(data: np.ndarray | None = None, name: str = "image.png") -> Path:
        if data is None:
            rows, cols = shape2d
            data = np.add.outer(np.arange(rows) * 5, np.arange(cols) * 3).astype(np.uint8)
            data[3:8, 4:10] = 220
        data = np.asarray(data)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            photometric = "rgb" if data.ndim == 3 and data.shape[-1] in (3, 4) else "minisblack"
            tifffile.imwrite(path, data, photometric=photometric)
        else:
            import skimage.io

            skimage.io.imsave(path, data, check_contrast=False)
        return path

    return _make


@pytest.fixture
def picture(rng) -> np.ndarray:
    """(40, 50) float picture with three classes (~40, ~120, ~200) and noise (sd 6)."""
    data = np.full((40, 50), 40.0)
    data[8:32, 10:40] = 120.0
    data[15:25, 20:30] = 200.0
    return data + rng.normal(0.0, 6.0, data.shape)


@pytest.fixture
def tissues(rng) -> np.ndarray:
    """(20, 24, 16) volume, three nested classes (~100, ~400, ~800) with noise, integer values."""
    data = np.full((20, 24, 16), 100.0)
    data[4:16, 4:20, 3:13] = 400.0
    data[8:12, 8:16, 6:10] = 800.0
    return np.round(data + rng.normal(0.0, 15.0, data.shape))
