"""Compare partial-volume fraction maps: mean absolute error and volume error per class.

``segment evaluate PREDICTED --reference-fractions FILE``; label maps are compared by
:mod:`segment.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .exceptions import InputError
from .naming import is_nifti

__all__ = ["FRACTION_TOLERANCE", "evaluate_fractions", "evaluate_fraction_files",
           "format_fraction_table"]  # fmt: skip


#: Values this far outside [0, 1] are rounding, not an error (float32 maps).
FRACTION_TOLERANCE = 1e-4


def evaluate_fractions(
    predicted: np.ndarray, reference: np.ndarray, *, voxel_volume_ml: float = 1e-3
) -> dict:
    """Mean absolute fraction error and volume error of each class.

    Parameters
    ----------
    predicted, reference : (*S, K) arrays
        Class fractions (or probabilities read as fractions), classes in the same order.
        Voxels where both sum to 0 (outside the mask) are left out.
    voxel_volume_ml : float

    Returns
    -------
    dict
        ``classes``: per class ``class`` (1..K), ``fraction_mae``, ``reference_volume_ml``,
        ``predicted_volume_ml``, ``volume_error_percent``; ``mean_fraction_mae``,
        ``n_voxels`` compared.

    Examples
    --------
    >>> ref = np.array([[1.0, 0.0], [0.5, 0.5]])
    >>> result = evaluate_fractions(np.array([[0.9, 0.1], [0.5, 0.5]]), ref)
    >>> [round(c["fraction_mae"], 3) for c in result["classes"]]
    [0.05, 0.05]
    """
    K = reference.shape[-1]
    pred = np.asarray(predicted, np.float64).reshape(-1, K)
    ref = np.asarray(reference, np.float64).reshape(-1, K)
    inside = (ref.sum(1) > 0) | (pred.sum(1) > 0)
    pred, ref = pred[inside], ref[inside]
    mae = np.abs(pred - ref).mean(0) if len(ref) else np.zeros(K)
    v_pred, v_ref = pred.sum(0) * voxel_volume_ml, ref.sum(0) * voxel_volume_ml
    classes = [
        {
            "class": k + 1,
            "fraction_mae": float(mae[k]),
            "reference_volume_ml": float(v_ref[k]),
            "predicted_volume_ml": float(v_pred[k]),
            "volume_error_percent": (
                float(100 * (v_pred[k] - v_ref[k]) / v_ref[k]) if v_ref[k] > 0 else None
            ),
        }
        for k in range(K)
    ]
    return {"classes": classes, "mean_fraction_mae": float(mae.mean()),
            "n_voxels": int(inside.sum())}  # fmt: skip


def _load_fraction_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, float]:
    """A fraction map: ``(data (*S, K), affine or None, voxel volume in mL)``."""
    if not path.is_file():
        raise InputError(path, "no such file; check the path")
    try:
        if is_nifti(path):
            import nibabel as nib

            img = nib.load(path)
            data = np.asarray(img.get_fdata(dtype=np.float32))
            if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, 1, 1, K) and the like
                data = data[:, :, :, 0]
            if data.ndim != 4:
                raise InputError(
                    path, f"expected a 4-D fraction map (X, Y, Z, K); got shape {data.shape}"
                )
            zooms = img.header.get_zooms()[:3]
            return data, img.affine, float(np.prod(zooms)) / 1000.0
        import tifffile

        pages = np.asarray(tifffile.imread(path), np.float32)
    except InputError:
        raise
    except Exception as exc:  # unreadable or unknown format: report it against the file
        raise InputError(
            path, f"cannot read as a fraction map ({exc}); use a 4-D NIfTI or a K-page TIFF"
        ) from exc
    if pages.ndim != 3:
        raise InputError(path, f"expected a K-page 2-D TIFF; got shape {pages.shape}")
    return np.moveaxis(pages, 0, -1), None, 1e-3


def evaluate_fraction_files(predicted_path: str | Path, reference_path: str | Path) -> dict:
    """Evaluate a fraction map (``<stem>_pve``) against a reference fraction map.

    Both are 4-D NIfTI (X, Y, Z, K) or K-page TIFFs (2-D, pixels taken as 1 mm^3), classes
    in the same order (our labels ascend in mean intensity). A ``_probseg`` map may be given
    as ``predicted`` to read posteriors as fractions.

    Raises
    ------
    InputError
        A file is missing or unreadable, the grids or class counts differ, or the reference
        has values outside [0, 1]; the message names the file.
    """
    predicted_path, reference_path = Path(predicted_path), Path(reference_path)
    pred, aff_pred, _ = _load_fraction_file(predicted_path)
    ref, aff_ref, voxel_ml = _load_fraction_file(reference_path)
    for path, data in ((reference_path, ref), (predicted_path, pred)):
        finite = np.isfinite(data)
        if not finite.all():
            raise InputError(path, "fraction map has NaN or inf values; fractions lie in [0, 1]")
        low, high = float(data.min()), float(data.max())
        if low < -FRACTION_TOLERANCE or high > 1 + FRACTION_TOLERANCE:
            raise InputError(
                path, f"fraction map values span [{low:.4g}, {high:.4g}], outside [0, 1]"
            )
    if ref.shape[:-1] != pred.shape[:-1]:
        raise InputError(
            reference_path,
            f"grid {ref.shape[:-1]} differs from the prediction {predicted_path.name} grid "
            f"{pred.shape[:-1]}; resample it onto the prediction's grid",
        )
    if ref.shape[-1] != pred.shape[-1]:
        raise InputError(
            reference_path,
            f"has {ref.shape[-1]} classes but the prediction {predicted_path.name} has "
            f"{pred.shape[-1]}; give one volume per class, in label order",
        )
    if (aff_pred is None) != (aff_ref is None):
        raise InputError(reference_path, "compare a NIfTI file with a NIfTI file, not a TIFF")
    if aff_ref is not None and not np.allclose(aff_pred, aff_ref, rtol=0, atol=1e-3):
        raise InputError(
            reference_path,
            "grid differs from the prediction: affine "
            f"{np.round(aff_ref, 3).tolist()} vs {np.round(aff_pred, 3).tolist()}",
        )
    result = evaluate_fractions(pred, ref, voxel_volume_ml=voxel_ml)
    result["predicted_path"] = str(predicted_path)
    result["reference_path"] = str(reference_path)
    return result


def format_fraction_table(result: dict) -> str:
    """Render :func:`evaluate_fractions` as a fixed-width table, one row per class."""
    header = (
        f"{'class':>6} {'fraction MAE':>13} {'ref mL':>12} {'pred mL':>12} {'volume error':>13}"
    )
    lines = [header, "-" * len(header)]
    for c in result["classes"]:
        error = (
            "n/a" if c["volume_error_percent"] is None else f"{c['volume_error_percent']:+.2f} %"
        )
        lines.append(
            f"{c['class']:>6} {c['fraction_mae']:>13.4f} {c['reference_volume_ml']:>12.3f} "
            f"{c['predicted_volume_ml']:>12.3f} {error:>13}"
        )
    lines.append(f"{'mean':>6} {result['mean_fraction_mae']:>13.4f}")
    return "\n".join(lines)
