"""The batch's resume store: what each scan writes, and whether its outputs are already made.

A scan's JSON sidecar is its record: :func:`plan` compares what it recorded (the result-changing
options of :data:`segment._options.OPTIONS`, the pipeline file, the input and mask files) with
what this batch would do, and decides to skip, redo or refuse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import naming
from ._options import resume_key
from .exceptions import SegmentError
from .io import remove_stale_temporaries
from .summary import row

__all__ = ["ScanTask", "plan", "clean_stale_temporaries"]

_NIFTI = (".nii", ".nii.gz")


@dataclass
class ScanTask:
    """One scan of a batch: where it is, where its outputs go and how to make them.

    Attributes
    ----------
    input : Path
        Absolute path of the scan.
    rel : str
        Its path relative to the input folder (POSIX), as shown in the summary.
    paths : OutputPaths
        Its outputs.
    settings : dict
        Final settings (model options, ``mask``, ``probseg``, ``qc``).
    em_options : dict
        Keyword options for :func:`segment.api.segment_file` (model + in-scan scheduler).
    extra : dict
        Added to the JSON sidecar: pipeline, final options and their sources, input stat.
    overwrite : bool
        Replace existing (incomplete or other-options) outputs.
    label_map : dict or None
        ``LabelMap`` of the BIDS ``_probseg.json``; ``None`` outside BIDS mode.
    mask : str or None
        This scan's mask: ``"none"``, ``"auto"`` or the absolute path of its mask file;
        ``None`` means ``settings["mask"]``.
    """

    input: Path
    rel: str
    paths: naming.OutputPaths
    settings: dict[str, Any]
    em_options: dict[str, Any]
    extra: dict[str, Any]
    overwrite: bool = False
    label_map: dict[str, str] | None = None
    mask: str | None = None

    def class_names(self) -> list[str] | None:
        """Class names of labels 1..K (BIDS mode), which name the fraction files."""
        if self.label_map is None:
            return None
        return [self.label_map[str(k)] for k in range(len(self.label_map))]


def plan(
    scans: Sequence[Path],
    input_dir: Path,
    output_root: Path,
    *,
    settings: dict[str, Any],
    extra: dict[str, Any],
    em_options: dict[str, Any],
    bids: bool = False,
    desc: str | None = None,
    class_names: Sequence[str] = (),
    resume: bool = True,
    overwrite: bool = False,
    masks: dict[Path, str | SegmentError] | None = None,
) -> tuple[list[ScanTask], dict[str, dict[str, Any]]]:
    """Tasks to run, and the rows already decided (``skipped``, or ``failed`` before running).

    A scan is complete when its sidecar and every other expected output exist and the sidecar
    records the same result-changing options (:func:`segment._options.resume_key`), pipeline,
    input (SHA-256, or the same size and modification time) and mask file (SHA-256, or the
    same path, size and modification time).
    Complete scans are skipped (``resume``); with ``overwrite`` every scan is redone.  Outputs
    of a killed run (no sidecar) are redone when resuming; outputs made with other options,
    input or mask are only replaced with ``overwrite``.

    ``masks`` gives each scan's mask (:meth:`MaskSpec.for_scan`), or the error that says why it
    has none (the scan fails); scans not in it use ``settings["mask"]``.
    """
    tasks, decided, owners = [], {}, {}
    for scan in scans:
        rel = scan.relative_to(input_dir).as_posix()
        paths = _output_paths(scan, rel, output_root, bids, desc)
        if paths.sidecar in owners:
            decided[rel] = row(rel, "failed", error=(
                f"{scan}: writes the same outputs as {owners[paths.sidecar]}; rename one of them "
                "or use --pattern to choose"))  # fmt: skip
            continue
        owners[paths.sidecar] = rel
        mask = (masks or {}).get(scan, str(settings.get("mask", "none")))
        if isinstance(mask, Exception):
            decided[rel] = row(rel, "failed", error=str(mask))
            continue
        task_extra = {**extra, "input_stat": _stat(scan), "mask_file": _mask_record(mask)}
        label_map = None
        if bids:
            task_extra["Sources"] = [f"bids:raw:{rel}"]
            if task_extra["mask_file"] and Path(mask).is_relative_to(input_dir):
                source = Path(mask).relative_to(input_dir).as_posix()
                task_extra["Sources"].append(f"bids:raw:{source}")
            label_map = {str(k): name for k, name in enumerate(class_names)}
        task = ScanTask(scan, rel, paths, settings, em_options, task_extra, overwrite, label_map,
                        mask)  # fmt: skip
        state, detail = ("redo", "") if overwrite else _existing_state(task)
        if state == "complete" and resume:
            decided[rel] = row(rel, "skipped", **detail)
        elif state in ("complete", "different") and not overwrite:
            why = "exist" if state == "complete" else f"exist and were made with {detail}"
            keep = "" if resume or state == "different" else " or --resume to keep them"
            error = f"{paths.sidecar}: outputs {why}; pass --overwrite to redo them{keep}"
            decided[rel] = row(rel, "failed", error=error)
        else:
            # "missing" too: if a worker dies while writing, the retry replaces what it left
            task.overwrite = overwrite or (resume and state in ("incomplete", "missing"))
            tasks.append(task)
    return tasks, decided


def _output_paths(scan: Path, rel: str, root: Path, bids: bool, desc: str | None):
    if bids:
        return naming.bids_output_paths(rel, root, desc=desc)
    kind = "nifti" if scan.name.lower().endswith(_NIFTI) else "image"
    return naming.plain_output_paths(scan, root / Path(rel).parent, kind=kind)


def _stat(path: Path) -> dict[str, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _mask_record(mask: str) -> dict[str, Any] | None:
    """``mask_file`` of the sidecar: the mask file's path, size and mtime (None without one)."""
    if mask.lower() in ("none", "auto"):
        return None
    return {"path": mask, **(_stat(Path(mask)) or {})}


