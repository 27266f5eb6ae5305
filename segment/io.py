"""Read scans and write segmentation outputs on the input grid.

One :class:`Scan` dataclass carries what the rest of the package needs from an input file: the
spatial data array, the voxel-to-world affine, the header and the voxel size.  NIfTI-1/-2 files
are read with nibabel (uncompressed ``.nii`` lazily, as a memory map); 2-D pictures (PNG, TIFF,
JPEG, BMP) with scikit-image / tifffile.

Outputs are written the way nilearn's ``new_img_like`` does: the header of the input is copied so
the grid (shape, affine, sform/qform and their codes, zooms, units) is kept, the data type is set
explicitly, stale scaling is reset and ``cal_min``/``cal_max`` describe the new data.  Every write
goes through :func:`atomic_write`, and gzip streams are written with ``mtime=0`` so identical
results give identical bytes.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import shutil
import struct
import uuid
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from segment import _reading
from segment.exceptions import DataWarning, InputError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Scan",
    "StagedWrites",
    "atomic_write",
    "check_same_grid",
    "is_supported",
    "load_scan",
    "read_nifti",
    "scan_stem",
    "write_labels",
    "write_nifti",
    "write_nifti_slabs",
    "write_nifti_volumes",
    "write_probabilities",
    "folder_lock",
    "remove_stale_temporaries",
]

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
#: gzip level of .nii.gz outputs. Level 1 writes probability maps about 3x faster than
#: level 6 for files about 10 % larger; nibabel's own default is also 1.
DEFAULT_COMPRESSLEVEL = 1
#: How our gzip members choose their zlib strategy: a few samples of each member are
#: compressed both with the default strategy and with ``Z_RLE`` (matches of runs only), and
#: the member gets ``Z_RLE`` unless that is more than 10 % larger (the trade-off of level 1
#: over 6: a file up to 10 % larger for about twice the speed). On float32 maps whose
#: mantissas rarely repeat (an MRF posterior, a plain fit of a float scan, a bias field), the
#: default strategy spends its time searching for matches it does not find: ``Z_RLE``
#: compresses them 2-2.5x faster into files about as small (0.379 vs 0.394 of the raw size on
#: the MRF posterior of the 8x head; a bias field 5 % larger, 1.9x faster). On a plain fit of
#: an integer scan, whose probabilities repeat with each intensity, only the default strategy
#: finds the repeats (0.337 vs 0.905).
#: Either way the output is ordinary deflate data that every gzip reader reads.
STRATEGY_SAMPLES = (3, 16384)
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _temporary_path(path: Path, token: str | None = None) -> Path:
    """Hidden temporary name next to ``path`` keeping its (image) extension."""
    ext = _matched_extension(path) or path.suffix
    stem = path.name[: -len(ext)] if ext else path.name
    token = token or _temporary_token()
    return path.with_name(f".{stem}.tmp-{token}{ext}")


def _temporary_token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


#: Names of our temporary files: ``.<name>.tmp-<pid>-<8 hex digits>[<ext>]``.
TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}")


def remove_stale_temporaries(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove the temporary files (``.<name>.tmp-<pid>-<token>``) of dead writers under ``root``.

    A writer is dead when its process no longer runs on this machine or is a zombie (killed,
    not yet reaped by its parent); files of live writers, such as another batch writing
    into the same folder, are left alone. Returns the files removed.
    """
    removed = []
    for folder, dirs, files in os.walk(root):
        if not recursive:
            dirs.clear()
        for name in files:
            match = TEMPORARY_NAME.match(name)
            if match and not pid_alive(int(match[1])):
                path = Path(folder) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine and is not a zombie."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**22  # exists but not ours, or an impossible pid
    try:  # a zombie has exited: only its exit status is left for its parent to collect
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write a file atomically.

    Yields a temporary path in the same folder (``.<stem>.tmp-<pid>-<token><ext>``, so writers
    that look at the extension still work).  When the block succeeds the temporary file replaces
    ``path`` with ``os.replace``; on any exception, including ``KeyboardInterrupt``, the temporary
    file is removed and the exception re-raised, leaving ``path`` untouched.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


