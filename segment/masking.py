"""Masks and the one pair of functions that knows voxel order.

:func:`flatten` turns a spatial array (optionally with channels last) into the
``(n_voxels, n_channels)`` feature matrix the mixture model fits, and :func:`unflatten` puts
per-voxel results back on the grid.  Voxel order is the C order of ``mask.nonzero()`` (as in
nilearn's ``_unmask_3d``); no other module should rely on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from segment.exceptions import InputError, SegmentError
from segment.io import Scan, check_same_grid, load_scan

__all__ = ["auto_mask", "background_threshold", "flatten", "load_mask", "unflatten", "valid_voxels"]


def auto_mask(data: np.ndarray) -> np.ndarray:
    """Estimate the object (head, or brain of a skull-stripped scan) against the background.

    The mask keeps everything that is not background: on a whole-head scan the whole head
    (scalp, skull, CSF and ventricles included, air out); on a skull-stripped scan, whose
    background is zero, the whole brain.

    Parameters
    ----------
    data : (X, Y, Z) or (rows, cols) array
        Intensities.  NaN and infinite voxels are ignored by the threshold; closing and hole
        filling may still put them inside the mask (:func:`valid_voxels` then excludes and
        counts them).

    Returns
    -------
    mask : bool array, same shape as ``data``

    Raises
    ------
    SegmentError
        No finite voxel, or all finite voxels have the same value.

    Notes
    -----
    The method, in order:

    1. Background threshold from the robust range (as FSL ``bet`` does): with p2 and p98 the
       2nd and 98th percentiles of the finite voxels, ``t = p2 + 0.1 (p98 - p2)``;
       foreground = voxels strictly above ``t``.  Unlike an Otsu threshold, which on a head
       splits brain from the rest, this separates the object from the air.
    2. Binary opening (face-connected element) to cut noise bridges into the background, keep
       the largest connected component, then grow it back by two geodesic dilations inside the
       thresholded foreground (restoring the edges and corners the opening removed).
    3. Binary closing (on a zero-padded copy so the image border does not erode the mask).
    4. Fill holes in 3-D, then slice by slice along each axis, so that dark enclosed tissue
       (skull, CSF, ventricles) is kept even where the head touches the image border.

    Axes of length 1 (e.g. a single-slice volume) are dropped for steps 2-4, so a (X, Y, 1)
    volume is treated as a 2-D image.

    Examples
    --------
    >>> image = np.zeros((20, 20)); image[5:15, 5:15] = 10.0
    >>> int(auto_mask(image).sum())
    100
    """
    data = np.asarray(data)
    finite = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, dtype=bool)
    values = data[finite]
    if values.size == 0:
        raise SegmentError("auto mask: the image has no finite voxel")
    lo, hi = values.min(), values.max()
    if lo == hi:
        raise SegmentError(
            f"auto mask: the image is constant (all finite voxels equal {lo}); "
            "give a mask file or --mask none"
        )
    threshold = background_threshold(values)
    foreground = np.zeros(data.shape, dtype=bool)
    foreground[finite] = values > threshold
    core_shape = tuple(s for s in data.shape if s > 1)
    core = _clean_foreground(foreground.reshape(core_shape))
    return core.reshape(data.shape)


def background_threshold(values: np.ndarray) -> float:
    """Robust-range background threshold ``p2 + 0.1 (p98 - p2)`` of ``values`` (1-D, finite).

    Falls back to the midpoint of the range when p2 == p98 (an image that is mostly one value).
    """
    p2, p98 = np.percentile(values, [2.0, 98.0])
    if p98 <= p2:
        return float(values.min() + 0.5 * (values.max() - values.min()))
    return float(p2 + 0.1 * (p98 - p2))


def _largest_component(foreground: np.ndarray, structure: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(foreground, structure=structure)
    if n == 0:
        return foreground
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _clean_foreground(foreground: np.ndarray) -> np.ndarray:
    """Opened largest component, regrown, closed, holes filled (steps 2-4 of auto_mask)."""
    structure = ndimage.generate_binary_structure(foreground.ndim, 1)
    opened = ndimage.binary_opening(foreground, structure=structure)
    largest = _largest_component(opened if opened.any() else foreground, structure)
    for _ in range(2):
        largest = ndimage.binary_dilation(largest, structure=structure) & foreground
    padded = np.pad(largest, 1)
    closed = ndimage.binary_closing(padded, structure=structure)
    closed = closed[(slice(1, -1),) * foreground.ndim]
    filled = ndimage.binary_fill_holes(closed, structure=structure)
    if filled.ndim == 3:
        plane = ndimage.generate_binary_structure(2, 1)
        for axis in range(3):
            moved = np.moveaxis(filled, axis, 0)
            for i in range(moved.shape[0]):
                moved[i] = ndimage.binary_fill_holes(moved[i], structure=plane)
    return filled


def load_mask(spec, reference: Scan) -> np.ndarray | None:
    """Resolve a mask specification to a boolean array on the reference grid.

    Parameters
    ----------
    spec : None, "none", "auto", str or Path, or array
        ``None``/``"none"`` (case-insensitive): no mask.  ``"auto"``: :func:`auto_mask` of
        ``reference.data``.  A path: a mask file on the same grid as ``reference`` (checked with
        :func:`segment.io.check_same_grid`); non-zero finite voxels are inside.  An array of
        ``reference.shape`` (bool or numbers): non-zero finite entries are inside.
    reference : Scan
        The scan to be segmented.

    Returns
    -------
    mask : bool array of reference.shape, or None

    Raises
    ------
    InputError
        The mask file cannot be loaded, is on another grid, or is empty; an array mask has the
        wrong shape or is empty; ``"auto"`` finds no foreground.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str) and spec.lower() == "auto":
        try:
            mask = auto_mask(reference.data)
        except SegmentError as exc:
            raise InputError(reference.path, str(exc)) from exc
        return _check_not_empty(mask, reference.path, "auto mask is empty")
    if isinstance(spec, np.ndarray):
        if spec.shape != reference.shape:
            raise InputError(
                reference.path,
                f"mask array has shape {spec.shape} but the scan has shape {reference.shape}; "
                "pass a mask on the scan grid",
            )
        return _check_not_empty(_nonzero(spec), reference.path, "mask is empty")
    mask_scan = load_scan(Path(spec))
    check_same_grid(reference, mask_scan, "mask")
    return _check_not_empty(_nonzero(mask_scan.data), mask_scan.path, "mask is empty")