def _expected(task: ScanTask, recorded_k: int | None = None) -> list[Path]:
    """The outputs a complete scan has (``recorded_k``: the K its sidecar says, for -k auto)."""
    paths = task.paths
    wanted = [paths.dseg, paths.sidecar]
    wanted += [paths.probseg] * task.settings["probseg"] + [paths.qc] * task.settings["qc"]
    if task.label_map is not None and task.settings["probseg"]:
        wanted.append(paths.probseg_sidecar)
    if task.settings.get("pve"):
        k = task.settings["n_components"]
        k = k if isinstance(k, int) else recorded_k  # -k auto: BIDS names one file per class
        if isinstance(k, int) or task.label_map is None:
            wanted += naming.pve_output_paths(paths, k or 0, task.class_names())
    return wanted


def _existing_state(task: ScanTask) -> tuple[str, Any]:
    """``("missing"|"incomplete"|"complete"|"different", detail)`` of a scan's outputs."""
    expected = _expected(task)
    if not task.paths.sidecar.exists():
        return ("incomplete" if any(p.exists() for p in expected) else "missing"), ""
    try:
        record = json.loads(task.paths.sidecar.read_text())
    except (OSError, ValueError):
        return "incomplete", ""
    model = record.get("model") if isinstance(record, dict) else None
    expected = _expected(task, (model or {}).get("n_components"))
    if not all(p.exists() for p in expected):
        return "incomplete", ""
    old = record.get("final_options")
    drawn = (old if isinstance(old, dict) else {}).get("qc_histogram", "linear")
    if task.settings["qc"] and drawn != task.settings.get("qc_histogram", "linear"):
        return "incomplete", ""  # only the picture differs: redo the scan, its QC redrawn
    new = json.loads(json.dumps(resume_key(task.extra["final_options"])))
    if isinstance(old, dict):  # options added since (e.g. pve) were at their default then
        old = json.loads(json.dumps(resume_key(old)))
    if old != new:
        if not isinstance(old, dict):
            return "different", "options that were not recorded"
        changed = [f"{k}={old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
        return "different", "other options (" + "; ".join(changed) + ")"
    old_pipeline = (record.get("pipeline") or {}).get("sha256")
    new_pipeline = (task.extra.get("pipeline") or {}).get("sha256")
    if old_pipeline != new_pipeline:
        return "different", "another pipeline file"
    if not _same_input(task.input, record):
        return "different", f"another version of the input {task.input.name}"
    if "mask_file" in record:  # not recorded before per-scan masks: options tell enough
        changed = _mask_change(record["mask_file"], task.extra.get("mask_file"))
        if changed:
            return "different", changed
    model, volumes = record.get("model", {}), record.get("volumes") or {}
    volume_columns = {
        f"volume_ml_{k}": v for k, v in enumerate(volumes.get("volume_ml") or [], start=1)
    }
    return "complete", {"K": model.get("n_components"), "iterations": model.get("n_iter"),
                        "converged": model.get("converged"),
                        "log_likelihood": model.get("log_likelihood"),
                        "dseg": str(task.paths.dseg),
                        "volume_estimate": volumes.get("estimate", ""),
                        **volume_columns}  # fmt: skip


def _same_input(path: Path, record: dict) -> bool:
    if record.get("input_stat") and record["input_stat"] == _stat(path):
        return True  # same size and modification time: no need to hash again
    from .sidecar import file_sha256

    inputs = record.get("inputs") or [{}]
    try:
        return inputs[0].get("sha256") == file_sha256(path)
    except OSError:
        return False


def _mask_change(old: dict | None, new: dict | None) -> str:
    """How the mask file of a scan changed since its outputs were made (``""``: it did not).

    As for the input, the content counts: the same path, size and modification time, or the
    same SHA-256 (so a dataset moved with its masks is still complete).
    """
    before = (old or {}).get("path", "no mask file")
    now = (new or {}).get("path", "no mask file")
    if old is None or new is None:
        return "" if old is new else f"another mask ({before}, now {now})"
    same_path = before == now
    if same_path and all(old.get(k) == new.get(k) for k in ("size", "mtime_ns")):
        return ""
    from .sidecar import file_sha256

    try:
        if old.get("sha256") == file_sha256(new["path"]):
            return ""
    except OSError:
        pass
    if same_path:
        return f"another version of the mask {Path(now).name}"
    return f"another mask ({before}, now {now})"


def clean_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-<token>`` files left under ``root`` by dead processes.

    See :func:`segment.io.remove_stale_temporaries`: zombies count as dead, and a batch
    writing into the same folder is left alone.
    """
    return remove_stale_temporaries(root)
