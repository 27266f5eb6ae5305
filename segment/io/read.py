"""Read scans: NIfTI-1/-2 (defensively, see :mod:`segment._reading`) and 2-D pictures."""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from segment import _reading
from segment.exceptions import DataWarning, InputError

#: File extensions :func:`load_scan` reads (compared case-insensitively).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".nii",
    ".nii.gz",
    ".png",
    ".tif",
    ".tiff",
    ".jpg",
    ".jpeg",
    ".bmp",
)
_NIFTI_EXTENSIONS = (".nii", ".nii.gz")
#: Bytes the data of a compressed input may take in memory unless told otherwise (the default
#: ``memory_limit`` of :func:`segment.api.segment_file`).
DEFAULT_READ_LIMIT = 3e9
#: Smallest read limit :func:`segment.api.segment_file` uses whatever its ``memory_limit``.
MIN_READ_LIMIT = 512e6
_TIFF_EXTENSIONS = (".tif", ".tiff")
# Coefficients of ITU-R BT.709 luminance, as in skimage.color.rgb2gray.
_LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
# Errors that the readers (nibabel, gzip/zlib, Pillow via imageio, tifffile) raise for a corrupt or
# truncated file.  PIL.UnidentifiedImageError and tifffile.TiffFileError derive from OSError and
# ValueError respectively.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    SyntaxError,
    zlib.error,
    struct.error,
    IndexError,
    ImageFileError,
)


@dataclass
class Scan:
    """One input scan: its spatial data and geometry.

    Attributes
    ----------
    path : Path
        The file the scan was read from.
    kind : {"nifti", "image"}
        ``"nifti"`` for NIfTI-1/-2 files, ``"image"`` for 2-D pictures (PNG, TIFF, JPEG, BMP).
    data : (X, Y, Z) or (X, Y) or (rows, cols) array
        Spatial intensities.  The on-disk dtype is kept when the file has no scaling (so integer
        data stay integer); an uncompressed ``.nii`` without scaling gives a read-only-on-disk
        ``numpy.memmap`` (copy-on-write), not an in-memory copy.
    affine : (4, 4) float64 array
        Voxel-to-world (mm) transform; the identity for 2-D pictures.
    header : nibabel.Nifti1Header or nibabel.Nifti2Header or None
        The NIfTI header, ``None`` for 2-D pictures.
    zooms : tuple of float
        Voxel size in mm along each spatial axis; ``(1.0, 1.0)`` for 2-D pictures.
    """

    path: Path
    kind: str
    data: np.ndarray
    affine: np.ndarray
    header: object | None
    zooms: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of :attr:`data`."""
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.data.ndim

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (``prod(zooms) / 1000``; pixel area / 1000 for 2-D)."""
        return float(np.prod(self.zooms)) / 1000.0


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------


def _matched_extension(path: str | Path) -> str:
    """Return the supported extension ``path`` ends with (lower case), or ``""``."""
    name = Path(path).name.lower()
    # Longest first so that ".nii.gz" wins over a bare ".gz" and ".tiff" over ".tif".
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def is_supported(path: str | Path) -> bool:
    """Return True when ``path`` has one of :data:`SUPPORTED_EXTENSIONS` (case-insensitive)."""
    return _matched_extension(path) != ""