class StagedWrites:
    """Several files written under temporary names, then moved into place together.

    :meth:`path` gives the temporary name to write a final file under (hidden, in the same
    folder, with the same extension). :meth:`commit` moves every staged file into place in
    the order staged; the last one staged is the set's commit record (the sidecar): an old
    record is retired (renamed aside) before anything else is replaced and the new one moved
    into place last, like a database's commit record. Whatever the moment a process is
    killed, the folder holds the complete old set, the complete new set, or files without a
    record, which every reader takes as incomplete (never old and new files that look
    complete). An existing file is first renamed aside, and the set of files this call
    replaced is put back if a rename fails or is interrupted (Ctrl-C). :meth:`discard`
    removes what is still staged. Files renamed aside by a killed process are hidden
    temporary files, removed by the next run (:func:`remove_stale_temporaries`).

    The commit of the files of one folder holds an exclusive advisory lock on the folder
    (``flock``), so that two processes replacing the same set take turns.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> staged = StagedWrites()
    >>> _ = staged.path(folder / "a.txt").write_text("a")
    >>> _ = staged.path(folder / "b.txt").write_text("b")
    >>> sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    []
    >>> staged.commit()
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt', 'b.txt']
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self._tokens: list[str] = []

    def path(self, final: str | Path) -> Path:
        """The temporary path to write ``final`` under."""
        kill_point(f"stage-{len(self._staged)}")
        final, token = Path(final), _temporary_token()
        temporary = _temporary_path(final, token)
        self._staged.append((temporary, final))
        self._tokens.append(token)
        return temporary

    def final_name(self, name: str | Path) -> str:
        """``name`` with a staged temporary path (or a temporary file of one) replaced by its
        final path, so that an error names the file the user asked for."""
        text = str(name)
        for (_, final), token in zip(self._staged, self._tokens):
            if Path(text).parent == final.parent and f".tmp-{token}" in Path(text).name:
                return str(final)
        return text

    def commit(self) -> None:
        """Move the staged files into place, in order; all of them or, on failure, none."""
        moved: list[tuple[Path, Path | None]] = []  # (final, old file renamed aside)
        folders = sorted({final.parent for _, final in self._staged})
        try:
            with ExitStack() as locks:
                for folder in folders:
                    locks.enter_context(folder_lock(folder))
                if self._staged:  # retire the old commit record first
                    record = self._staged[-1][1]
                    aside = _temporary_path(record) if record.exists() else None
                    moved.append((record, aside))
                    if aside is not None:
                        os.replace(record, aside)
                    kill_point("commit-retired")
                for index, (temporary, final) in enumerate(self._staged):
                    if index < len(self._staged) - 1:
                        aside = _temporary_path(final) if final.exists() else None
                        moved.append((final, aside))  # before the renames: an interrupt
                        if aside is not None:  # may come between
                            os.replace(final, aside)
                    os.replace(temporary, final)
                    kill_point(f"commit-{index}")
        except BaseException:
            for final, aside in reversed(moved):  # put the old files back
                with suppress(OSError):
                    if aside is not None:
                        os.replace(aside, final)
                    else:
                        final.unlink()
            self.discard()
            raise
        for _, aside in moved:
            if aside is not None:
                with suppress(OSError):
                    aside.unlink()
        self._staged.clear()
        self._tokens.clear()

    def discard(self) -> None:
        """Remove the files still staged (those written so far)."""
        for temporary, _ in self._staged:
            with suppress(OSError):
                temporary.unlink()
        self._staged.clear()
        self._tokens.clear()


@contextmanager
def folder_lock(folder: str | Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on ``folder`` itself (no lock file).

    Yields True when the lock is held; with ``blocking=False``, False when another process
    holds it. Where the file system has no ``flock`` (some network file systems), yields True
    without a lock.
    """
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        except OSError:  # no flock here
            held = True
        yield held
    finally:
        os.close(fd)  # releases the lock


