"""Quality-control picture: label overlay and intensity histogram with the fitted mixture.

Composed as a numpy RGB array (slices, outlines, histogram bars and curves), with the text
blitted from a small bitmap font (:mod:`segment._font`) and the PNG written by the standard
library (:mod:`segment._png`) as a palette image (128 grey levels plus the exact label colours).
No plotting or imaging library is imported: the picture costs a few tens of milliseconds, and
the same inputs give the same bytes.  The histogram,
its legend and the colours are drawn by :mod:`segment.qc_plot`; this module lays out the
slices and writes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segment._font import draw_text, text_size
from segment._png import png_bytes
from segment.io import atomic_write
from segment.qc_plot import (
    BLACK,
    LEGEND_LINE,
    PANEL_TITLE_H,
    draw_histogram,
    draw_legend,
    fitted_histogram,
    label_palette,
    legend_entries,
    percentiles,
    value_counts,
)

__all__ = ["outline_overlay", "render_qc", "write_qc"]

_AXIS_NAMES = ("x", "y", "z")
_MARK_COLOUR = (255, 255, 0)
# Layout in pixels.
_MARGIN = 10
_TITLE_H = 26
_PANEL = 256  # each slice is fitted into a PANEL x PANEL box
_PLOT_W = 340
_PLOT_LEFT = 48  # room for the y tick labels
_PLOT_BOTTOM = 40  # room for the x tick labels and the axis name
#: zlib level of the PNG: 1 is about twice as fast as 6 for files about 10 % larger.
_PNG_LEVEL = 1


def write_qc(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    means,
    covariances,
    weights,
    mask: np.ndarray | None = None,
    title: str = "",
    zooms: tuple[float, ...] | None = None,
    names: list[str] | None = None,
    affine: np.ndarray | None = None,
    log_histogram: bool = False,
) -> Path:
    """Write a PNG showing the label map and the fitted mixture.

    Parameters
    ----------
    path : str or Path
        PNG file to write (atomically).
    image, labels, means, covariances, weights, mask, title, zooms, names, affine, log_histogram
        As for :func:`render_qc`.

    Returns
    -------
    Path
        ``path``.
    """
    picture, _ = _draw(
        image, labels, means=means, covariances=covariances, weights=weights, mask=mask,
        title=title, zooms=zooms, names=names, affine=affine, log_histogram=log_histogram,
    )  # fmt: skip
    path = Path(path)
    indexed = _indexed(picture)  # the indices of render_qc's colours
    data = png_bytes(picture if indexed is None else indexed[0],
                     None if indexed is None else indexed[1], _PNG_LEVEL)  # fmt: skip
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def render_qc(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    means,
    covariances,
    weights,
    mask: np.ndarray | None = None,
    title: str = "",
    zooms: tuple[float, ...] | None = None,
    names: list[str] | None = None,
    affine: np.ndarray | None = None,
    log_histogram: bool = False,
) -> tuple[np.ndarray, dict]:
    """Draw the QC picture: slices with label outlines, histogram with the fitted mixture.

    Parameters
    ----------
    image : (*S) or (*S, D) array
        Intensities on the spatial grid S (3-D volume or 2-D image); with channels last, only the
        first channel is shown.
    labels : int array of shape S
        0 = background (not drawn), k + 1 = component k.
    means : (K, D) array
        Component means (intensity units); ``(K,)`` is read as D = 1.
    covariances : (K, D, D) array
        Component covariances; ``(K, D)`` diagonal or ``(K,)`` variances are also accepted.  Only
        the first channel's variance ``covariances[k, 0, 0]`` is drawn.
    weights : (K,) array
        Mixing proportions (sum to 1).
    mask : bool array of shape S, optional
        Restricts the histogram and the grey-level window to the mask.
    title : str
        Picture title (e.g. the scan name).
    zooms : tuple of float, optional
        Voxel size per spatial axis, to draw slices with the right aspect; isotropic if omitted.
    names : list of str, optional
        Names of labels 1..K, shown in the legend (``class1``... if omitted).
    affine : (4, 4) array, optional
        Voxel-to-world affine of a volume: the panels are marked with the anatomical directions
        (L/R, P/A, I/S, RAS+ world as in NIfTI) at their edges.  Without it, the voxel axes.
    log_histogram : bool
        Log-scale the histogram's counts (small classes stay visible next to a large one).

    Returns
    -------
    picture : (H, W, 3) uint8 array
        The RGB picture; its size depends on the number of panels and classes, not on S.
    layout : dict
        Pixel boxes ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of what was drawn: ``"panels"`` (the
        slice images), ``"marks"`` (per panel, ``(letter, box)`` of each direction letter),
        ``"plot"`` (the histogram's axes), ``"legend"`` and ``"swatches"`` (label k's colour
        sample at index k - 1).

    Notes
    -----
    Volumes show three orthogonal slices through the centre of the bounding box of the labelled
    voxels (labels > 0), x horizontal and the next axis vertical, origin at the lower left; 2-D
    images show one panel in image orientation.  Slices are resampled (nearest neighbour) to
    fill their box with the voxels' physical aspect; each label's region is then outlined with
    its legend colour, opaque (the pixels of an outline are exactly that colour), so the anatomy
    under it stays visible.  The histogram shows the first channel of the voxels with label > 0
    (in ``mask`` if given), with each component's expected counts per bin,
    ``n * weights[k] * N(x | means[k, 0], covariances[k, 0, 0]) * bin_width``, in its label
    colour, and their sum (the mixture) dashed black.
    """
    canvas, layout = _draw(
        image, labels, means=means, covariances=covariances, weights=weights, mask=mask,
        title=title, zooms=zooms, names=names, affine=affine, log_histogram=log_histogram,
    )  # fmt: skip
    indexed = _indexed(canvas)  # 128 grey levels: the picture exactly as it is written
    return (canvas if indexed is None else indexed[1][indexed[0]]), layout


def _draw(
    image, labels, *, means, covariances, weights, mask, title, zooms, names, affine,
    log_histogram,
) -> tuple[np.ndarray, dict]:  # fmt: skip
    """:func:`render_qc`'s picture before its grey levels are reduced to 128, and its layout."""
    from segment.naming import label_names

    image, labels, mask = _check_arrays(image, labels, mask)
    means, variances, weights = _first_channel_parameters(means, covariances, weights)
    names = label_names(names, len(weights))
    directions = _directions(affine, labels.ndim)
    image, labels, mask, zooms, directions = _squeeze(image, labels, mask, zooms, directions)
    palette = label_palette(len(weights))
    window = _grey_window(image, mask)
    planes = _planes(image, labels, zooms, directions)
    colours = np.round(palette[:, :3] * 255.0).astype(np.uint8)

    histogram = fitted_histogram(image, labels, mask, means, variances, weights)
    legend = legend_entries(histogram, means, variances, weights, names)
    legend_w = max(text_size(text)[0] for text, _ in legend) + 30
    top = _MARGIN + (_TITLE_H if title else 0)
    panels_top = top + PANEL_TITLE_H
    height = max(panels_top + _PANEL, top + len(legend) * LEGEND_LINE) + _MARGIN
    plot_x0 = _MARGIN + len(planes) * (_PANEL + _MARGIN) + _PLOT_LEFT
    plot = (plot_x0, panels_top, plot_x0 + _PLOT_W, panels_top + _PANEL - _PLOT_BOTTOM)
    legend_box = (plot[2] + 2 * _MARGIN, top, plot[2] + 2 * _MARGIN + legend_w, height)
    canvas = np.full((height, legend_box[2] + _MARGIN, 3), 255, dtype=np.uint8)

    texts = []  # (x, y, text, colour, stroke colour or None): drawn once the arrays are in place
    panel_boxes, mark_boxes = [], []
    for i, (name, grey, lab, pixel_aspect, origin, marks) in enumerate(planes):
        grey, lab = _fit_to_box(grey, lab, pixel_aspect, _PANEL)
        if origin == "lower":
            grey, lab = grey[::-1], lab[::-1]
        rgb = outline_overlay(grey, lab, window, palette)
        h, w = lab.shape
        x0 = _MARGIN + i * (_PANEL + _MARGIN) + (_PANEL - w) // 2
        y0 = panels_top + (_PANEL - h) // 2
        canvas[y0 : y0 + h, x0 : x0 + w] = rgb
        box = (x0, y0, x0 + w, y0 + h)
        panel_boxes.append(box)
        tw = text_size(name)[0]
        texts.append((x0 + (w - tw) // 2, y0 - PANEL_TITLE_H + 2, name, BLACK, None))
        placed = []
        for where, letter in zip(("left", "right", "bottom", "top"), marks, strict=False):
            if letter:
                size = text_size(letter)
                xy = _mark_position(box, where, size)
                texts.append((*xy, letter, _MARK_COLOUR, BLACK))  # outlined: read on any grey
                placed.append((letter, (xy[0], xy[1], xy[0] + size[0], xy[1] + size[1])))
        mark_boxes.append(placed)

    draw_histogram(canvas, plot, histogram, colours, log_histogram, texts)
    swatches = draw_legend(canvas, legend_box, legend, texts)
    if title:
        tw = text_size(title)[0]
        texts.append(((canvas.shape[1] - tw) // 2, _MARGIN + 4, title, BLACK, None))
    for x, y, text, colour, stroke in texts:
        draw_text(canvas, x, y, text, colour, stroke)
    layout = {"panels": panel_boxes, "marks": mark_boxes, "plot": plot, "legend": legend_box,
              "swatches": swatches}  # fmt: skip
    return canvas, layout


def _indexed(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The picture as palette indices: 128 grey levels (even values, and white) and its
    other colours, exact; None if it has more than 128 other colours.

    Returns ``(index, palette)``: (H, W) uint8 indices and the (n, 3) uint8 palette.  A palette
    PNG is written without PNG's row filters, several times faster than an RGB one.
    """
    grey = (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])
    index = picture[..., 0] >> 1
    coloured = picture[~grey].astype(np.int32)  # the few outline, curve and letter pixels
    codes = (coloured[:, 0] << 16) | (coloured[:, 1] << 8) | coloured[:, 2]
    other, which = np.unique(codes, return_inverse=True)
    if len(other) > 128:
        return None
    index[~grey] = 128 + which.ravel()
    levels = np.minimum(np.arange(128) * 2 + (np.arange(128) == 127), 255)
    palette = np.concatenate([
        np.repeat(levels[:, None], 3, axis=1),
        np.stack([other >> 16, (other >> 8) & 255, other & 255], axis=1),
    ]).astype(np.uint8)  # fmt: skip
    return index, palette


def _check_arrays(image, labels, mask):
    """Validate shapes; return (first-channel image, labels, mask or None)."""
    image = np.asanyarray(image)
    labels = np.asarray(labels)
    if image.ndim == labels.ndim + 1:
        image = image[..., 0]
    if image.shape != labels.shape:
        raise ValueError(
            f"image spatial shape {image.shape} does not match labels shape {labels.shape}"
        )
    if labels.ndim not in (2, 3):
        raise ValueError(f"QC needs a 2-D image or a 3-D volume; got labels shape {labels.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.intp)
    return image, labels, mask


def _first_channel_parameters(means, covariances, weights):
    """Return (K,) means, (K,) variances and (K,) weights of the first channel."""
    means = np.asarray(means, dtype=np.float64)
    covariances = np.asarray(covariances, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).ravel()
    means = means.reshape(len(means), -1)[:, 0]
    if covariances.ndim == 3:
        variances = covariances[:, 0, 0]
    else:
        variances = covariances.reshape(len(covariances), -1)[:, 0]
    if not len(means) == len(variances) == len(weights):
        raise ValueError(
            f"means, covariances and weights disagree on K: {len(means)}, {len(variances)}, "
            f"{len(weights)}"
        )
    return means, variances, weights


def _squeeze(image, labels, mask, zooms, directions=None):
    """Drop spatial axes of length 1 (a single-slice volume is drawn as a 2-D image)."""
    if zooms is None:
        zooms = (1.0,) * labels.ndim
    keep = [i for i, s in enumerate(labels.shape) if s > 1]
    if len(keep) == labels.ndim or len(keep) < 2:
        return image, labels, mask, tuple(float(z) for z in zooms), directions
    shape = tuple(labels.shape[i] for i in keep)
    mask = None if mask is None else mask.reshape(shape)
    zooms = tuple(float(zooms[i]) for i in keep)
    return image.reshape(shape), labels.reshape(shape), mask, zooms, None


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _directions(affine, ndim: int) -> list[tuple[str, str]] | None:
    """(toward lower index, toward higher index) letters of each voxel axis of a volume.

    From the affine's closest anatomical axes (``nibabel.aff2axcodes``, RAS+ world), e.g.
    ``[("L", "R"), ("P", "A"), ("I", "S")]``; voxel axes (``x-``, ``x+``) without an affine.
    """
    if ndim != 3:
        return None
    if affine is None:
        return [(f"{a}-", f"{a}+") for a in _AXIS_NAMES]
    from nibabel.orientations import aff2axcodes

    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    return [(_OPPOSITE[c], c) if c in _OPPOSITE else ("", "") for c in codes]


def outline_overlay(
    grey: np.ndarray, labels: np.ndarray, window: tuple[float, float], palette: np.ndarray
) -> np.ndarray:
    """RGB picture of a slice with each label's boundary in its palette colour.

    Parameters
    ----------
    grey : (H, W) array
        Intensities, shown in grey levels between ``window[0]`` and ``window[1]``.
    labels : (H, W) int array
        0 = not drawn; label k is outlined with ``palette[k, :3]``.
    window : (lo, hi)
    palette : (K + 1, 4) array of RGBA in [0, 1]

    Returns
    -------
    (H, W, 3) uint8 array
        Grey everywhere except the outline pixels: labelled pixels with a 4-neighbour of
        another label, which are exactly ``round(255 * palette[label, :3])``.
    """
    lo, hi = window
    scaled = (np.nan_to_num(np.asarray(grey, dtype=np.float32), nan=lo) - lo) / (hi - lo)
    rgb = np.repeat((np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[..., None], 3, -1)
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        differs = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * 2
        upper = [slice(None)] * 2
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lower)] |= differs
        edge[tuple(upper)] |= differs
    edge &= labels > 0
    colours = np.round(np.asarray(palette)[:, :3] * 255.0).astype(np.uint8)
    rgb[edge] = colours[labels[edge]]
    return rgb


def _grey_window(image: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """1st and 99th percentiles of the finite intensities (in the mask if given)."""
    values = np.asarray(image[mask] if mask is not None else image).ravel()
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = percentiles(value_counts(values) or values, [1.0, 99.0])
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def _planes(image, labels, zooms, directions=None):
    """Panels to draw: (title, grey slice, label slice, pixel aspect, origin, direction marks).

    The pixel aspect is a row's physical height over a column's width; direction marks are the
    letters at the panel's (left, right, bottom, top) edges.
    """
    if labels.ndim == 2:
        return [("image", image, labels, zooms[0] / zooms[1], "upper", ())]
    centre = _labelled_centre(labels)
    planes = []
    for axis in range(3):
        rows_axis, cols_axis = [a for a in range(3) if a != axis][::-1]
        index = [slice(None)] * 3
        index[axis] = centre[axis]
        # After slicing, the remaining axes are (cols_axis, rows_axis); transpose so that the
        # lower-numbered axis runs horizontally.
        grey = np.asarray(image[tuple(index)]).T
        lab = labels[tuple(index)].T
        aspect = zooms[rows_axis] / zooms[cols_axis]
        name = f"{_AXIS_NAMES[axis]} = {centre[axis]}"
        # origin lower: columns run left -> right, rows bottom -> top
        marks = (*directions[cols_axis], *directions[rows_axis]) if directions else ()
        planes.append((name, grey, lab, aspect, "lower", marks))
    return planes


def _labelled_centre(labels: np.ndarray) -> tuple[int, ...]:
    """Voxel index of the centre of the bounding box of labels > 0 (grid centre if none)."""
    labelled = labels > 0
    centre = []
    for axis in range(labels.ndim):
        others = tuple(a for a in range(labels.ndim) if a != axis)
        present = np.flatnonzero(labelled.any(axis=others))
        if present.size:
            centre.append(int((present[0] + present[-1]) // 2))
        else:
            centre.append(labels.shape[axis] // 2)
    return tuple(centre)


def _fit_to_box(grey, labels, pixel_aspect: float, box: int):
    """Resample a slice (nearest neighbour) to its physical aspect, its longer side ``box`` px.

    Returns the resampled (h, w) grey and label arrays, with h, w <= ``box``.
    """
    rows, cols = labels.shape
    height, width = rows * pixel_aspect, float(cols)
    scale = box / max(height, width)
    h = min(box, max(1, int(round(height * scale))))
    w = min(box, max(1, int(round(width * scale))))
    r = np.minimum(((np.arange(h) + 0.5) * rows / h).astype(np.intp), rows - 1)
    c = np.minimum(((np.arange(w) + 0.5) * cols / w).astype(np.intp), cols - 1)
    return np.asarray(grey)[np.ix_(r, c)], np.asarray(labels)[np.ix_(r, c)]


def _mark_position(box, where: str, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a direction letter of ``size`` at one edge of a panel's ``box``."""
    x0, y0, x1, y1 = box
    w, h = size
    cx, cy = (x0 + x1 - w) // 2, (y0 + y1 - h) // 2
    return {"left": (x0 + 3, cy), "right": (x1 - 3 - w, cy),
            "bottom": (cx, y1 - 3 - h), "top": (cx, y0 + 1)}[where]  # fmt: skip
