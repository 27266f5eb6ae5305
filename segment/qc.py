"""Quality-control picture: label overlay and intensity histogram with the fitted mixture.

Drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), so it neither
needs nor changes the pyplot backend and can run in worker threads or processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segment.io import atomic_write

__all__ = ["outline_overlay", "write_qc"]

_OVERLAY_ALPHA = 1.0  # outlines are drawn opaque: exactly the legend's colours
_N_BINS = 100
_AXIS_NAMES = ("x", "y", "z")


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
    image : (*S) or (*S, D) array
        Intensities on the spatial grid S (3-D volume or 2-D image); with channels last, only the
        first channel is shown.
    labels : int array of shape S
        0 = background (transparent), k + 1 = component k.
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
        Figure title (e.g. the scan name).
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
    Path
        ``path``.

    Notes
    -----
    Volumes show three orthogonal slices through the centre of the bounding box of the labelled
    voxels (labels > 0), x horizontal and the next axis vertical, origin at the lower left; 2-D
    images show one panel in image orientation.  Each label's region is outlined with its
    legend colour, opaque (the pixels of an outline are exactly that colour), so the anatomy
    under it stays visible.  The histogram panel shows the first channel of
    the voxels with label > 0 (in ``mask`` if given), with each component's expected counts per
    bin, ``n * weights[k] * N(x | means[k, 0], covariances[k, 0, 0]) * bin_width``, in its
    label colour, and their sum (the mixture) in black.
    """
    from matplotlib.figure import Figure

    from segment.naming import label_names

    image, labels, mask = _check_arrays(image, labels, mask)
    means, variances, weights = _first_channel_parameters(means, covariances, weights)
    names = label_names(names, len(weights))
    directions = _directions(affine, labels.ndim)
    image, labels, mask, zooms, directions = _squeeze(image, labels, mask, zooms, directions)
    palette = _palette(len(weights))
    window = _grey_window(image, mask)

    planes = _planes(image, labels, zooms, directions)
    fig = Figure(figsize=(3.6 * len(planes) + 5.0, 4.2), dpi=100)
    # Fixed margins rather than constrained layout: half the drawing time for a 4-panel figure.
    fig.subplots_adjust(left=0.01, right=0.98, bottom=0.13, top=0.86, wspace=0.3)
    axes = fig.subplots(1, len(planes) + 1, width_ratios=[3.6] * len(planes) + [4.2])
    for ax, (name, grey, lab, aspect, origin, marks) in zip(axes[:-1], planes, strict=True):
        rgb = outline_overlay(grey, lab, window, palette)
        ax.imshow(rgb, origin=origin, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for (x, y, ha, va), text in zip(_MARK_PLACES, marks, strict=False):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=9,
                    color="yellow", fontweight="bold")  # fmt: skip
    _draw_histogram(
        axes[-1], image, labels, mask, means, variances, weights, palette, names, log_histogram
    )
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


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
# Where the direction letters go in a panel (axes fraction): left, right, bottom, top.
_MARK_PLACES = (
    (0.01, 0.5, "left", "center"),
    (0.99, 0.5, "right", "center"),
    (0.5, 0.01, "center", "bottom"),
    (0.5, 0.99, "center", "top"),
)


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


def _palette(n_components: int) -> np.ndarray:
    """(K + 1, 4) RGBA colours: transparent for label 0, tab10 (cycled) for labels 1..K.

    The legend, the histogram curves and the outlines all use these colours, opaque.
    """
    from matplotlib import colormaps

    tab10 = colormaps["tab10"]
    palette = np.zeros((n_components + 1, 4))
    for k in range(n_components):
        palette[k + 1, :3] = tab10(k % 10)[:3]
        palette[k + 1, 3] = _OVERLAY_ALPHA
    return palette


def _grey_window(image: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """1st and 99th percentiles of the finite intensities (in the mask if given)."""
    values = np.asarray(image[mask] if mask is not None else image).ravel()
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return 0.0, 1.0
    step = max(1, values.size // 1_000_000)
    lo, hi = np.percentile(values[::step], [1.0, 99.0])
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def _planes(image, labels, zooms, directions=None):
    """Panels to draw: (title, grey slice, label slice, aspect, origin, direction marks)."""
    if labels.ndim == 2:
        return [("image", image, labels, "equal", "upper", ())]
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


def _draw_histogram(
    ax, image, labels, mask, means, variances, weights, palette, names=None, log=False
) -> None:
    """Histogram of labelled intensities with each component's scaled density and the total."""
    selected = labels > 0 if mask is None else (labels > 0) & mask
    values = np.asarray(image[selected])
    if values.size > 4_000_000:  # the histogram's shape needs no more: a regular subsample
        values = values[:: values.size // 2_000_000]
    values = values.astype(np.float64)
    values = values[np.isfinite(values)]
    ax.set_xlabel("intensity (channel 1)", fontsize=9)
    ax.set_ylabel("voxels per bin", fontsize=9)
    ax.tick_params(labelsize=8)
    if values.size == 0:
        ax.text(0.5, 0.5, "no labelled voxels", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = np.percentile(values, [0.1, 99.9])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=_N_BINS, range=(lo, hi))
    ax.stairs(counts, edges, fill=True, color="0.75", label=f"data (n={values.size})")
    x = np.linspace(lo, hi, 512)
    scale = values.size * (edges[1] - edges[0])
    total = np.zeros_like(x)
    for k, (mean, var, weight) in enumerate(zip(means, variances, weights, strict=True)):
        var = max(float(var), 1e-12)
        density = np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2.0 * np.pi * var)
        curve = scale * weight * density
        total += curve
        ax.plot(
            x,
            curve,
            color=palette[k + 1, :3],
            lw=1.5,
            label=f"{k + 1} {names[k] if names else ''}: μ={mean:.4g} σ={np.sqrt(var):.3g} "
            f"w={weight:.2f}",
        )
    ax.plot(x, total, color="black", lw=1.0, ls="--", label="mixture")
    ax.set_xlim(lo, hi)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(float(counts.max()), float(total.max()), 1.0) * 2.0)
        ax.set_ylabel("voxels per bin (log)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