def kill_point(name: str) -> None:
    """Test hook: ``SIGKILL`` this process when ``SEGMENT_KILL_AT`` names this point.

    The reliability tests kill a run at a chosen moment of writing its outputs (``stage-<i>``
    before the i-th output is written, ``commit-retired`` after the old sidecar is retired,
    ``commit-<i>`` after the i-th rename, ``summary-<n>`` after the n-th batch summary)
    instead of after a guessed sleep. Unset, this costs one dictionary lookup.

    ``SEGMENT_KILL_ONCE=<file>`` kills only the first process to reach the point (the one
    that creates ``<file>``), e.g. one worker of a cluster; ``SEGMENT_KILL_PID=<pid>`` kills
    that process instead of this one (e.g. the dask scheduler).
    """
    if os.environ.get("SEGMENT_KILL_AT") != name:
        return
    import signal

    once = os.environ.get("SEGMENT_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(int(os.environ.get("SEGMENT_KILL_PID") or os.getpid()), signal.SIGKILL)


def write_nifti(img, path: str | Path, *, compresslevel: int = DEFAULT_COMPRESSLEVEL) -> Path:
    """Save a nibabel NIfTI image atomically; ``.gz`` paths get a deterministic gzip stream.

    Parameters
    ----------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
    path : str or Path
        ``.nii`` or ``.nii.gz``.
    compresslevel : int
        gzip level 0-9 for ``.nii.gz``.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    The gzip header carries ``mtime=0`` and no file name, so equal images give equal bytes.
    """
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
            ) as stream:
                img.to_stream(stream)
        else:
            img.to_stream(raw)
    return path


def _nifti_like(
    data: np.ndarray,
    reference: Scan,
    *,
    cal: tuple[float, float],
    components_last: bool,
    intent: str = "none",
):
    """Build a NIfTI image of ``data`` on ``reference``'s grid (nilearn ``new_img_like`` style).

    The reference header is copied (sform/qform and codes, zooms, spatial units kept), the data
    dtype is set to ``data.dtype``, scaling is reset and ``cal_min``/``cal_max`` set to ``cal``.
    Axes of ``data`` beyond the reference's spatial axes get a voxel size of 1
    (``components_last``: the last axis holds components, not space). What described the input
    and not the output is reset: the intent (``intent``: ``"label"`` for a label map, else none),
    the time unit (no output is a time series) and the description.
    """
    ref_header = reference.header
    if isinstance(ref_header, nib.Nifti2Header):
        klass = nib.Nifti2Image
    else:
        klass = nib.Nifti1Image
    header = ref_header.copy() if isinstance(ref_header, nib.Nifti1Header) else None
    img = klass(data, reference.affine, header=header)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    # Spatial voxel sizes come from the copied header; an added 3rd axis (2-D grid) keeps its
    # pixdim when valid, and the components axis gets a voxel size of 1.
    zooms = list(hdr.get_zooms())
    for axis in range(len(reference.zooms), data.ndim):
        last = components_last and axis == data.ndim - 1
        zooms[axis] = 1.0 if last or not zooms[axis] > 0 else zooms[axis]
    hdr.set_zooms(zooms)
    hdr["scl_slope"] = np.nan
    hdr["scl_inter"] = np.nan
    hdr["cal_min"], hdr["cal_max"] = cal
    hdr.set_intent(intent)
    hdr.set_xyzt_units(xyz=hdr.get_xyzt_units()[0], t="unknown")
    hdr["descrip"] = b"segment"
    if header is None:
        # A 2-D picture written as NIfTI: mark the identity grid as the scanner grid.
        img.set_sform(reference.affine, code="scanner")
        img.set_qform(reference.affine, code="scanner")
    return img


def _output_format(path: Path, allowed: tuple[str, ...], what: str) -> str:
    """Return the extension of ``path`` if it is one of ``allowed``; else raise ValueError."""
    ext = _matched_extension(path)
    if ext not in allowed:
        raise ValueError(
            f"{what} path {path} must end in one of {', '.join(allowed)}; "
            f"got {''.join(path.suffixes) or '(no extension)'!r}"
        )
    return ext


