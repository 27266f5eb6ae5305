"""Defensive reading of input files: nothing a file claims is allocated before it is checked.

A NIfTI header is a promise about the data that follows it. These helpers check the promise
against the file before :mod:`segment.io` allocates anything: the data type must be one we
read, the shape must be positive and hold one volume, ``vox_offset`` must lie inside the file,
and the claimed bytes must fit in the file (uncompressed), in what deflate can expand the file
to (compressed, at most :data:`DEFLATE_MAX_RATIO` times its size) and in the memory limit.
Compressed data are then decompressed in chunks into a buffer whose pages are only committed as
they are written, so a short or lying file is refused after reading what it really holds, and
the gzip stream is read to its end so that the CRC-32 and length of every member are checked
(what ``gzip -t`` checks).
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .exceptions import InputError

__all__ = [
    "DEFLATE_MAX_RATIO",
    "DataLayout",
    "check_regular_file",
    "check_layout",
    "nifti_layout",
    "read_gzip_data",
]

#: Deflate never expands data by more than 1032:1 (a run of one byte costs at least two bits
#: per 258 bytes); a file that claims more than this many times its size is lying or truncated.
DEFLATE_MAX_RATIO = 1032
#: Bytes decompressed per read.
READ_CHUNK = 4 << 20
#: Largest finite intensity the model handles: its squares and sums stay well inside float64.
MAX_ABS_INTENSITY = 1e20

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class DataLayout:
    """Where the data of a NIfTI file are and how much memory they claim.

    Attributes
    ----------
    shape : tuple of int
        Array shape from the header (``dim[1:dim[0]+1]``).
    dtype : numpy.dtype
        On-disk data type, with its byte order.
    offset : int
        ``vox_offset``: bytes before the data (of the decompressed stream for ``.nii.gz``).
    nbytes : int
        Bytes the data claim (Python integer: no overflow).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


def check_regular_file(path: Path) -> os.stat_result:
    """Refuse a folder, FIFO, device or socket (following symbolic links) by name.

    Raises
    ------
    InputError
        ``path`` is not a regular file.
    """
    info = path.stat()
    for test, kind in _FILE_KINDS:
        if test(info.st_mode):
            raise InputError(path, f"is {kind}, not a regular file; give an image file")
    return info


def nifti_layout(path: Path, header, proxy) -> DataLayout:
    """The :class:`DataLayout` of a NIfTI image, refusing headers that cannot describe data.

    Parameters
    ----------
    path : Path
        For the messages.
    header : nibabel.Nifti1Header or Nifti2Header
    proxy : nibabel.arrayproxy.ArrayProxy
        ``img.dataobj`` (only its attributes are read, never its data).

    Raises
    ------
    InputError
        An unsupported data type, a dimension < 1, ``vox_offset`` before the end of the header.
    """
    try:
        dtype = np.dtype(header.get_data_dtype())
        shape = tuple(int(n) for n in proxy.shape)
        offset = int(proxy.offset)
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds for a bad header
        raise InputError(path, f"cannot read NIfTI header: {_reason(error)}") from None
    if dtype.kind not in "biuf" or dtype.itemsize == 0:
        code = int(header["datatype"])
        raise InputError(
            path,
            f"NIfTI data type {dtype} (datatype code {code}) is not supported; segment reads "
            "integer and float images (convert it, e.g. fslmaths in out -odt float)",
        )
    if not shape or min(shape) < 1:
        raise InputError(path, f"NIfTI header has dimensions {shape}; each must be >= 1")
    header_end = int(header["sizeof_hdr"])
    if offset < header_end:
        raise InputError(
            path, f"NIfTI vox_offset {offset} lies inside the {header_end}-byte header"
        )
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    return DataLayout(shape, dtype, offset, nbytes)


def check_layout(
    path: Path, layout: DataLayout, *, file_size: int, compressed: bool, memory_limit: float
) -> None:
    """Refuse data that cannot be in the file or would not fit in ``memory_limit`` bytes.

    An uncompressed file must hold ``offset + nbytes`` bytes; a compressed one cannot expand
    to more than :data:`DEFLATE_MAX_RATIO` times its size, and its data are read into memory,
    so they must also fit in ``memory_limit`` (an uncompressed file is memory-mapped).
    """
    needed = layout.offset + layout.nbytes
    claim = f"shape {layout.shape} {layout.dtype.name} at offset {layout.offset}"
    if not compressed:
        if file_size < needed:
            raise InputError(
                path,
                f"cannot read NIfTI data: file is truncated ({file_size} bytes, header needs "
                f"{needed} for {claim})",
            )
        return
    if needed > DEFLATE_MAX_RATIO * file_size + 1024:
        raise InputError(
            path,
            f"cannot read NIfTI data: the header claims {_size(needed)} ({claim}) but a "
            f"{_size(file_size)} gzip file can hold at most {_size(DEFLATE_MAX_RATIO * file_size)}"
            "; the file is truncated or its header is wrong",
        )
    if layout.nbytes > memory_limit:
        raise InputError(
            path,
            f"the data take {_size(layout.nbytes)} in memory ({claim}), more than the memory "
            f"limit of {_size(memory_limit)}; raise --memory-limit or decompress the file to "
            ".nii (read without loading it into memory)",
        )