def scan_stem(path: str | Path) -> str:
    """Return the file name without its image extension.

    Examples
    --------
    >>> scan_stem("data/scan.nii.gz")
    'scan'
    >>> scan_stem("a.b.png")
    'a.b'
    """
    name = Path(path).name
    ext = _matched_extension(name)
    if ext:
        return name[: -len(ext)]
    return Path(name).stem


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _short_reason(exc: BaseException) -> str:
    """One-line description of a reader exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_readable_file(path: Path) -> str:
    """Check that ``path`` is an existing, readable file with a supported extension.

    Returns the matched extension.
    """
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")
    _reading.check_regular_file(path)  # a FIFO, /dev/zero... would hang or mislead
    ext = _matched_extension(path)
    if not ext:
        raise InputError(
            path,
            f"unsupported file type {''.join(path.suffixes) or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    if not os.access(path, os.R_OK):
        raise InputError(path, "cannot read: permission denied")
    return ext


def load_scan(path: str | Path, *, memory_limit: float = DEFAULT_READ_LIMIT) -> Scan:
    """Load a NIfTI volume or a 2-D picture.

    Parameters
    ----------
    path : str or Path
        A ``.nii``, ``.nii.gz``, ``.png``, ``.tif``/``.tiff``, ``.jpg``/``.jpeg`` or ``.bmp`` file.
    memory_limit : float
        Bytes the data of a compressed NIfTI may take in memory (default 3 GB); a header that
        claims more is refused before anything is allocated. An uncompressed ``.nii`` is
        memory-mapped and only checked against its file size.

    Returns
    -------
    Scan
        ``data`` is (X, Y, Z) or (X, Y) for NIfTI, (rows, cols) for pictures.

    Raises
    ------
    InputError
        The file is missing, not a regular file, unreadable, of an unsupported type, truncated
        or corrupt (a gzip stream whose CRC or length check fails included), claims more data
        than it can hold or than ``memory_limit``, holds an unsupported data type or values
        beyond 1e20, is a 4-D series with several volumes, 1-D, or a multi-page TIFF stack.

    Warns
    -----
    DataWarning
        An RGB(A) picture was converted to luminance.

    Notes
    -----
    NIfTI scaling (``scl_slope``/``scl_inter``) is applied as ``get_fdata`` would; the result is
    float32 unless every value is an integer, in which case the smallest integer dtype holding the
    range is used.  Without scaling the on-disk dtype is kept.  A 4-D file with one volume is
    squeezed to 3-D.  Compressed files are read eagerly so that truncation is detected here.
    """
    path = Path(path)
    ext = _check_readable_file(path)
    try:
        if ext in _NIFTI_EXTENSIONS:
            return _load_nifti(path, compressed=ext == ".nii.gz", memory_limit=memory_limit)
        return _load_picture(path, tiff=ext in _TIFF_EXTENSIONS)
    except PermissionError as exc:
        raise InputError(path, "cannot read: permission denied") from exc


def _load_nifti(path: Path, *, compressed: bool, memory_limit: float) -> Scan:
    """Read a NIfTI-1/-2 file into a :class:`Scan` (see :func:`load_scan`)."""

    def check_shape(shape: tuple[int, ...]) -> None:
        if math.prod(shape[3:]) > 1:  # several volumes: refused before any read
            _squeeze_volumes(path, _Shape(shape))
        _check_not_1d(path, shape[:3])

    img, data = read_nifti(path, memory_limit=memory_limit, check_shape=check_shape)
    data = _squeeze_volumes(path, data)
    _check_not_1d(path, data.shape)
    _reading.check_intensity_range(path, data)
    header = _checked_units(path, img.header)
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = _reading.check_geometry(path, affine, header.get_zooms()[: data.ndim], data.shape)
    return Scan(
        path=path,
        kind="nifti",
        data=data,
        affine=affine,
        header=header,
        zooms=zooms,
    )


def read_nifti(
    path: str | Path,
    *,
    memory_limit: float = DEFAULT_READ_LIMIT,
    check_shape: Callable[[tuple[int, ...]], None] | None = None,
):
    """Read a NIfTI-1/-2 file defensively: ``(image, data)`` with the scaling applied.

    Nothing the header claims is allocated before :mod:`segment._reading` has checked it
    against the file and ``memory_limit``; compressed data are read by
    :func:`segment._reading.read_gzip_data`, which verifies the whole gzip stream; an
    uncompressed file is memory-mapped. ``check_shape(shape)`` may refuse the header's shape
    before the data are read. Every problem is an :class:`InputError` naming the file.
    """
    path = Path(path)
    with _nibabel_quiet():
        try:
            img = nib.load(path, mmap=True)
        except PermissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad header
            raise InputError(path, f"cannot read NIfTI header: {_short_reason(exc)}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI-1/-2 image (nibabel read a {type(img).__name__})")
    proxy = img.dataobj
    layout = _reading.nifti_layout(path, img.header, proxy)
    if check_shape is not None:
        check_shape(layout.shape)
    compressed = path.name.lower().endswith(".gz")
    _reading.check_layout(
        path, layout, file_size=path.stat().st_size, compressed=compressed,
        memory_limit=memory_limit,
    )  # fmt: skip
    if compressed:
        raw = _reading.read_gzip_data(path, layout)
    else:
        try:
            with _nibabel_quiet():
                raw = proxy.get_unscaled()
        except PermissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes nibabel raise
            raise InputError(path, f"cannot read NIfTI data: {_short_reason(exc)}") from exc
    try:
        slope, inter = float(proxy.slope), float(proxy.inter)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(path, f"cannot read NIfTI scaling: {_short_reason(exc)}") from exc
    with np.errstate(over="ignore", invalid="ignore"):
        return img, _apply_scaling(raw, slope, inter)


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Keep nibabel's header-fixing reports (its ``nibabel.global`` logger) off stderr.

    What they report is either harmless or becomes the one-line :class:`InputError` that
    follows; with ``SEGMENT_DEBUG`` set (``segment --debug``) they are shown.
    """
    import logging

    if os.environ.get("SEGMENT_DEBUG"):
        yield
        return
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Shape:
    """Just enough of an array (``ndim``, ``shape``) for the shape checks."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.ndim = tuple(shape), len(shape)


def _checked_units(path: Path, header):
    """``header``, or a copy with ``xyzt_units`` reset when its code is not a NIfTI unit."""
    try:
        header.get_xyzt_units()
        return header
    except Exception:  # noqa: BLE001 - nibabel raises KeyError for an unknown code
        code = int(header["xyzt_units"])
        header = header.copy()
        header["xyzt_units"] = 0
        warnings.warn(
            f"{path}: unknown xyzt_units code {code} in the header; units left unknown "
            "(voxel sizes taken as mm)",
            DataWarning,
            stacklevel=4,
        )
        return header


def _apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Apply NIfTI scaling ``raw * slope + inter``; return ``raw`` untouched when there is none.

    Parameters
    ----------
    raw : array
        On-disk values (possibly a memmap).
    slope, inter : float
        Scale factors as nibabel's array proxy normalises them (1 and 0 when absent).

    Returns
    -------
    array
        ``raw`` itself without scaling; otherwise float32, or the smallest integer dtype holding
        the range when every scaled value is an integer.
    """
    if slope == 1.0 and inter == 0.0:
        return raw
    # Integers up to 16 bits are exact in float32; anything wider is computed in float64.
    small_int = raw.dtype.kind in "biu" and raw.dtype.itemsize <= 2
    work = np.float32 if small_int else np.float64
    scaled = np.array(raw, dtype=work)  # always a copy: never write into a memmap
    scaled *= work(slope)
    scaled += work(inter)
    finite = np.isfinite(scaled)
    if scaled.size and finite.all() and np.array_equal(scaled, np.round(scaled)):
        lo, hi = int(scaled.min()), int(scaled.max())
        int_dtype = np.result_type(np.min_scalar_type(lo), np.min_scalar_type(hi))
        if int_dtype.kind in "iu":
            return scaled.astype(int_dtype)
    return scaled.astype(np.float32, copy=False)