def write_labels(
    labels: np.ndarray,
    reference: Scan,
    path: str | Path,
    *,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> Path:
    """Write a label map on the grid of ``reference``.

    Parameters
    ----------
    labels : array of reference.shape, integers 0..255
        0 = background / outside the mask, 1..K = tissue classes.
    reference : Scan
        The segmented input; its header and affine are reused for NIfTI output.
    path : str or Path
        ``.nii.gz``/``.nii`` (uint8 NIfTI, ``cal_min`` 0, ``cal_max`` the largest label), or
        ``.png``/``.bmp``/``.tif``/``.tiff`` for 2-D labels (8-bit, labels are the pixel values).
    compresslevel : int
        gzip level for ``.nii.gz``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    labels = np.asarray(labels)
    ext = _output_format(
        path, (".nii.gz", ".nii", ".png", ".bmp", ".tif", ".tiff"), "label map output"
    )
    if labels.shape != reference.shape:
        raise ValueError(
            f"labels shape {labels.shape} does not match the scan shape {reference.shape} "
            f"of {reference.path}"
        )
    top = int(labels.max()) if labels.size else 0
    if labels.size and (int(labels.min()) < 0 or top > 255):
        raise ValueError(
            f"labels must be in 0..255 to be written as uint8; got {int(labels.min())}..{top}"
        )
    labels = labels.astype(np.uint8)
    if ext in _NIFTI_EXTENSIONS:
        img = _nifti_like(
            labels, reference, cal=(0.0, float(top)), components_last=False, intent="label"
        )
        return write_nifti_volumes(img.header, [labels], path, compresslevel=compresslevel)
    _check_2d(labels, path, "label map")
    with atomic_write(path) as tmp:
        if ext in _TIFF_EXTENSIONS:
            import tifffile

            tifffile.imwrite(tmp, labels, photometric="minisblack")
        else:
            import skimage.io

            skimage.io.imsave(tmp, labels, check_contrast=False)
    return path


def write_probabilities(
    probabilities: np.ndarray | Sequence[np.ndarray],
    reference: Scan,
    path: str | Path,
    *,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> Path:
    """Write per-component probabilities on the grid of ``reference``.

    Parameters
    ----------
    probabilities : (*reference.shape, K) array, or a sequence of K arrays of reference.shape
        Responsibilities in 0..1, components along the last axis. A sequence (e.g. a
        list-like that computes each volume when indexed) lets a NIfTI be written one
        component volume at a time, without holding all K. A sequence that also has a
        ``slabs(step)`` method (see :func:`write_nifti_slabs`) is written from slabs of all K
        maps at once, in one pass, without holding any whole map.
    reference : Scan
        The segmented input.
    path : str or Path
        ``.nii.gz``/``.nii``: a 4-D float32 NIfTI (X, Y, Z, K) with the input's header, voxel
        size 1 on the fourth axis, ``cal_min``/``cal_max`` 0/1 (a 2-D grid is written as
        (X, Y, 1, K)).  ``.tif``/``.tiff`` (2-D only): a K-page float32 TIFF of shape
        (K, rows, cols), uncompressed.
    compresslevel : int
        gzip level for ``.nii.gz``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    ext = _output_format(path, (".nii.gz", ".nii", ".tif", ".tiff"), "probability output")
    if isinstance(probabilities, np.ndarray):
        if probabilities.ndim != len(reference.shape) + 1 or (
            probabilities.shape[:-1] != reference.shape
        ):
            raise ValueError(
                f"probabilities shape {probabilities.shape} must be the scan shape "
                f"{reference.shape} plus a components axis (K,)"
            )
        volumes = [probabilities[..., k] for k in range(probabilities.shape[-1])]
    else:
        volumes = probabilities
    n_components = len(volumes)
    if ext in _NIFTI_EXTENSIONS:
        shape = reference.shape + (1,) * (3 - len(reference.shape)) + (n_components,)
        template = np.zeros((1,) * len(shape), dtype=np.float32)
        img = _nifti_like(template, reference, cal=(0.0, 1.0), components_last=True)
        img.header.set_data_shape(shape)
        zooms = list(img.header.get_zooms())
        zooms[: len(reference.zooms)] = reference.zooms
        zooms[-1] = 1.0
        img.header.set_zooms(zooms)
        if callable(getattr(volumes, "slabs", None)):
            return write_nifti_slabs(
                img.header, volumes.slabs, path, shape=reference.shape, compresslevel=compresslevel
            )
        return write_nifti_volumes(img.header, volumes, path, compresslevel=compresslevel)
    _check_2d(np.asarray(volumes[0]), path, "probability map")
    import tifffile

    pages = np.stack([np.asarray(v, dtype=np.float32) for v in volumes])
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, pages, photometric="minisblack")
    return path