def read_gzip_data(path: Path, layout: DataLayout) -> np.ndarray:
    """Decompress the data of a ``.nii.gz`` in chunks and check the whole gzip stream.

    The buffer is allocated empty (its pages are committed only as data arrive), filled
    :data:`READ_CHUNK` bytes at a time, and the stream is then read to its end so that the
    CRC-32 and length recorded in every gzip member are verified.

    Returns
    -------
    ndarray of ``layout.shape`` and ``layout.dtype``, Fortran order (as NIfTI stores it).

    Raises
    ------
    InputError
        The stream ends before the data do, is corrupt, fails its CRC or length check, or has
        trailing garbage.
    """
    _check_gzip_flags(path)
    buffer = np.empty(layout.nbytes, dtype=np.uint8)
    view = memoryview(buffer)
    try:
        with gzip.open(path, "rb") as stream:
            _skip(stream, layout.offset, path, layout)
            filled = 0
            while filled < layout.nbytes:
                count = stream.readinto(view[filled : filled + READ_CHUNK])
                if not count:
                    raise InputError(
                        path,
                        f"cannot read NIfTI data: the gzip stream ends after {filled} of the "
                        f"{layout.nbytes} data bytes (file truncated)",
                    )
                filled += count
            while stream.read(READ_CHUNK):  # to the end: CRC and length of every member
                pass
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(
            path,
            f"cannot read NIfTI data: corrupt gzip stream ({_reason(error)}); the file is "
            "damaged or truncated "
            "(`gzip -t` checks it): copy it again",
        ) from None
    finally:
        view.release()
    return np.ndarray(layout.shape, dtype=layout.dtype, buffer=buffer, order="F")


def _check_gzip_flags(path: Path) -> None:
    """Refuse a gzip member header with reserved flag bits set (RFC 1952: a decompressor must;
    ``gzip -t`` does, Python's gzip module does not)."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    if len(head) == 4 and head[:2] == b"\x1f\x8b" and head[3] & 0xE0:
        raise InputError(
            path,
            f"cannot read NIfTI data: corrupt gzip stream (reserved flag bits 0x{head[3]:02x} "
            "set in the gzip header); the file is damaged (`gzip -t` checks it): copy it again",
        )


def _skip(stream, count: int, path: Path, layout: DataLayout) -> None:
    """Read and drop ``count`` bytes (header and extensions) of ``stream``."""
    while count > 0:
        chunk = stream.read(min(count, READ_CHUNK))
        if not chunk:
            raise InputError(
                path,
                f"cannot read NIfTI data: the gzip stream ends before vox_offset {layout.offset}",
            )
        count -= len(chunk)


def check_intensity_range(path: Path, data: np.ndarray) -> None:
    """Refuse float data with finite values beyond :data:`MAX_ABS_INTENSITY` in magnitude.

    Checked one slab at a time along the last axis, so no full-size temporary is made.
    """
    if data.dtype.kind != "f" or data.size == 0:
        return
    top = 0.0
    per_slice = max(1, data.size // max(1, data.shape[-1]))
    step = max(1, (1 << 20) // per_slice)  # about 1 M voxels (8 MB of float64) at a time
    for start in range(0, data.shape[-1], step):
        slab = np.abs(np.asarray(data[..., start : start + step], dtype=np.float64))
        top = max(top, float(slab.max(where=np.isfinite(slab), initial=0.0)))
    if top > MAX_ABS_INTENSITY:
        raise InputError(
            path,
            f"intensities reach {top:.3g}, beyond what the model handles (|x| <= "
            f"{MAX_ABS_INTENSITY:g}); check the scaling (scl_slope) or rescale the image",
        )


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _size(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} PB"  # pragma: no cover


def check_geometry(
    path: Path, affine: np.ndarray, zooms: tuple[float, ...], shape: tuple[int, ...]
) -> tuple[float, ...]:
    """Refuse a non-finite voxel-to-world transform or voxel size; return the voxel sizes.

    A voxel size of 0 on an axis one voxel long (a 2-D slice stored as X x Y x 1) is read as
    1 mm, as a viewer would; elsewhere voxel sizes must be finite and > 0.
    """
    if not np.all(np.isfinite(affine)):
        raise InputError(
            path,
            "the header's voxel-to-world transform (sform/qform) is not finite: "
            + " ".join(f"{v:g}" for v in np.asarray(affine).ravel()[:12])
            + "; fix the header (e.g. fslorient or nibabel set_sform)",
        )
    fixed = []
    for size, n in zip(zooms, shape):
        if size == 0 and n == 1:
            size = 1.0
        if not np.isfinite(size) or size <= 0:
            raise InputError(
                path,
                f"voxel sizes {tuple(float(z) for z in zooms)} (pixdim) must be finite and > 0;"
                " fix the header",
            )
        fixed.append(float(size))
    return tuple(fixed)
