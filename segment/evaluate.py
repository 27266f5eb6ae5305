"""Compare a label map with a reference: Dice and Jaccard after optimal label matching.

A Gaussian mixture numbers its components by ascending mean, not by the reference's tissue
codes, so predicted labels are first matched one-to-one to reference classes with the
assignment that maximises the total overlap (Hungarian algorithm on the contingency table).

Examples
--------
>>> import numpy as np
>>> reference = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
>>> predicted = np.array([[7, 7, 7, 3], [7, 7, 3, 3]])
>>> result = evaluate_labels(predicted, reference)
>>> result["mapping"], round(result["mean_dice"], 3)
({'1': 7, '2': 3}, 0.873)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from segment.evaluate_fractions import (  # noqa: F401 - as before the split
    FRACTION_TOLERANCE,
    evaluate_fraction_files,
    evaluate_fractions,
    format_fraction_table,
)
from segment.exceptions import InputError, SegmentError
from segment.naming import is_nifti

__all__ = [
    "evaluate_labels",
    "evaluate_files",
    "evaluated_voxels",
    "read_label_names",
    "format_table",
    "evaluate_fractions",
    "evaluate_fraction_files",
    "format_fraction_table",
]


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def _label_problem(data: np.ndarray) -> str | None:
    """Say why ``data`` is not a label map, or return None if it is one.

    Integer and boolean arrays are label maps; floating arrays are when every value is a finite
    whole number (label maps saved as float32 by other tools).
    """
    if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
        return None
    if not np.issubdtype(data.dtype, np.floating):
        return f"expected integer label data; got dtype {data.dtype}"
    finite = np.isfinite(data)
    if not finite.all():
        return (
            f"not integer label data: {np.count_nonzero(~finite)} NaN/inf values; "
            "pass a label map (a _dseg image)"
        )
    fractional = data[data != np.round(data)]
    if fractional.size:
        return (
            f"not integer label data: {fractional.size} {data.dtype} values are not whole "
            f"numbers (e.g. {fractional.flat[0]:.4g}); pass a label map (a _dseg image), "
            "not a probability map or an intensity image"
        )
    return None


def _as_labels(data: np.ndarray, name: str) -> np.ndarray:
    """Return ``data`` as an int64 array, or raise :class:`SegmentError` naming ``name``."""
    data = np.asarray(data)
    problem = _label_problem(data)
    if problem is not None:
        raise SegmentError(f"{name}: {problem}")
    return data.astype(np.int64, copy=False)


def _check_same_shape(predicted: np.ndarray, reference: np.ndarray) -> None:
    """Raise :class:`SegmentError` naming both shapes if they differ."""
    if predicted.shape != reference.shape:
        raise SegmentError(
            f"predicted labels have shape {predicted.shape} but the reference has shape "
            f"{reference.shape}; resample the prediction onto the reference grid"
        )


# --------------------------------------------------------------------------------------------
# maths
# --------------------------------------------------------------------------------------------
def contingency_table(
    predicted: np.ndarray, reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count voxels for every (reference label, predicted label) pair.

    Parameters
    ----------
    predicted, reference : (n_voxels,) int arrays
        Labels of the same voxels.

    Returns
    -------
    counts : (n_reference_labels, n_predicted_labels) int64 array
        ``counts[i, j]`` = number of voxels with reference ``ref_labels[i]`` and prediction
        ``pred_labels[j]``; rows sum to the reference class sizes.
    ref_labels, pred_labels : 1-D int64 arrays
        The distinct label values, ascending.
    """
    ref_labels, ref_index = np.unique(reference, return_inverse=True)
    pred_labels, pred_index = np.unique(predicted, return_inverse=True)
    flat = ref_index.ravel() * pred_labels.size + pred_index.ravel()
    counts = np.bincount(flat, minlength=ref_labels.size * pred_labels.size)
    return counts.reshape(ref_labels.size, pred_labels.size), ref_labels, pred_labels


