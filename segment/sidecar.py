"""The JSON sidecar: what was fitted, how, on what, and the tissue volumes.

Everything needed to reproduce a run: the inputs with their SHA-256, the options and seed, the
software version, the command line, the fitted parameters and the log-likelihood trace.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def label_volumes(
    labels: np.ndarray,
    soft_counts: np.ndarray,
    voxel_volume_ml: float,
    fraction_volumes: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Voxel count and volume (mL) of each label, hard, soft and from the fractions.

    Parameters
    ----------
    labels : array of uint8 labels (0 = outside the mask, 1..K)
    soft_counts : (K,) array, sum of each component's responsibilities over the voxels
    voxel_volume_ml : float, volume of one voxel in mL
    fraction_volumes : (K,) array, optional
        Volumes in mL from the partial-volume fractions (``pve=True``).

    Returns
    -------
    list of dict, one per label 1..K: ``label``, ``n_voxels``, ``volume_ml`` (hard labels),
    ``soft_volume_ml`` (sum of posteriors) and, with fractions, ``fraction_volume_ml``
    """
    flat = np.asarray(labels).reshape(-1)
    counts = np.zeros(max(len(soft_counts) + 1, int(flat.max(initial=0)) + 1), dtype=np.int64)
    slab = 1 << 22  # bincount converts to intp: count in slabs, not a 64-bit copy of the map
    for start in range(0, len(flat), slab):
        part = np.bincount(flat[start : start + slab], minlength=len(counts))
        counts[: len(part)] += part
    return [
        {
            "label": k + 1,
            "n_voxels": int(counts[k + 1]),
            "volume_ml": round_ml(counts[k + 1] * voxel_volume_ml),
            "soft_volume_ml": round_ml(soft_counts[k] * voxel_volume_ml),
            **({} if fraction_volumes is None
               else {"fraction_volume_ml": round_ml(fraction_volumes[k])}),
        }
        for k in range(len(soft_counts))
    ]  # fmt: skip


#: Decimals kept in volumes (mL): 0.001 mL = 1 mm^3, below the size of a voxel.
ML_DECIMALS = 3


def round_ml(value: float) -> float:
    """A volume in mL rounded to :data:`ML_DECIMALS` (no ``553.9250000000001``)."""
    return round(float(value), ML_DECIMALS)


