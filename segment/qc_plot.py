"""Drawing primitives of the QC picture: label colours, text metrics, the intensity histogram
with the fitted mixture's curves, and its legend, all drawn into a numpy RGB canvas.

:mod:`segment.qc` lays the picture out and calls these; texts are not drawn here but appended
to a list of ``(x, y, text, colour, stroke)`` that the caller draws (:mod:`segment._font`) once
the arrays are in place.
"""

from __future__ import annotations

import numpy as np

from segment._font import text_size

__all__ = [
    "BLACK", "LEGEND_LINE", "PANEL_TITLE_H", "draw_histogram", "draw_legend", "fitted_histogram",
    "label_palette", "legend_entries", "percentiles", "value_counts",
]  # fmt: skip

_OVERLAY_ALPHA = 1.0  # outlines are drawn opaque: exactly the legend's colours
_N_BINS = 100
#: matplotlib's "tab10" colours (label k uses entry (k - 1) mod 10), as 0-255 RGB, with its
#: grey replaced by tab20's light red: a grey outline would vanish on the grey slices.
_TAB10 = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (255, 152, 150), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
BLACK, _BAR = (0, 0, 0), (190, 190, 190)
# Layout in pixels.
PANEL_TITLE_H = 18  # a panel's (and the histogram's) title line
LEGEND_LINE = 16
#: Percentiles (grey window, histogram range) are read on a regular subsample of at most about
#: this many values: the picture does not change and partitioning all voxels would dominate.
_PERCENTILE_SAMPLE = 200_000


def label_palette(n_components: int) -> np.ndarray:
    """(K + 1, 4) RGBA colours in [0, 1]: transparent for label 0, tab10 (cycled) for 1..K.

    The legend, the histogram curves and the outlines all use these colours, opaque.
    """
    palette = np.zeros((n_components + 1, 4))
    for k in range(n_components):
        palette[k + 1, :3] = np.array(_TAB10[k % 10]) / 255.0
        palette[k + 1, 3] = _OVERLAY_ALPHA
    return palette


def value_counts(values: np.ndarray, max_range: int = 1 << 20):
    """(distinct values, counts) of an integer array with a moderate range, else None.

    Percentiles and histograms of integer scans are read from these counts: a ``bincount`` is
    several times faster than partitioning or binning every voxel, with the same results.
    """
    if values.dtype.kind not in "iu" or values.size == 0:
        return None
    low, high = int(values.min()), int(values.max())
    if high - low > max_range:
        return None
    counts = np.bincount((values.astype(np.int64) - low).ravel())
    present = np.flatnonzero(counts)
    return present + low, counts[present]