def match_labels(counts: np.ndarray, matchable: np.ndarray) -> dict[int, int]:
    """One-to-one assignment of predicted columns to reference rows maximising the overlap.

    Parameters
    ----------
    counts : (n_ref, n_pred) array
        Contingency table.
    matchable : (n_pred,) bool array
        Columns that may be matched.

    Returns
    -------
    match : dict
        ``{row index: column index}``; rows left without a column (more reference classes than
        matchable predicted labels) are absent.
    """
    columns = np.flatnonzero(matchable)
    rows, cols = linear_sum_assignment(counts[:, columns], maximize=True)
    return {int(r): int(columns[c]) for r, c in zip(rows, cols, strict=True)}


def evaluated_voxels(
    predicted: np.ndarray,
    reference: np.ndarray,
    *,
    ignore_zero: bool = False,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Bool array of the voxels scored: in ``mask`` and, with ``ignore_zero``, non-zero in both.

    Examples
    --------
    >>> evaluated_voxels(np.array([0, 1, 2, 2]), np.array([1, 1, 0, 2]), ignore_zero=True)
    array([False,  True, False,  True])
    """
    keep = np.ones(reference.shape, dtype=bool) if mask is None else np.asarray(mask, bool)
    if ignore_zero:
        keep = keep & (reference != 0) & (predicted != 0)
    return keep


def _evaluate(
    predicted, reference, *, voxel_size, voxel_volume_ml, units, ignore_zero, mask=None
) -> dict:
    """Shared body of :func:`evaluate_labels` and :func:`evaluate_files` (see there)."""
    predicted = _as_labels(predicted, "predicted")
    reference = _as_labels(reference, "reference")
    _check_same_shape(predicted, reference)
    if mask is not None and np.shape(mask) != reference.shape:
        raise SegmentError(
            f"the mask has shape {np.shape(mask)} but the label maps {reference.shape}; "
            "give a mask on the same grid"
        )
    if not np.any(predicted):
        raise SegmentError(
            "the prediction holds only label 0 (nothing segmented); check the segmentation run"
        )
    keep = evaluated_voxels(predicted, reference, ignore_zero=ignore_zero, mask=mask)
    if not keep.any():
        raise SegmentError(
            "no voxel left to score: the mask is empty, or with ignore_zero no voxel is "
            "non-zero in both maps"
        )
    counts, ref_labels, pred_labels = contingency_table(predicted[keep], reference[keep])
    matchable = pred_labels != 0 if ignore_zero else np.ones(pred_labels.size, dtype=bool)
    match = match_labels(counts, matchable) if matchable.any() else {}
    if sum(counts[r, c] for r, c in match.items()) == 0:
        raise SegmentError(
            "no predicted label overlaps any reference class; check that both label maps "
            "describe the same image (orientation, grid, cropping)"
        )
    ref_sizes, pred_sizes = counts.sum(axis=1), counts.sum(axis=0)
    classes = []
    for i, label in enumerate(ref_labels.tolist()):
        j = match.get(i)
        overlap = int(counts[i, j]) if j is not None else 0
        n_pred = int(pred_sizes[j]) if j is not None else 0
        union = int(ref_sizes[i]) + n_pred - overlap
        classes.append(
            {
                "reference_label": label,
                "matched_label": int(pred_labels[j]) if j is not None else None,
                "dice": 2.0 * overlap / (int(ref_sizes[i]) + n_pred),
                "jaccard": overlap / union,
                "reference_voxels": int(ref_sizes[i]),
                "predicted_voxels": n_pred,
                "overlap_voxels": overlap,
                "reference_volume": float(ref_sizes[i] * voxel_size),
                "predicted_volume": float(n_pred * voxel_size),
            }
        )
    matched = set(match.values())
    return {
        "classes": classes,
        "mean_dice": _mean_dice(classes),
        "mapping": {str(c["reference_label"]): c["matched_label"] for c in classes},
        "unmatched_predicted": [
            int(p) for j, p in enumerate(pred_labels) if j not in matched and matchable[j]
        ],
        "confusion_matrix": {
            "reference_labels": ref_labels.tolist(),
            "predicted_labels": pred_labels.tolist(),
            "counts": counts.tolist(),
        },
        "n_voxels": int(keep.sum()),
        "ignore_zero": bool(ignore_zero),
        "masked": mask is not None,
        "voxel_volume_ml": voxel_volume_ml,
        "units": units,
    }


def _mean_dice(classes: list[dict]) -> float:
    """Mean Dice over the reference's tissue classes: label 0 (background) is reported but not
    averaged, unless it is the only class."""
    scored = [c["dice"] for c in classes if c["reference_label"] != 0]
    return float(np.mean(scored or [c["dice"] for c in classes]))


def evaluate_labels(
    predicted: np.ndarray,
    reference: np.ndarray,
    *,
    voxel_volume_ml: float = 1e-3,
    ignore_zero: bool = False,
    mask: np.ndarray | None = None,
) -> dict:
    """Dice, Jaccard, volumes and confusion matrix of a label map against a reference.

    Predicted labels are matched one-to-one to reference classes with the assignment that
    maximises the summed overlap (``scipy.optimize.linear_sum_assignment`` on the contingency
    table), so label numbering does not matter.

    Parameters
    ----------
    predicted, reference : int arrays of the same shape
        Label maps. Float arrays are accepted when every value is a whole number.
    voxel_volume_ml : float
        Volume of one voxel in mL (1 mm³ = 1e-3 mL).
    ignore_zero : bool
        Treat label 0 as "unlabelled": voxels that are 0 in either map (e.g. outside the mask
        of the run, or unlabelled in the reference) are dropped from every count, and label 0
        is neither reported nor matched.  With ``False`` (default) every voxel counts and 0 is
        a label like any other, reported in ``classes`` but left out of ``mean_dice``.
    mask : bool array of the same shape, optional
        Score only the voxels inside it (e.g. a brain mask).

    Returns
    -------
    result : dict (JSON-serialisable)
        ``classes``: one dict per reference class, ascending, with ``reference_label``,
        ``matched_label`` (None if no predicted label was left for it), ``dice``, ``jaccard``
        (0 when unmatched), ``reference_voxels``, ``predicted_voxels`` (of the matched label),
        ``overlap_voxels``, ``reference_volume`` and ``predicted_volume`` (in ``units``);
        ``mean_dice`` over the reference classes other than 0; ``mapping`` {reference label
        as str: matched predicted label or None}; ``unmatched_predicted`` labels;
        ``confusion_matrix`` with ``reference_labels`` (rows), ``predicted_labels`` (columns)
        and ``counts``; ``n_voxels`` evaluated; ``ignore_zero``; ``masked``;
        ``voxel_volume_ml``; ``units`` ("mL").

    Raises
    ------
    SegmentError
        Shapes differ, data are not whole numbers, the prediction is all 0, or no matched
        label overlaps its reference class.

    Notes
    -----
    For reference class R matched to predicted label P (voxel sets):
    Dice = 2|R ∩ P| / (|R| + |P|), Jaccard = |R ∩ P| / |R ∪ P|.
    """
    if not voxel_volume_ml > 0:
        raise SegmentError(f"voxel_volume_ml must be positive; got {voxel_volume_ml!r}")
    return _evaluate(
        predicted,
        reference,
        voxel_size=float(voxel_volume_ml),
        voxel_volume_ml=float(voxel_volume_ml),
        units="mL",
        ignore_zero=ignore_zero,
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _load_label_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple | None]:
    """Load a label map: ``(data, affine or None, zooms in mm or None)``."""
    if not path.exists():
        raise InputError(path, "no such file; check the path")
    from ._reading import check_regular_file

    check_regular_file(path)  # a folder, FIFO or device is named as such
    try:
        if is_nifti(path):
            from .io import read_nifti

            img, data = read_nifti(path)  # sizes and gzip CRC checked before anything is kept
            _check_output_set(path, img.header)
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise InputError(
                    path,
                    f"expected a 3-D label map; got shape {data.shape}; pass the _dseg "
                    "label image, not a 4-D probability map",
                )
            return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])
        from skimage import io

        data = io.imread(path)
    except InputError:
        raise
    except Exception as exc:  # unreadable or unknown format: report it against the file
        raise InputError(
            path, f"cannot read as a label image ({exc}); use NIfTI, PNG or TIFF"
        ) from exc
    if data.ndim != 2:
        raise InputError(path, f"expected a single-channel 2-D label image; got shape {data.shape}")
    return data, None, None


def _check_output_set(path: Path, header) -> None:
    """Warn when ``path`` is a label map of ``segment`` whose output set has no sidecar.

    The sidecar is the commit record of a set of outputs (written last, retired first on
    ``--overwrite``): a ``_dseg`` without it comes from a run that was killed or is still
    writing, and may belong to another run than the files beside it.
    """
    import warnings

    from .exceptions import DataWarning

    if bytes(header["descrip"]).rstrip(b"\0") != b"segment":
        return
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith("_dseg" + ext):
            stem = name[: -len("_dseg" + ext)]
            break
    else:
        return
    sidecars = [path.with_name(f"{stem}_segment.json"), path.with_name(f"{stem}_dseg.json")]
    if not any(p.exists() for p in sidecars):
        warnings.warn(
            f"{path}: its output set is incomplete (no {sidecars[0].name} or "
            f"{sidecars[1].name}: the run that wrote it was killed or is still writing); "
            "rerun segment run or segment batch",
            DataWarning,
            stacklevel=3,
        )


def _check_affines(predicted_path: Path, aff_pred: np.ndarray, aff_ref: np.ndarray) -> None:
    """Raise :class:`InputError` printing both affines if they differ by more than 1e-3."""
    if not np.allclose(aff_pred, aff_ref, rtol=0, atol=1e-3):
        fmt = {"float_kind": lambda v: f"{v:9.3f}"}
        raise InputError(
            predicted_path,
            "grid differs from the reference; predicted affine:\n"
            f"{np.array2string(aff_pred, formatter=fmt)}\nreference affine:\n"
            f"{np.array2string(aff_ref, formatter=fmt)}\n"
            "resample the prediction onto the reference grid",
        )


def evaluate_files(
    predicted_path: str | Path,
    reference_path: str | Path,
    *,
    ignore_zero: bool = False,
    mask_path: str | Path | None = None,
) -> dict:
    """Evaluate a label file against a reference label file.

    NIfTI files (``.nii``, ``.nii.gz``) are loaded with nibabel; other files (PNG, TIFF) as 2-D
    images with :func:`skimage.io.imread`. Both must have the same shape and, for two NIfTI
    files, affines equal within 1e-3.

    Parameters
    ----------
    predicted_path, reference_path : str or Path
        Label maps (integer data; floats that are whole numbers are accepted).
    ignore_zero : bool
        See :func:`evaluate_labels`.
    mask_path : str or Path, optional
        A mask on the same grid (non-zero = inside): only its voxels are scored.

    Returns
    -------
    result : dict
        As :func:`evaluate_labels`, plus ``predicted_path`` and ``reference_path``, and the
        label names read from look-up tables next to the label maps (``<stem>_dseg.tsv``
        written by ``segment run``, or ``<stem>.tsv``): ``reference_name`` and
        ``matched_name`` in each class when known. For NIfTI
        the voxel volume comes from the reference header zooms (mm³ / 1000 = mL) and
        ``units`` is ``"mL"``. For 2-D images each pixel is taken as 1 mm²: ``units`` is
        ``"mm²"``, the per-class volumes are areas in mm², and ``voxel_volume_ml`` is None.

    Raises
    ------
    InputError
        A file is missing or unreadable, is not integer label data, the shapes or affines
        differ, or the labels do not overlap. The error names the offending file.
    """
    predicted_path, reference_path = Path(predicted_path), Path(reference_path)
    pred, aff_pred, _ = _load_label_file(predicted_path)
    ref, aff_ref, zooms = _load_label_file(reference_path)
    for path, data in ((predicted_path, pred), (reference_path, ref)):
        problem = _label_problem(data)
        if problem is not None:
            raise InputError(path, problem)
    if pred.shape != ref.shape:
        raise InputError(
            predicted_path,
            f"shape {pred.shape} differs from the reference {reference_path.name} shape "
            f"{ref.shape}; resample the prediction onto the reference grid",
        )
    if (aff_pred is None) != (aff_ref is None):
        raise InputError(predicted_path, "compare a NIfTI file with a NIfTI file, not a 2-D image")
    if aff_pred is not None:
        _check_affines(predicted_path, aff_pred, aff_ref)
        voxel_ml = float(np.prod(zooms)) / 1000.0
        sizes = {"voxel_size": voxel_ml, "voxel_volume_ml": voxel_ml, "units": "mL"}
    else:
        sizes = {"voxel_size": 1.0, "voxel_volume_ml": None, "units": "mm²"}
    mask = None
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask_data, _, _ = _load_label_file(mask_path)
        if mask_data.shape != ref.shape:
            raise InputError(
                mask_path, f"mask shape {mask_data.shape} differs from the reference {ref.shape}"
            )
        mask = (mask_data != 0) & np.isfinite(mask_data)
    try:
        result = _evaluate(pred, ref, ignore_zero=ignore_zero, mask=mask, **sizes)
    except SegmentError as exc:
        raise InputError(predicted_path, str(exc)) from None
    result["predicted_path"] = str(predicted_path)
    result["reference_path"] = str(reference_path)
    if mask_path is not None:
        result["mask_path"] = str(mask_path)
    ref_names, pred_names = read_label_names(reference_path), read_label_names(predicted_path)
    for c in result["classes"]:
        if c["reference_label"] in ref_names:
            c["reference_name"] = ref_names[c["reference_label"]]
        if c["matched_label"] in pred_names:
            c["matched_name"] = pred_names[c["matched_label"]]
    return result


def read_label_names(label_path: str | Path) -> dict[int, str]:
    """``{index: name}`` from the look-up table next to a label map, or ``{}``.

    Looks for ``<stem>.tsv`` (e.g. ``head_t1_labels.tsv``), then, for ``<stem>_dseg.*``,
    ``<stem>_dseg.tsv`` as ``segment run`` writes it; columns ``index`` and ``name``.
    """
    from segment.io import scan_stem

    label_path = Path(label_path)
    table = label_path.with_name(f"{scan_stem(label_path)}.tsv")
    if not table.is_file():
        return {}
    try:
        lines = table.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        index, name = header.index("index"), header.index("name")
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        return {int(row[index]): row[name] for row in rows}
    except (OSError, ValueError, IndexError):
        return {}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """Render a result of :func:`evaluate_labels` as a fixed-width text table.

    One row per reference class (class, matched label, Dice, Jaccard, reference and predicted
    volume in ``result["units"]``), the mean Dice, then the confusion matrix (rows: reference,
    columns: predicted, voxel counts).
    """
    units = result.get("units", "mL")
    header = (
        f"{'class':>6} {'matched':>8} {'Dice':>7} {'Jaccard':>8} "
        f"{'ref ' + units:>12} {'pred ' + units:>12}"
    )
    lines = [header, "-" * len(header)]
    for c in result["classes"]:
        matched = "-" if c["matched_label"] is None else str(c["matched_label"])
        names = [c.get("reference_name"), c.get("matched_name")]
        if any(names):
            lines.append(f"{'':>6} {' / '.join(n or '?' for n in names)}")
        lines.append(
            f"{c['reference_label']:>6} {matched:>8} {c['dice']:>7.4f} {c['jaccard']:>8.4f} "
            f"{c['reference_volume']:>12.3f} {c['predicted_volume']:>12.3f}"
        )
    lines.append(f"{'mean':>6} {'':>8} {result['mean_dice']:>7.4f}")
    if result.get("unmatched_predicted"):
        lines.append(f"unmatched predicted labels: {result['unmatched_predicted']}")
    cm = result["confusion_matrix"]
    width = max(8, *(len(str(v)) + 1 for row in cm["counts"] for v in row))
    lines += ["", "confusion matrix (rows: reference, columns: predicted; voxels)"]
    corner = "ref/pred"
    lines.append(f"{corner:>8}" + "".join(f"{p:>{width}}" for p in cm["predicted_labels"]))
    for label, row in zip(cm["reference_labels"], cm["counts"], strict=True):
        lines.append(f"{label:>8}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
