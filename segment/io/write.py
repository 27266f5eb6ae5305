"""Write segmentation outputs on the input grid (labels, probabilities, maps)."""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

import nibabel as nib
import numpy as np

from segment.io.atomic import atomic_write
from segment.io.gzip import (
    DEFAULT_COMPRESSLEVEL,
    _append_file,
    _gzip_trailer,
    _write_members,
)
from segment.io.read import _NIFTI_EXTENSIONS, _TIFF_EXTENSIONS, Scan, _matched_extension


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
        if data.ndim == 3:  # deflate pieces compressed in parallel, as for the probabilities
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


#: Bytes of one volume per deflate piece of a 4-D ``.nii.gz`` (whole slices along the last
#: spatial axis). Both 4-D writers cut at the same places, so equal maps give equal bytes.
#: :func:`write_nifti_slabs` holds about three slabs of all volumes at once (K = 6: ~75 MB);
#: members of 4 MB compress as fast and as well as larger ones.
SLAB_BYTES = 4 << 20


def slab_step(shape: Sequence[int], dtype) -> int:
    """Slices along the last axis of ``shape`` in one slab of about :data:`SLAB_BYTES`."""
    per_slice = max(1, int(np.prod(shape[:-1], dtype=np.int64)) * np.dtype(dtype).itemsize)
    # read through the package, where tests set segment.io.SLAB_BYTES
    return max(1, sys.modules["segment.io"].SLAB_BYTES // per_slice)


def _fortran_bytes(part: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous array whose buffer is ``part`` in NIfTI (Fortran) order (no copy if F)."""
    return np.asfortranarray(np.asarray(part, dtype=dtype)).T


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

    For ``.nii.gz`` each volume is cut into slabs of about :data:`SLAB_BYTES`, each deflated on
    its own in parallel threads (zlib releases the GIL) into one gzip member, as pigz does (see
    :mod:`segment.io.gzip`): every reader, even one that reads only a first member, sees the
    whole image. One volume and
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
        sums = _write_members([stream], _nifti_head(header), members(), compresslevel, n_threads, 0)
        stream.write(_gzip_trailer(sums))
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
    piece is deflated on its own (the pieces of :func:`write_nifti_volumes`, so the bytes are
    the same, one gzip member); volume 0's pieces go to the output, the other volumes' to
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
                sums = _write_members(streams, head, members(), compresslevel, n_threads, n_volumes)
                for spill, stream in zip(spills, streams[1:]):
                    stream.close()
                    _append_file(streams[0], spill)
                streams[0].seek(0, os.SEEK_END)
                streams[0].write(_gzip_trailer(sums))
        finally:
            for spill in spills:
                with suppress(OSError):
                    spill.unlink()
    return path


def _check_2d(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse to write a volume into a 2-D picture format."""
    if array.ndim != 2:
        raise ValueError(
            f"cannot write a {array.ndim}-D {what} to {path.name}; use a .nii.gz path for volumes"
        )