def percentiles(data, qs) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear interpolation) of an array, or of
    ``(distinct values, counts)``; arrays of more than about ``_PERCENTILE_SAMPLE`` values
    are read on a regular subsample."""
    if isinstance(data, np.ndarray):
        return np.percentile(data[:: max(1, data.size // _PERCENTILE_SAMPLE)], qs)
    distinct, counts = data
    ends = np.cumsum(counts)  # sorted position i holds distinct[searchsorted(ends, i, "right")]
    position = (ends[-1] - 1) * np.asarray(qs, dtype=np.float64) / 100.0
    below = np.floor(position)
    at = distinct[np.searchsorted(ends, below, side="right")].astype(np.float64)
    above = distinct[np.minimum(np.searchsorted(ends, below + 1, side="right"), len(ends) - 1)]
    return at + (position - below) * (above - at)


def fitted_histogram(image, labels, mask, means, variances, weights) -> dict | None:
    """Histogram of labelled first-channel intensities and each component's expected counts.

    Returns None without labelled finite voxels, else a dict: ``n``, ``counts`` (B,), ``edges``
    (B + 1,), ``x`` (512,) intensities, ``curves`` (K, 512) expected counts per bin of each
    component and ``total`` (512,) their sum.
    """
    selected = labels > 0 if mask is None else (labels > 0) & mask
    values = np.asarray(image[selected])
    if values.size > 4_000_000:  # the histogram's shape needs no more: a regular subsample
        values = values[:: values.size // 2_000_000]
    distinct = value_counts(values)
    if distinct is None:
        values = values.astype(np.float64)
        values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = percentiles(distinct or values, [0.1, 99.9])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    if distinct is None:
        counts, edges = np.histogram(values, bins=_N_BINS, range=(lo, hi))
    else:  # the same bins as for every voxel: each distinct value weighted by its count
        counts, edges = np.histogram(distinct[0], _N_BINS, range=(lo, hi), weights=distinct[1])
        counts = counts.astype(np.int64)
    x = np.linspace(lo, hi, 512)
    var = np.maximum(variances, 1e-12)[:, None]
    density = np.exp(-0.5 * (x - means[:, None]) ** 2 / var) / np.sqrt(2.0 * np.pi * var)
    curves = values.size * (edges[1] - edges[0]) * weights[:, None] * density
    return {"n": values.size, "counts": counts, "edges": edges, "x": x, "curves": curves,
            "total": curves.sum(axis=0)}  # fmt: skip


def legend_entries(histogram, means, variances, weights, names):
    """Legend lines: (text, (kind, colour)), kind "fill" (data), "class" (label k) or "dash"."""
    colours = np.round(label_palette(len(weights))[1:, :3] * 255.0).astype(np.uint8)
    n = histogram["n"] if histogram else 0
    entries = [(f"data (n={n})", ("fill", _BAR))]
    for k, (mean, var, weight) in enumerate(zip(means, variances, weights, strict=True)):
        sd = np.sqrt(max(var, 0.0))
        text = f"{k + 1} {names[k]}:  mean {mean:.4g}   sd {sd:.3g}   w {weight:.2f}"
        entries.append((text, ("class", tuple(int(c) for c in colours[k]))))
    entries.append(("mixture", ("dash", BLACK)))
    return entries


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About ``n`` round tick values (steps of 1, 2 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / n
    magnitude = 10.0 ** np.floor(np.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step
    return np.round(ticks / step) * step + 0.0


def _tick_label(value: float) -> str:
    """Short tick text: ``250``, ``0.5``, ``2e4``."""
    if value != 0 and abs(value) >= 1e4 and float(value).is_integer():
        exponent = int(np.floor(np.log10(abs(value))))
        return f"{value / 10**exponent:g}e{exponent}"
    return f"{value:.4g}"


def _polyline(canvas, xs, ys, colour, clip, *, visible=None, dash: int = 0) -> None:
    """Draw a 2-px polyline through pixel coordinates (xs, ys) into ``canvas``, in place.

    Segments with neither end ``visible`` are skipped; ``dash`` > 0 draws dashes of that many
    pixels; pixels outside ``clip`` = (x0, y0, x1, y1) are not touched.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    keep = np.ones(len(xs) - 1, dtype=bool)
    if visible is not None:
        keep = visible[:-1] | visible[1:]
    dx, dy = np.diff(xs), np.diff(ys)
    length = np.hypot(dx, dy)
    start_len = np.concatenate([[0.0], np.cumsum(length)[:-1]])
    steps = np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(np.intp) + 1
    steps[~keep] = 0
    seg = np.repeat(np.arange(len(steps)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    t = (np.arange(seg.size) - first) / np.maximum(steps[seg] - 1, 1)
    px, py = xs[seg] + t * dx[seg], ys[seg] + t * dy[seg]
    if dash:
        on = ((start_len[seg] + t * length[seg]) // dash) % 2 == 0
        px, py = px[on], py[on]
    x0, y0, x1, y1 = clip
    for ox, oy in ((0, 0), (1, 0), (0, 1)):
        cx, cy = np.round(px).astype(np.intp) + ox, np.round(py).astype(np.intp) + oy
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        canvas[cy[inside], cx[inside]] = colour


def draw_histogram(canvas, plot, histogram, colours, log, texts) -> None:
    """Bars, fitted curves, frame and ticks of the histogram into ``canvas``; texts appended."""
    x0, y0, x1, y1 = plot
    texts.append((x0, y0 - PANEL_TITLE_H + 2,
                   "voxels per bin (log)" if log else "voxels per bin", BLACK, None))  # fmt: skip
    name = "intensity (channel 1)"
    tw = text_size(name)[0]
    texts.append(((x0 + x1 - tw) // 2, y1 + 22, name, BLACK, None))
    if histogram is None:
        tw = text_size("no labelled voxels")[0]
        texts.append(((x0 + x1 - tw) // 2, (y0 + y1) // 2, "no labelled voxels", BLACK, None))
    else:
        counts, edges, x = histogram["counts"], histogram["edges"], histogram["x"]
        lo, hi = float(edges[0]), float(edges[-1])
        top = max(float(counts.max()), float(histogram["total"].max()), 1.0)
        y_lo, y_hi = (0.5, top * 2.0) if log else (0.0, top * 1.05)
        f = np.log10 if log else (lambda v: v)

        def to_x(v):
            return x0 + (np.asarray(v, dtype=np.float64) - lo) / (hi - lo) * (x1 - x0 - 1)

        def to_y(v):
            v = np.clip(np.asarray(v, dtype=np.float64), y_lo, y_hi)
            return y1 - 1 - (f(v) - f(y_lo)) / (f(y_hi) - f(y_lo)) * (y1 - y0 - 1)

        columns = np.round(to_x(edges)).astype(np.intp)
        tops = np.round(to_y(counts)).astype(np.intp)
        for c0, c1, row, count in zip(columns[:-1], columns[1:], tops, counts, strict=True):
            if count > y_lo:
                canvas[row:y1, c0 : max(c1, c0 + 1)] = _BAR
        clip = (x0 + 1, y0 + 1, x1 - 1, y1 - 1)
        for k, curve in enumerate(histogram["curves"]):
            _polyline(canvas, to_x(x), to_y(curve), colours[k + 1], clip, visible=curve >= y_lo)
        total = histogram["total"]
        _polyline(canvas, to_x(x), to_y(total), BLACK, clip, visible=total >= y_lo, dash=6)
        for tick in _nice_ticks(lo, hi):
            col = int(round(float(to_x(tick))))
            canvas[y1 : y1 + 4, col] = BLACK
            w, _ = text_size(_tick_label(tick))
            texts.append((col - w // 2, y1 + 5, _tick_label(tick), BLACK, None))
        if log:
            y_ticks = 10.0 ** np.arange(0, int(np.floor(np.log10(y_hi))) + 1)
        else:
            y_ticks = _nice_ticks(0.0, y_hi)
        for tick in y_ticks:
            row = int(round(float(to_y(tick))))
            canvas[row, x0 - 4 : x0] = BLACK
            w, h = text_size(_tick_label(tick))
            texts.append((x0 - 6 - w, row - h // 2 - 1, _tick_label(tick), BLACK, None))
    canvas[y0, x0:x1] = canvas[y1 - 1, x0:x1] = BLACK
    canvas[y0:y1, x0] = canvas[y0:y1, x1 - 1] = BLACK


def draw_legend(canvas, box, entries, texts) -> list[tuple[int, int, int, int]]:
    """Swatches into ``canvas`` and texts appended; returns the class swatches' boxes."""
    x0, y0 = box[0], box[1]
    swatches = []
    for i, (text, (kind, colour)) in enumerate(entries):
        y = y0 + i * LEGEND_LINE
        if kind == "dash":
            for start in range(x0, x0 + 18, 8):
                canvas[y + 7 : y + 9, start : min(start + 5, x0 + 18)] = colour
        else:
            canvas[y + 3 : y + 13, x0 : x0 + 18] = colour
            if kind == "class":
                swatches.append((x0, y + 3, x0 + 18, y + 13))
        texts.append((x0 + 24, y, text, BLACK, None))
    return swatches