def _squeeze_volumes(path: Path, data: np.ndarray) -> np.ndarray:
    """Drop axes beyond the third when they hold a single volume; refuse several volumes."""
    if data.ndim <= 3:
        return data
    n_volumes = int(np.prod(data.shape[3:]))
    if n_volumes > 1:
        raise InputError(
            path,
            f"{data.ndim}-D image with {n_volumes} volumes; segment one volume at a time "
            "(e.g. fslroi in.nii.gz vol0.nii.gz 0 1, or nibabel slicing img.slicer[..., 0])",
        )
    # Basic indexing keeps a memmap a memmap (no copy).
    return data[(Ellipsis,) + (0,) * (data.ndim - 3)]


def _check_not_1d(path: Path, shape: tuple[int, ...]) -> None:
    """Refuse data with fewer than two spatial axes longer than one voxel."""
    if sum(1 for s in shape if s > 1) < 2:
        raise InputError(
            path,
            f"1-D data (shape {tuple(shape)}); segment needs a 2-D image or a 3-D volume",
        )


def _load_picture(path: Path, *, tiff: bool) -> Scan:
    """Read a 2-D picture into a :class:`Scan` (see :func:`load_scan`)."""
    try:
        array = _read_tiff(path) if tiff else _read_picture(path)
    except (InputError, PermissionError):
        raise
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read image: {_short_reason(exc)}") from exc
    data = _to_grey(path, np.asarray(array))
    _check_not_1d(path, data.shape)
    return Scan(
        path=path,
        kind="image",
        data=data,
        affine=np.eye(4),
        header=None,
        zooms=(1.0, 1.0),
    )