def round_significant(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits (0.0010000000000000002 -> 0.001)."""
    return float(f"{float(value):.{digits}g}")


def name_labels(record: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Put the label names into a sidecar record, in place (and return it).

    Each row of ``record["labels"]`` gets its ``name``, and ``record["label_names"]`` maps
    every value of the label map to its name: ``"0"`` is outside the mask, ``"1"``..``"K"``
    the classes, as in the run's ``<stem>_dseg.tsv``.
    """
    from .naming import OUTSIDE_NAME

    for row in record.get("labels", []):
        row["name"] = names[row["label"] - 1]
    record["label_names"] = {"0": OUTSIDE_NAME, **{str(k): n for k, n in enumerate(names, 1)}}
    return record


def tissue_volumes(labels: list[dict[str, Any]], fractions: bool) -> dict[str, Any]:
    """The sidecar's ``volumes`` record: one volume per label and which estimate it is.

    From the partial-volume fractions when they were computed (``pve=True``), else from the
    posteriors (the sum of each label's probabilities); ``labels`` from :func:`label_volumes`.
    """
    key, estimate = (
        ("fraction_volume_ml", "fractions") if fractions else ("soft_volume_ml", "posteriors")
    )
    return {
        "estimate": estimate,
        "unit": "mL",
        "volume_ml": [row[key] for row in labels],
        "description": (
            "sum over voxels of each label's partial-volume fraction x voxel volume"
            if fractions
            else "sum over voxels of each label's posterior probability x voxel volume; "
            "not partial-volume fractions (see --pve)"
        ),
    }


def model_record(estimator) -> dict[str, Any]:
    """Fitted parameters and the fit trace of a :class:`~segment.GaussianMixtureEM`."""
    return {
        "n_components": int(estimator.n_components),
        "n_channels": int(estimator.n_features_in_),
        "means": estimator.means_.tolist(),
        "covariances": estimator.covariances_.tolist(),
        "variances": np.diagonal(estimator.covariances_, axis1=1, axis2=2).tolist(),
        "weights": estimator.weights_.tolist(),
        "variance_floor": np.asarray(estimator.variance_floor_).tolist(),
        "fit_path": estimator.fit_path_,
        "n_iter": int(estimator.n_iter_),
        "converged": bool(estimator.converged_),
        "warnings": list(getattr(estimator, "warnings_", [])),
        "tol": float(estimator.tol),
        "max_iter": int(estimator.max_iter),
        "seed": estimator.random_state,
        "initial_log_likelihood": float(estimator.initial_log_likelihood_),
        "log_likelihood": float(estimator.log_likelihood_),
        "log_likelihood_per_voxel": float(estimator.log_likelihood_ / estimator.n_samples_),
        "log_likelihood_trace": [float(value) for value in estimator.log_likelihood_trace_],
        "n_voxels_fitted": float(estimator.n_samples_),
        "objective": getattr(estimator, "objective_", "log-likelihood"),
        "mrf_beta": float(estimator.mrf_beta),
        "mrf_sweeps": int(getattr(estimator, "n_mrf_sweeps_", 0)),
        "mrf_last_change": (
            float(estimator.mrf_change_) if getattr(estimator, "mrf_change_", None) else None
        ),
        "bias_field": _bias_record(estimator),
    }


def _bias_record(estimator) -> dict[str, Any] | None:
    """Parameters of the fitted bias field, or None."""
    if getattr(estimator, "bias_field_shape_", None) is None:
        return None
    agreement = getattr(estimator, "bias_agreement_", None)
    return {
        "model": "Gaussian-smoothed weighted log residuals on a coarse grid, linear interpolation",
        "status": estimator.bias_status_,
        "smoothness_mm": float(estimator.bias_smoothness),
        "cell_voxels": list(estimator.bias_cells_),
        "class_agreement": None if agreement is None else round(float(agreement), 3),
        "fitted_on_every_nth_voxel": list(getattr(estimator, "bias_sampling_", ())),
        "range": [round(float(v), 4) for v in estimator.bias_field_range_],
    }


def build_sidecar(
    *,
    estimator,
    labels: np.ndarray,
    soft_counts: np.ndarray,
    voxel_volume_ml: float,
    inputs: list[Path],
    options: dict[str, Any],
    mask: dict[str, Any],
    timings: dict[str, float],
    outputs: dict[str, str],
    command_line: list[str] | None = None,
    fraction_volumes: np.ndarray | None = None,
    partial_volume: dict[str, Any] | None = None,
    model_selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the sidecar dictionary (JSON-serialisable).

    ``model_selection`` (``n_components="auto"``): how K was chosen, with the BIC curve.
    """
    volumes = label_volumes(labels, soft_counts, voxel_volume_ml, fraction_volumes)
    record = {
        "software": {
            "name": "segment",
            "version": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "command_line": list(sys.argv if command_line is None else command_line),
        "inputs": [
            {"path": str(path), "sha256": file_sha256(path)} for path in inputs if path is not None
        ],
        "options": options,
        "mask": mask,
        "model": model_record(estimator),
        "labels": volumes,
        "volumes": tissue_volumes(volumes, fraction_volumes is not None),
        "partial_volume": partial_volume,
        "voxel_volume_ml": round_significant(voxel_volume_ml),
        "timings_s": {key: round(float(value), 4) for key, value in timings.items()},
        "outputs": outputs,
    }
    if model_selection is not None:
        record["model_selection"] = model_selection
    return record


def dumps(record: dict[str, Any]) -> str:
    """Serialise a sidecar with stable key order and a trailing newline."""
    return json.dumps(record, indent=2, default=_to_builtin) + "\n"


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def missing_outputs(sidecar_path: str | Path) -> list[Path]:
    """Outputs of a set that are not there: ``[]`` when the set is complete.

    The sidecar is the set's commit record (moved into place last, retired first when the
    set is replaced), so a missing sidecar means an incomplete set: it is returned alone.
    Otherwise the files its ``outputs`` name (relative to its folder) that do not exist.
    """
    sidecar_path = Path(sidecar_path)
    try:
        record = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return [sidecar_path]
    outputs = record.get("outputs") if isinstance(record, dict) else None
    names = outputs.values() if isinstance(outputs, dict) else []
    return [sidecar_path.parent / name for name in names
            if not (sidecar_path.parent / str(name)).exists()]  # fmt: skip