def write_map(
    data: np.ndarray, reference: Scan, path: str | Path, *,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> Path:  # fmt: skip
    """Write a float32 map (e.g. a bias field) on the grid of ``reference``.

    Parameters
    ----------
    data : array of reference.shape, or reference.shape + (D,) for one map per channel
    reference : Scan
    path : ``.nii.gz``/``.nii`` (float32 NIfTI) or ``.tif``/``.tiff`` (2-D, D pages)
    """
    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == len(reference.shape) + 1:
        return write_probabilities(data, reference, path, compresslevel=compresslevel)
    ext = _output_format(path, (".nii.gz", ".nii", ".tif", ".tiff"), "map output")
    if ext in _NIFTI_EXTENSIONS:
        finite = np.isfinite(data)  # the range without a copy of the values
        cal = (
            (float(data.min(where=finite, initial=np.inf)),
             float(data.max(where=finite, initial=-np.inf)))
            if finite.any() else (0.0, 0.0)
        )  # fmt: skip
        del finite
        img = _nifti_like(data, reference, cal=cal, components_last=False)
        if data.ndim == 3:  # gzip members compressed in parallel, as for the probabilities
            return write_nifti_volumes(img.header, [data], path, compresslevel=compresslevel)
        return write_nifti(img, path, compresslevel=compresslevel)
    _check_2d(data, path, "map")
    import tifffile

    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, data, photometric="minisblack")
    return path