def _read_picture(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/BMP with scikit-image (imageio + Pillow)."""
    import skimage.io

    return skimage.io.imread(path)


def _read_tiff(path: Path) -> np.ndarray:
    """Read a single-page TIFF with tifffile; refuse multi-page stacks and 3-D series."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            if n_pages > 1:
                raise InputError(
                    path,
                    f"multi-page TIFF with {n_pages} pages; only 2-D images are supported "
                    "(save one page per file, or convert the stack to NIfTI)",
                )
            page = tif.pages[0]
            array = page.asarray()
            samples = int(getattr(page, "samplesperpixel", 1))
    except tifffile.TiffFileError as exc:
        raise InputError(path, f"cannot read image: {_short_reason(exc)}") from exc
    if array.ndim == 3 and samples == 1:
        raise InputError(
            path,
            f"3-D TIFF (shape {array.shape}); only 2-D images are supported "
            "(convert the volume to NIfTI)",
        )
    return array


def _to_grey(path: Path, array: np.ndarray) -> np.ndarray:
    """Return (rows, cols) intensities; RGB(A) becomes float32 luminance with a DataWarning."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        kind = "RGB" if array.shape[-1] == 3 else "RGBA"
        extra = "" if kind == "RGB" else " (alpha channel dropped)"
        warnings.warn(
            f"{path}: RGB image converted to luminance (0.2125 R + 0.7154 G + 0.0721 B){extra}",
            DataWarning,
            stacklevel=4,
        )
        return array[..., :3].astype(np.float32) @ _LUMINANCE
    if array.ndim == 3 and array.shape[-1] == 2:
        warnings.warn(
            f"{path}: grey + alpha image; alpha channel dropped", DataWarning, stacklevel=4
        )
        return array[..., 0]
    raise InputError(
        path,
        f"image of shape {array.shape} is not a 2-D grey or RGB(A) picture; only 2-D images "
        "are supported",
    )


def check_same_grid(reference: Scan, other: Scan, what: str = "channel") -> None:
    """Check that ``other`` lies on the same voxel grid as ``reference``.

    Parameters
    ----------
    reference, other : Scan
        Shapes must be equal and affines equal within ``numpy.allclose`` tolerance.
    what : str
        What ``other`` is (``"channel"``, ``"mask"``...), used in the message.

    Raises
    ------
    InputError
        On ``other.path``, printing both shapes and both affines.
    """
    same_shape = other.shape == reference.shape
    if same_shape and np.allclose(other.affine, reference.affine, rtol=1e-5, atol=1e-5):
        return
    raise InputError(
        other.path,
        f"{what} grid does not match {reference.path.name}: shape {other.shape} vs "
        f"{reference.shape}, affine {_format_affine(other.affine)} vs "
        f"{_format_affine(reference.affine)}; resample the {what} onto the reference grid "
        "(e.g. nilearn.image.resample_to_img or FSL flirt -applyxfm)",
    )


def _format_affine(affine: np.ndarray) -> str:
    """Affine on one line, e.g. ``[[2, 0, 0, -90], ...]``."""
    rows = ("[" + ", ".join(f"{v:.4g}" for v in row) + "]" for row in np.asarray(affine))
    return "[" + ", ".join(rows) + "]"