def _nonzero(values: np.ndarray) -> np.ndarray:
    """Boolean array: non-zero and finite."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values.copy()
    inside = values != 0
    if values.dtype.kind in "fc":
        inside &= np.isfinite(values)
    return inside


def _check_not_empty(mask: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Return ``mask`` or raise InputError when it has no True voxel."""
    if not mask.any():
        raise InputError(path, f"{what}: no non-zero voxel")
    return mask


def valid_voxels(
    channels: list[np.ndarray] | np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """Voxels usable for fitting: inside the mask and finite in every channel.

    Parameters
    ----------
    channels : list of (spatial) arrays, or array
        One array per channel, all of the same spatial shape.  A single array is one channel,
        unless ``mask`` is given and the array has one more axis than ``mask``: channels last.
    mask : bool array of the spatial shape, or None
        ``None`` means every voxel.

    Returns
    -------
    valid : bool array of the spatial shape
        ``mask & finite(channel 0) & finite(channel 1) ...``
    n_nonfinite : int
        Number of voxels inside the mask that are NaN or infinite in at least one channel (the
        caller should warn with :class:`segment.DataWarning` when it is > 0).
    """
    channels = _as_channel_list(channels, mask)
    shape = channels[0].shape
    for i, channel in enumerate(channels):
        if channel.shape != shape:
            raise ValueError(
                f"channel {i} has shape {channel.shape} but channel 0 has shape {shape}; "
                "all channels must be on the same grid"
            )
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match channel shape {shape}")
    inside = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    finite = np.ones(shape, dtype=bool)
    for channel in channels:
        if channel.dtype.kind in "fc":
            finite &= np.isfinite(channel)
    valid = inside & finite
    return valid, int(np.count_nonzero(inside)) - int(np.count_nonzero(valid))


def _as_channel_list(channels, mask: np.ndarray | None) -> list[np.ndarray]:
    """Normalise the ``channels`` argument of :func:`valid_voxels` to a list of arrays."""
    if isinstance(channels, list | tuple):
        if not channels:
            raise ValueError("channels is empty; give at least one image")
        return [np.asarray(c) for c in channels]
    channels = np.asarray(channels)
    if mask is not None and channels.ndim == np.ndim(mask) + 1:
        return [channels[..., d] for d in range(channels.shape[-1])]
    return [channels]


def _check_mask(mask: np.ndarray, spatial_shape: tuple[int, ...], what: str) -> np.ndarray:
    """Check that ``mask`` is a bool array of ``spatial_shape``."""
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be a bool array; got dtype {mask.dtype}")
    if mask.shape != spatial_shape:
        raise ValueError(f"{what} spatial shape {spatial_shape} does not match mask {mask.shape}")
    return mask


def flatten(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gather the voxels inside ``mask`` into a feature matrix.

    Parameters
    ----------
    data : (*S) or (*S, D) array
        One channel on the spatial grid S, or D channels last.  Memmaps are read here.
    mask : bool array of shape S

    Returns
    -------
    X : (n_voxels, D) array, dtype of ``data``
        ``n_voxels = mask.sum()``; rows in the C order of ``mask.nonzero()``; D = 1 for a single
        channel.

    Examples
    --------
    >>> data = np.arange(6).reshape(2, 3)
    >>> flatten(data, data % 2 == 1).ravel().tolist()
    [1, 3, 5]
    """
    data = np.asanyarray(data)
    mask = np.asarray(mask)
    if data.shape == mask.shape:
        _check_mask(mask, data.shape, "data")
        return np.asarray(data[mask]).reshape(-1, 1)
    _check_mask(mask, data.shape[:-1], "data")
    return np.asarray(data[mask])


def unflatten(values: np.ndarray, mask: np.ndarray, fill=0) -> np.ndarray:
    """Put per-voxel values back on the grid (inverse of :func:`flatten`).

    Parameters
    ----------
    values : (n_voxels,) or (n_voxels, K) array
        In the order produced by :func:`flatten` with the same ``mask``.
    mask : bool array of spatial shape S
    fill : scalar
        Value outside the mask.

    Returns
    -------
    array of shape S or (*S, K), dtype of ``values``

    Examples
    --------
    >>> mask = np.array([[True, False], [False, True]])
    >>> unflatten(np.array([7, 9]), mask).tolist()
    [[7, 0], [0, 9]]
    """
    values = np.asarray(values)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be a bool array; got dtype {mask.dtype}")
    n = int(np.count_nonzero(mask))
    if values.ndim not in (1, 2) or values.shape[0] != n:
        raise ValueError(
            f"values must have shape ({n},) or ({n}, K) for a mask with {n} voxels; "
            f"got {values.shape}"
        )
    out = np.full(mask.shape + values.shape[1:], fill, dtype=values.dtype)
    out[mask] = values
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask`` (a non-empty mask)."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)