def write_map_slabs(
    slabs: Callable[[int], Iterable[Sequence[np.ndarray]]],
    reference: Scan,
    path: str | Path,
    *,
    cal: tuple[float, float],
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> Path:
    """:func:`write_map` of a 3-D float32 map given by slabs along its last axis.

    ``slabs(step)`` yields ``[slab]`` for ``start = 0, step, ...`` (see
    :func:`write_nifti_slabs`); ``cal`` is the map's range. Same file, no whole map in memory.
    """
    img = _nifti_like(
        np.zeros((1,) * len(reference.shape), np.float32), reference, cal=cal,
        components_last=False,
    )  # fmt: skip
    img.header.set_data_shape(reference.shape)
    return write_nifti_slabs(
        img.header, slabs, path, shape=reference.shape, compresslevel=compresslevel, n_volumes=1
    )


#: Bytes of one volume per gzip member of a 4-D ``.nii.gz`` (whole slices along the last
#: spatial axis). Both 4-D writers cut at the same places, so equal maps give equal bytes.
#: :func:`write_nifti_slabs` holds about three slabs of all volumes at once (K = 6: ~75 MB);
#: members of 4 MB compress as fast and as well as larger ones.
SLAB_BYTES = 4 << 20


def slab_step(shape: Sequence[int], dtype) -> int:
    """Slices along the last axis of ``shape`` in one slab of about :data:`SLAB_BYTES`."""
    per_slice = max(1, int(np.prod(shape[:-1], dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, SLAB_BYTES // per_slice)


def _fortran_bytes(part: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous array whose buffer is ``part`` in NIfTI (Fortran) order (no copy if F)."""
    return np.asfortranarray(np.asarray(part, dtype=dtype)).T


def _gzip_member(data, level: int) -> bytes:
    """``data`` (bytes or a C-contiguous array) as one complete gzip member, mtime 0."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 31, 8, _strategy(data, level))  # 31: gzip
    return packer.compress(data) + packer.flush()


def _strategy(data, level: int) -> int:
    """``Z_RLE`` unless the default strategy is clearly smaller on samples of ``data``."""
    raw = memoryview(data).cast("B")
    count, size = STRATEGY_SAMPLES
    if level == 0 or len(raw) <= count * size:
        return zlib.Z_DEFAULT_STRATEGY
    stride = (len(raw) - size) // (count - 1)
    sample = b"".join(raw[i * stride : i * stride + size] for i in range(count))

    def compressed(strategy):
        packer = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy)
        return len(packer.compress(sample) + packer.flush())

    rle = compressed(zlib.Z_RLE)
    return zlib.Z_RLE if rle <= 1.10 * compressed(zlib.Z_DEFAULT_STRATEGY) else (
        zlib.Z_DEFAULT_STRATEGY)  # fmt: skip


def _nifti_head(header) -> bytes:
    """Header, extensions and padding up to ``vox_offset``."""
    import io as _io

    head = _io.BytesIO()
    header.write_to(head)
    head.write(b"\0" * (int(header["vox_offset"]) - head.tell()))
    return head.getvalue()


def write_nifti_volumes(
    header,
    volumes: Sequence[np.ndarray],
    path: str | Path,
    *,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    n_threads: int | None = None,
) -> Path:
    """Write a 4-D NIfTI one 3-D volume at a time, atomically.

    For ``.nii.gz`` each volume is cut into slabs of about :data:`SLAB_BYTES`, each compressed
    as its own gzip member in parallel threads (zlib releases the GIL); a multi-member gzip file
    is a valid gzip file that nibabel, FSL, ITK and AFNI read as one stream. One volume and
    ``n_threads + 1`` slabs are in memory at once.

    Parameters
    ----------
    header : nibabel.Nifti1Header or Nifti2Header
        Header of the whole image (shape, dtype, geometry already set).
    volumes : sequence of arrays
        The volumes along the last axis, each of the spatial shape; indexed in order.
    path : str or Path
    compresslevel : int
        gzip level (1 is ~3x faster than 6 for ~10 % larger files of probabilities).
    n_threads : int, optional
        Compression threads (default: number of cores).

    See Also
    --------
    write_nifti_slabs : the same file from slabs of all volumes at once.
    """
    dtype = header.get_data_dtype()

    def members():
        for index in range(len(volumes)):
            volume = np.asarray(volumes[index], dtype=dtype)
            step = slab_step(volume.shape, dtype)
            for start in range(0, volume.shape[-1], step):
                yield 0, _fortran_bytes(volume[..., start : start + step], dtype)
            del volume

    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as stream:
        if not path.name.lower().endswith(".gz"):
            stream.write(_nifti_head(header))
            for _, data in members():
                stream.write(data)
            return path
        _write_members([stream], _nifti_head(header), members(), compresslevel, n_threads, 0)
    return path


def write_nifti_slabs(
    header,
    slabs: Callable[[int], Iterable[Sequence[np.ndarray]]],
    path: str | Path,
    *,
    shape: Sequence[int],
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
    n_threads: int | None = None,
    n_volumes: int | None = None,
) -> Path:
    """Write a 4-D NIfTI from slabs that hold all its volumes at once, atomically.

    For volumes computed together (e.g. the K probability maps of one E-step) this needs one
    pass over the data and a few slabs of memory, where :func:`write_nifti_volumes` needs one
    whole volume at a time (and K passes if each volume must be recomputed).

    Parameters
    ----------
    header : nibabel.Nifti1Header or Nifti2Header
        Header of the whole image (shape, dtype, geometry already set).
    slabs : callable
        ``slabs(step)`` yields, for ``start = 0, step, 2 * step, ...`` along the last axis of
        ``shape``, a sequence of the V volumes' slabs, each of shape
        ``(*shape[:-1], min(step, shape[-1] - start))``.
    path : str or Path
        ``.nii.gz`` or ``.nii``.
    shape : sequence of int
        Spatial shape of one volume (its last axis is the one cut into slabs).
    compresslevel, n_threads :
        As in :func:`write_nifti_volumes`.
    n_volumes : int, optional
        Volumes per slab (default: the header's last dimension); 1 for a 3-D image.

    Notes
    -----
    The file holds all of volume 0, then all of volume 1, and so on, but each slab holds a
    piece of every volume. ``.nii``: each piece is written at its offset. ``.nii.gz``: each
    piece is compressed as its own gzip member (the members of :func:`write_nifti_volumes`,
    so the bytes are the same); volume 0's members go to the output, the other volumes' to
    hidden spill files next to it (one per volume, about its compressed size), which are
    appended in order at the end (``os.copy_file_range``, no copy through Python) and
    removed, also on error or Ctrl-C. While the next slab is computed, at most one slab of
    all volumes waits to be compressed.
    """
    path = Path(path)
    dtype = np.dtype(header.get_data_dtype())
    n_volumes = int(header.get_data_shape()[-1]) if n_volumes is None else n_volumes
    step = slab_step(shape, dtype)
    spatial_shape = tuple(int(n) for n in shape)

    def members():
        for index, parts in enumerate(slabs(step)):
            start = index * step
            expected = spatial_shape[:-1] + (min(step, spatial_shape[-1] - start),)
            if len(parts) != n_volumes or any(np.shape(p) != expected for p in parts):
                raise ValueError(
                    f"slab {index} must be {n_volumes} arrays of shape {expected}; got "
                    f"{[np.shape(p) for p in parts]}"
                )
            for volume, part in enumerate(parts):
                yield volume, _fortran_bytes(part, dtype)
            parts = part = None  # let compressed slabs go while the next one is computed

    head = _nifti_head(header)
    with atomic_write(path) as tmp:
        if not path.name.lower().endswith(".gz"):
            volume_bytes = int(np.prod(spatial_shape, dtype=np.int64)) * dtype.itemsize
            offsets = [len(head) + v * volume_bytes for v in range(n_volumes)]
            with open(tmp, "wb") as stream:
                stream.write(head)
                for volume, data in members():
                    stream.seek(offsets[volume])
                    stream.write(data)
                    offsets[volume] += data.nbytes
            return path
        spills = [tmp.with_name(f"{tmp.name}.{v}") for v in range(1, n_volumes)]
        try:
            with ExitStack() as files:
                streams = [files.enter_context(open(p, "wb")) for p in [tmp, *spills]]
                _write_members(streams, head, members(), compresslevel, n_threads, n_volumes)
                for spill, stream in zip(spills, streams[1:]):
                    stream.close()
                    _append_file(streams[0], spill)
        finally:
            for spill in spills:
                with suppress(OSError):
                    spill.unlink()
    return path


def _write_members(streams, head, members, compresslevel, n_threads, backlog) -> None:
    """Write ``head`` and the ``(stream index, data)`` items as gzip members to ``streams``.

    Compressed in ``n_threads`` threads, at most ``n_threads + backlog`` items in flight;
    each stream gets its members in the order ``members`` produced them (``head`` to
    ``streams[0]`` first).
    """
    from concurrent.futures import ThreadPoolExecutor

    n_threads = n_threads or os.cpu_count() or 1
    pending: deque = deque()
    with ThreadPoolExecutor(n_threads) as pool:
        try:
            pending.append((0, pool.submit(_gzip_member, head, compresslevel)))
            for index, data in members:
                pending.append((index, pool.submit(_gzip_member, data, compresslevel)))
                del data
                while len(pending) > n_threads + backlog:
                    index, future = pending.popleft()
                    streams[index].write(future.result())
            while pending:
                index, future = pending.popleft()
                streams[index].write(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _append_file(stream, source: Path) -> None:
    """Append the file ``source`` to the open binary ``stream`` (in the kernel where possible)."""
    stream.flush()
    with open(source, "rb") as src:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), stream.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except (AttributeError, OSError) as error:  # no copy_file_range here: copy in Python
            if isinstance(error, OSError) and error.errno not in _NO_COPY_RANGE:
                raise
        if remaining > 0:
            src.seek(-remaining, os.SEEK_END)
            stream.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, stream, 1 << 20)


#: copy_file_range errors that mean "not supported here", not a failed write.
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)


def _check_2d(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse to write a volume into a 2-D picture format."""
    if array.ndim != 2:
        raise ValueError(
            f"cannot write a {array.ndim}-D {what} to {path.name}; use a .nii.gz path for volumes"
        )
