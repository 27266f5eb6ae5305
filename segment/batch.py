"""Segment every scan of a folder, several at once, locally or on a dask.distributed cluster.

The steps, each a small function:

1. :func:`discover` (or :func:`discover_bids`) lists the scans, sorted, so runs are
   deterministic;
2. :func:`plan` gives each scan its outputs (input sub-folders mirrored, or BIDS-derivative
   names) and decides, from what is already on disk, whether it is ``skipped`` (complete and
   made with the same options, input and pipeline), to be run, or ``failed`` (outputs made with
   other options and no ``overwrite``; two inputs that would write the same outputs;
   a scan whose own mask cannot be found);
3. :func:`run_batch` submits one :func:`run_task` per scan to a Dask executor -- a
   ``distributed.LocalCluster`` of ``jobs`` processes by default, or any running cluster given by
   its ``tcp://`` address -- and collects results as they complete.  ``run_task`` never raises:
   a failing scan becomes a ``failed`` row, and no scan's failure stops another.

Each scan may have its own mask (:class:`MaskSpec`): a template such as
``{stem}_brainmask.nii.gz``, or in BIDS mode (``bids``) the brain mask a preprocessing
pipeline left in the dataset's derivatives (:func:`find_bids_mask`).  A file used as another
scan's mask is not itself segmented.

``batch_summary.tsv`` is rewritten (atomically) after every finished scan, so a killed batch
still leaves a valid summary of what finished.  Every output file is written under a temporary
name and renamed into place, and the JSON sidecar comes last, so a killed batch leaves no
half-written file: leftover ``.*.tmp-<pid>-*`` files of dead processes are removed by the next
run, which redoes the scans whose sidecar is missing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import string
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import __version__, naming
from .exceptions import InputError, SegmentError
from .io import (
    SUPPORTED_EXTENSIONS,
    atomic_write,
    is_supported,
    kill_point,
    pid_alive,
    remove_stale_temporaries,
    scan_stem,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "MASK_PLACEHOLDERS",
    "ScanTask",
    "BatchResult",
    "MaskSpec",
    "discover",
    "discover_bids",
    "check_bids_app",
    "find_bids_mask",
    "plan",
    "run_task",
    "run_batch",
    "clean_stale_temporaries",
    "read_summary",
]

#: Columns of ``batch_summary.tsv``.
SUMMARY_COLUMNS = ("input", "status", "error", "K", "iterations", "converged", "log_likelihood",
                   "seconds", "dseg", "warnings")  # fmt: skip
SUMMARY_NAME = "batch_summary.tsv"
#: Options added after sidecars already recorded ``final_options``: a sidecar without them
#: was made with their default.
_ADDED_OPTIONS = ("pve", "qc_histogram")
_NIFTI = (".nii", ".nii.gz")
#: How long to wait for a ``tcp://`` scheduler to answer.
CONNECT_TIMEOUT = "10s"
#: Placeholders of a per-scan mask template, e.g. ``{stem}_brainmask.nii.gz``.
MASK_PLACEHOLDERS = ("stem", "rel")
#: Entities a BIDS brain mask must share with its scan when both have them.
_BIDS_MASK_ENTITIES = ("acq", "run", "rec")
#: ``space-`` labels of a brain mask on the scan's own grid (preferred after no ``space-``).
_NATIVE_SPACES = ("orig", "T1w")


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


@dataclass
class BatchResult:
    """Rows of the summary (one per scan, input order) and where it was written."""

    rows: list[dict[str, Any]]
    summary: Path
    output_root: Path
    n_failed: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_failed = sum(row["status"] == "failed" for row in self.rows)


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskSpec:
    """How each scan of a batch finds its mask.

    Parse one with :meth:`parse`; :meth:`for_scan` gives a scan's mask.

    Attributes
    ----------
    kind : {"none", "auto", "file", "template", "bids"}
        No mask; the automatic foreground of each scan; one mask file for every scan; a
        template with placeholders; the brain mask in the BIDS derivatives.
    text : str
        The specification as given.
    """

    kind: str
    text: str

    @classmethod
    def parse(cls, spec: str | Path | None, *, bids: bool = False) -> MaskSpec:
        """Classify and check a mask specification.

        Parameters
        ----------
        spec : str, Path or None
            ``None``/``"none"``, ``"auto"``, ``"bids"`` (BIDS mode only), a template holding
            ``{stem}`` (the scan's name without its extension, :func:`segment.io.scan_stem`)
            and/or ``{rel}`` (the scan's folder relative to the input folder, ``.`` at the top),
            or the path of one mask file.  Anything with a brace is a template; a literal brace
            in a file name is written ``{{`` or ``}}``.
        bids : bool
            Whether the batch is in BIDS mode.

        Raises
        ------
        SegmentError
            A malformed template, an unknown placeholder, or ``"bids"`` outside BIDS mode.

        Examples
        --------
        >>> MaskSpec.parse("{stem}_brainmask.nii.gz").kind
        'template'
        >>> MaskSpec.parse("brain.nii.gz").kind, MaskSpec.parse(None).kind
        ('file', 'none')
        """
        text = "none" if spec is None else str(spec)
        keyword = text.strip().lower()
        if keyword in ("none", "auto"):
            return cls(keyword, text)
        if keyword == "bids":
            if not bids:
                raise SegmentError(
                    "mask 'bids' (each scan's brain mask in the dataset's derivatives) needs "
                    "BIDS mode (--bids); give a file or a template such as "
                    "'{stem}_brainmask.nii.gz' instead"
                )
            return cls("bids", text)
        if "{" not in text and "}" not in text:
            return cls("file", text)
        return cls("template" if _template_fields(text) else "file", text)

    @property
    def fields(self) -> frozenset[str]:
        """The placeholders of a template (empty for the other kinds)."""
        return _template_fields(self.text) if self.kind == "template" else frozenset()

    def for_scan(self, scan: Path, input_dir: Path, *, exclude: Iterable[Path] = ()) -> str:
        """The mask of one scan: ``"none"``, ``"auto"`` or the absolute path of a mask file.

        Parameters
        ----------
        scan : Path
            Absolute path of the scan, inside ``input_dir``.
        input_dir : Path
            The batch's input folder (the BIDS dataset in BIDS mode).
        exclude : paths
            Derivative folders never searched for BIDS masks (our own output folder).

        A relative template is resolved against the scan's folder, or against ``input_dir``
        when it holds ``{rel}`` (so ``masks/{rel}/{stem}_mask.nii.gz`` mirrors the input tree
        under ``input_dir/masks``); a relative file path against the working directory.

        Raises
        ------
        InputError
            The mask file does not exist; no or several BIDS brain masks fit the scan.
        """
        if self.kind in ("none", "auto"):
            return self.kind
        if self.kind == "bids":
            return str(find_bids_mask(scan, input_dir, exclude=exclude))
        if self.kind == "file":
            path = Path(self.text.format() if "{" in self.text or "}" in self.text
                        else self.text).expanduser().absolute()  # fmt: skip
            if not path.exists():
                raise InputError(path, "mask file not found; give a mask file on the scan's "
                                       "grid, 'auto' or 'none'")  # fmt: skip
            return str(path)
        rel = scan.parent.relative_to(input_dir).as_posix()
        path = Path(self.text.format(stem=scan_stem(scan), rel=rel)).expanduser()
        if not path.is_absolute():
            path = (input_dir if "rel" in self.fields else scan.parent) / path
        if not path.exists():
            raise InputError(
                path, f"mask file not found (mask template {self.text!r} for {scan.name})"
            )
        return str(path)


def _template_fields(text: str) -> frozenset[str]:
    """Placeholders of a mask template; SegmentError when malformed or unknown."""
    known = " and ".join("{" + name + "}" for name in MASK_PLACEHOLDERS)
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as error:
        raise SegmentError(
            f"mask template {text!r} is malformed ({error}); the placeholders are {known}; "
            "a literal brace is written {{ or }}"
        ) from None
    found = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in MASK_PLACEHOLDERS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"  # fmt: skip
            raise SegmentError(
                f"mask template {text!r}: unknown placeholder {shown}; the placeholders are "
                f"{known} (a literal brace is written {{{{ or }}}})"
            )
        found.add(name)
    return frozenset(found)


def find_bids_mask(scan: Path, bids_dir: Path, *, exclude: Iterable[Path] = ()) -> Path:
    """The brain mask of a BIDS scan in the dataset's derivatives.

    Looks for ``derivatives/*/sub-<label>/[ses-<label>/]anat/*_desc-brain_mask.nii[.gz]``
    (the standard name, e.g. fMRIPrep's ``sub-01_desc-brain_mask.nii.gz``) whose ``sub`` and
    ``ses`` are the scan's; an ``acq``, ``run`` or ``rec`` entity that both have must be the
    same.  When several fit, those whose ``acq``/``run``/``rec`` are exactly the scan's are
    preferred, then those without ``space-``, then those in ``space-orig`` or
    ``space-T1w``; if several are still left, the scan fails naming them.
    ``derivatives/segment`` (our own outputs) and the folders in ``exclude`` are never searched.

    Parameters
    ----------
    scan : Path
        A scan of the dataset (its name gives the entities).
    bids_dir : Path
        The dataset's root.
    exclude : paths
        Further folders to leave out.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        On the scan: no brain mask fits, or several fit equally well.
    """
    bids_dir = Path(bids_dir)
    entities = naming.parse_bids_entities(scan)
    sub, ses = entities["sub"], entities.get("ses")
    folder = Path(f"sub-{sub}", *([f"ses-{ses}"] if ses else []), "anat")
    skipped = {(bids_dir / "derivatives" / "segment").resolve()}
    skipped |= {Path(p).resolve() for p in exclude}
    found: list[tuple[Path, dict[str, str]]] = []
    for pipeline_dir in sorted((bids_dir / "derivatives").glob("*")):
        if pipeline_dir.name.startswith(".") or pipeline_dir.resolve() in skipped:
            continue
        for path in sorted((pipeline_dir / folder).glob("*_desc-brain_mask.nii*")):
            if path.name.startswith(".") or not path.name.endswith(_NIFTI):
                continue
            try:
                mask = naming.parse_bids_entities(path)
            except ValueError:
                continue
            if (mask["suffix"] == "mask" and mask.get("desc") == "brain"
                    and mask["sub"] == sub and mask.get("ses") == ses
                    and all(mask[key] == entities[key] for key in _BIDS_MASK_ENTITIES
                            if key in mask and key in entities)):  # fmt: skip
                found.append((path, mask))
    if not found:
        name = "_".join([f"sub-{sub}", *([f"ses-{ses}"] if ses else []), "*desc-brain_mask"])
        raise InputError(
            scan,
            f"no brain mask found: nothing matches derivatives/*/{folder.as_posix()}/"
            f"{name}.nii[.gz] in {bids_dir}; give --mask none, auto or a template instead",
        )
    for keep in (
        lambda m: all(m.get(k) == entities.get(k) for k in _BIDS_MASK_ENTITIES),
        lambda m: "space" not in m,
        lambda m: m.get("space") in _NATIVE_SPACES,
    ):
        if len(found) > 1 and any(keep(m) for _, m in found):
            found = [(p, m) for p, m in found if keep(m)]
    if len(found) > 1:
        names = ", ".join(p.relative_to(bids_dir).as_posix() for p, _ in found)
        raise InputError(
            scan,
            f"several brain masks fit: {names}; remove the ones not on this scan's grid or "
            "give the mask with a template (--mask '/path/{stem}_mask.nii.gz')",
        )
    return found[0][0]


def _leave_out_masks(scans: list[Path], masks: dict[Path, Any]) -> list[Path]:
    """``scans`` without the files that are another scan's mask."""
    used = set()
    for scan, mask in masks.items():
        if isinstance(mask, str) and mask not in ("none", "auto"):
            path = Path(mask).resolve()
            if path != scan.resolve():
                used.add(path)
    return [scan for scan in scans if scan.resolve() not in used]


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
def discover(
    input_dir: str | Path,
    patterns: Sequence[str] = (),
    *,
    recursive: bool = False,
    exclude: Iterable[Path] = (),
) -> list[Path]:
    """Scans in ``input_dir``, sorted by relative path.

    Parameters
    ----------
    input_dir : path
    patterns : list of str
        Shell patterns matched case-insensitively against the file name, or, when the
        pattern holds a ``/``, against the end of the path relative to ``input_dir``
        (:meth:`pathlib.PurePath.match`: ``site1/*`` matches ``site1/x.nii`` only).
        Default: every supported type (:data:`segment.io.SUPPORTED_EXTENSIONS`).
    recursive : bool
        Look in sub-folders too.  Hidden files and folders are always left out.
    exclude : paths
        Folders to leave out (e.g. the output folder when it is inside ``input_dir``).

    :func:`run_batch` then leaves out the files that are another scan's mask.
    """
    root = Path(input_dir)
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (here / d).resolve() not in excluded)  # fmt: skip
        if not recursive:
            dirs.clear()
        for name in files:
            rel = (here / name).relative_to(root).as_posix()
            if not name.startswith(".") and _matches(name, rel, patterns):
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _matches(name: str, rel: str, patterns: Sequence[str]) -> bool:
    if not patterns:
        return is_supported(name)
    for pattern in (p.lower() for p in patterns):
        if "/" in pattern:  # path pattern: "*" stays within one folder, as in the shell
            if PurePosixPath(rel.lower()).match(pattern):
                return True
        elif fnmatch.fnmatchcase(name.lower(), pattern):
            return True
    return False


def discover_bids(
    bids_dir: str | Path,
    *,
    subjects: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
) -> list[Path]:
    """Anatomical NIfTI scans of a BIDS dataset (``sub-*/[ses-*/]anat/*.nii[.gz]``).

    ``subjects``/``sessions`` are labels with or without the ``sub-``/``ses-`` prefix;
    ``suffixes`` are e.g. ``T1w``.  Empty filters keep everything.
    """
    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise InputError(root, "not a BIDS dataset (no dataset_description.json); drop --bids")
    keep_sub = {s.removeprefix("sub-") for s in subjects}
    keep_ses = {s.removeprefix("ses-") for s in sessions}
    found = []
    for path in sorted([*root.glob("sub-*/anat/*"), *root.glob("sub-*/ses-*/anat/*")]):
        if path.name.startswith(".") or not path.name.lower().endswith(_NIFTI):
            continue
        try:
            entities = naming.parse_bids_entities(path)
        except ValueError:
            continue
        if ((keep_sub and entities["sub"] not in keep_sub)
                or (keep_ses and entities.get("ses") not in keep_ses)
                or (suffixes and entities["suffix"] not in suffixes)):  # fmt: skip
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_bids_app(bids_dir: str | Path, output_dir: str | Path, labels: Sequence[str]) -> None:
    """Refuse BIDS-App arguments that cannot work, before anything is written.

    Parameters
    ----------
    bids_dir : path
        The raw BIDS dataset: it must hold ``dataset_description.json``.
    output_dir : path
        The derivative dataset's folder: not the raw dataset itself nor inside one of its
        ``sub-*`` folders (the outputs would become part of the raw data).
    labels : sequence of str
        Participant labels, with or without ``sub-``; each must have a ``sub-<label>`` folder.

    Raises
    ------
    InputError
        The first problem found, naming the file, folder or label.
    """
    raw = Path(bids_dir).absolute()
    if not (raw / "dataset_description.json").is_file():
        raise InputError(raw, "not a BIDS dataset: no dataset_description.json in it")
    out = Path(output_dir).absolute()
    resolved_raw, resolved_out = raw.resolve(), out.resolve()
    if resolved_out == resolved_raw:
        raise InputError(out, "is the raw BIDS dataset itself; give e.g. "
                              f"{raw / 'derivatives' / 'segment'} as OUTPUT_DIR")  # fmt: skip
    if resolved_out.is_relative_to(resolved_raw):
        top = resolved_out.relative_to(resolved_raw).parts[0]
        if top.startswith("sub-"):
            suggestion = raw / "derivatives" / "segment"
            raise InputError(
                out, f"is inside the raw dataset's subject folder {top}; give a folder outside "
                f"it, e.g. {suggestion}",
            )  # fmt: skip
    present = {p.name.removeprefix("sub-") for p in raw.glob("sub-*") if p.is_dir()}
    missing = [label for label in labels if label.removeprefix("sub-") not in present]
    if missing:
        raise InputError(
            raw, f"participant label {', '.join(missing)} not in the dataset (it has "
                 f"{', '.join(sorted(present)) or 'no sub-* folders'})",
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# planning and resume
# --------------------------------------------------------------------------------------------
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
    records the same final options, pipeline, input (SHA-256, or the same size and
    modification time) and mask file (SHA-256, or the same path, size and modification time).
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
            decided[rel] = _row(rel, "failed", error=(
                f"{scan}: writes the same outputs as {owners[paths.sidecar]}; rename one of them "
                "or use --pattern to choose"))  # fmt: skip
            continue
        owners[paths.sidecar] = rel
        mask = (masks or {}).get(scan, str(settings.get("mask", "none")))
        if isinstance(mask, Exception):
            decided[rel] = _row(rel, "failed", error=str(mask))
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
            decided[rel] = _row(rel, "skipped", **detail)
        elif state in ("complete", "different") and not overwrite:
            why = "exist" if state == "complete" else f"exist and were made with {detail}"
            keep = "" if resume or state == "different" else " or --resume to keep them"
            error = f"{paths.sidecar}: outputs {why}; pass --overwrite to redo them{keep}"
            decided[rel] = _row(rel, "failed", error=error)
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


def _expected(task: ScanTask) -> list[Path]:
    paths = task.paths
    wanted = [paths.dseg, paths.sidecar]
    wanted += [paths.probseg] * task.settings["probseg"] + [paths.qc] * task.settings["qc"]
    if task.label_map is not None and task.settings["probseg"]:
        wanted.append(paths.probseg_sidecar)
    if task.settings.get("pve"):
        wanted += naming.pve_output_paths(paths, task.settings["n_components"], _names(task))
    return wanted


def _names(task: ScanTask) -> list[str] | None:
    """Class names of labels 1..K (BIDS mode), which name the fraction files."""
    if task.label_map is None:
        return None
    return [task.label_map[str(k)] for k in range(len(task.label_map))]


def _existing_state(task: ScanTask) -> tuple[str, Any]:
    """``("missing"|"incomplete"|"complete"|"different", detail)`` of a scan's outputs."""
    expected = _expected(task)
    if not task.paths.sidecar.exists():
        return ("incomplete" if any(p.exists() for p in expected) else "missing"), ""
    try:
        record = json.loads(task.paths.sidecar.read_text())
    except (OSError, ValueError):
        return "incomplete", ""
    if not all(p.exists() for p in expected):
        return "incomplete", ""
    old = json.loads(json.dumps(record.get("final_options")))
    new = json.loads(json.dumps(task.extra["final_options"]))
    if isinstance(old, dict):  # options added since (e.g. pve) were at their default then
        from .pipelines import DEFAULT_SETTINGS

        old = {**{k: DEFAULT_SETTINGS[k] for k in _ADDED_OPTIONS}, **old}
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
    model = record.get("model", {})
    return "complete", {"K": model.get("n_components"), "iterations": model.get("n_iter"),
                        "converged": model.get("converged"),
                        "log_likelihood": model.get("log_likelihood")}  # fmt: skip


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


def _pid_alive(pid: int) -> bool:
    return pid_alive(pid)


# --------------------------------------------------------------------------------------------
# one scan (runs on a worker; never raises)
# --------------------------------------------------------------------------------------------
def run_task(task: ScanTask) -> dict[str, Any]:
    """Segment one scan and write its outputs; return its summary row (``ok`` or ``failed``)."""
    from .api import segment_file

    start = time.perf_counter()
    settings = task.settings
    mask = str(settings["mask"] if task.mask is None else task.mask)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if task.label_map is not None and settings["probseg"]:
                _write_probseg_json(task)
            if settings["qc"]:  # BIDS puts the QC picture in another folder (figures/)
                task.paths.qc.parent.mkdir(parents=True, exist_ok=True)
            result = segment_file(
                task.input, task.paths.sidecar.parent, output_paths=task.paths,
                mask=None if mask.lower() == "none" else mask,
                overwrite=task.overwrite, probseg=settings["probseg"], qc=settings["qc"],
                qc_histogram=settings["qc_histogram"],
                command_line=task.extra.get("command_line"), extra=_hash_mask(task.extra),
                class_names=_names(task), **task.em_options,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - one failing scan must not stop the batch
        message = str(error) if isinstance(error, SegmentError | OSError) \
            else f"{type(error).__name__}: {error}"  # fmt: skip
        _discard_extras(task)
        return _row(task.rel, "failed", error=message, seconds=time.perf_counter() - start)
    estimator = result.estimator
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return _row(
        task.rel, "ok", K=estimator.n_components, iterations=estimator.n_iter_,
        converged=bool(estimator.converged_), log_likelihood=float(estimator.log_likelihood_),
        seconds=time.perf_counter() - start, warnings="; ".join(notes),
        dseg=str(task.paths.dseg), **_volume_columns(result),
    )  # fmt: skip


def _volume_columns(result) -> dict[str, Any]:
    """``volume_estimate`` and ``volume_ml_<k>`` of each label for the summary (mL, 0.001)."""
    from .sidecar import round_ml

    fractions = result.fraction_volumes()
    if fractions is None:
        volumes, estimate = result.soft_counts * result.voxel_volume_ml, "posteriors"
    else:
        volumes, estimate = fractions, "fractions"
    return {"volume_estimate": estimate,
            **{f"volume_ml_{k}": round_ml(v) for k, v in enumerate(volumes, start=1)}}  # fmt: skip


def _hash_mask(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with the SHA-256 of the mask file, so that resume can check its content."""
    record = extra.get("mask_file")
    if not record:
        return extra
    from .sidecar import file_sha256

    try:
        return {**extra, "mask_file": {**record, "sha256": file_sha256(record["path"])}}
    except OSError:  # gone or unreadable: segment_file says so, naming the file
        return extra


def _discard_extras(task: ScanTask) -> None:
    """After a failure, remove what :func:`run_task` added beside ``segment_file``'s outputs."""
    if task.label_map is not None and not task.paths.probseg.exists():
        with contextlib.suppress(OSError):
            task.paths.probseg_sidecar.unlink()
    with contextlib.suppress(OSError):
        task.paths.qc.parent.rmdir()  # only if empty


def _write_probseg_json(task: ScanTask) -> None:
    record = {
        "LabelMap": task.label_map,
        "Sources": task.extra.get("Sources", []),
        "Description": "volume k of the 4th axis: probability of label k+1 of the _dseg",
    }
    target = task.paths.probseg_sidecar
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _row(rel: str, status: str, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(input=rel, status=status)
    row.update({k: v for k, v in values.items() if v is not None})
    row["error"] = " ".join(str(row["error"]).split())
    row["warnings"] = " ".join(str(row["warnings"]).split())
    return row


# --------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------
def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 1e6 else f"{value:.10g}"
    return escape_tsv(str(value))


#: Characters escaped in a summary field (the text format of PostgreSQL's COPY).
_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TSV_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_tsv(text: str) -> str:
    """``text`` with backslash, tab, newline and carriage return written ``\\``, ``\t``...

    So a file name holding a tab or a newline stays in its own field of its own row.

    Examples
    --------
    >>> escape_tsv("a\tb\nc")
    'a\\tb\\nc'
    """
    return "".join(_TSV_ESCAPES.get(char, char) for char in text)


def unescape_tsv(text: str) -> str:
    """Inverse of :func:`escape_tsv`."""
    return re.sub(r"\\(.)", lambda m: _TSV_UNESCAPES.get(m[1], "\\" + m[1]), text)


def write_summary(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``batch_summary.tsv`` atomically (tab-separated, one row per scan)."""
    rows = list(rows)
    columns = list(SUMMARY_COLUMNS) + ["volume_estimate"]
    n_volumes = max((int(k.rsplit("_", 1)[1]) for row in rows for k in row
                     if k.startswith("volume_ml_")), default=0)  # fmt: skip
    columns += [f"volume_ml_{k}" for k in range(1, n_volumes + 1)]
    lines = ["\t".join(columns)]
    lines += ["\t".join(_format(row.get(c, "")) for c in columns) for row in rows]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``batch_summary.tsv`` as dictionaries of strings."""
    header, *lines = Path(path).read_text().split("\n")
    names = header.split("\t")
    return [dict(zip(names, map(unescape_tsv, line.split("\t")))) for line in lines if line]


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def run_batch(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    patterns: Sequence[str] = (),
    recursive: bool = False,
    bids: bool = False,
    subjects: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
    pipeline=None,
    settings: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
    mask: str | Path | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    on_result: Callable[[dict[str, Any], int, int], None] | None = None,
    command_line: Sequence[str] | None = None,
    memory_limit: int | str | None = None,
    compresslevel: int | None = None,
    derivative_dir: str | Path | None = None,
) -> BatchResult:
    """Segment every scan found in ``input_dir``; see the module docstring.

    Parameters
    ----------
    input_dir, output_dir : path
        Scans are read from ``input_dir``; outputs mirror its sub-folders in ``output_dir``.
        With ``bids``, outputs go to ``<output_dir>/derivatives/segment`` (``output_dir``
        defaults to ``input_dir``).
    patterns, recursive : see :func:`discover`.
    bids, subjects, sessions, suffixes : BIDS mode and its filters, see :func:`discover_bids`.
    pipeline : Pipeline, optional
        Recorded in the sidecars; BIDS names get ``_desc-<pipeline name>``.
    settings, sources : dict
        Final settings and where each came from (:func:`segment.pipelines.resolve_options`).
    mask : str or Path, optional
        Replaces ``settings["mask"]`` (default ``"none"``): ``"none"``, ``"auto"``, one mask
        file for every scan, a template giving each scan its own mask
        (``"{stem}_brainmask.nii.gz"``, ``"/data/masks/{rel}/{stem}_mask.nii.gz"``), or with
        ``bids`` ``"bids"``: each scan's brain mask in the dataset's derivatives.  See
        :class:`MaskSpec` and :func:`find_bids_mask`.  A scan whose mask is missing, unreadable
        or on another grid fails alone; files used as a mask are not segmented as scans.
    jobs : int, optional
        Scans at once on the local cluster (default: CPU count, at most the scans to do).
    scheduler : {None, "processes", "threads", "synchronous"} or address
        Local processes (default), local threads, one at a time in this process, or a running
        ``dask.distributed`` scheduler (``tcp://host:8786``) whose workers can read the files.
    workers : int, optional
        Threads for each scan's EM (default: 1, the scans themselves run in parallel).
    resume, overwrite : bool
        Skip complete scans made with the same options; redo everything.
    on_result : callable, optional
        ``on_result(row, n_done, n_total)`` after each scan (skipped ones first).
    memory_limit : int or str, optional
        Per scan, as for :func:`segment.api.segment_file` (default 3 GB). It does not change the
        results, so it is not compared when resuming.
    compresslevel : int, optional
        gzip level of the ``.nii.gz`` outputs (default 1), as for
        :func:`segment.api.segment_file`; not compared when resuming either.
    derivative_dir : path, optional
        With ``bids``: the derivative dataset's own folder, used as it is (the BIDS-Apps
        ``output_dir``, see :func:`check_bids_app`), instead of
        ``<output_dir>/derivatives/segment``.

    Returns
    -------
    BatchResult

    Raises
    ------
    SegmentError
        Bad options, among them a malformed mask template (before any scan is read).
    """
    from .api import (
        _check_compresslevel,
        _memory_budget,
        check_out_dir_creatable,
        make_estimator,
    )
    from .pipelines import DEFAULT_SETTINGS

    input_dir = Path(input_dir).absolute()
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found")
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if mask is not None:
        settings["mask"] = str(mask)
    mask_spec = MaskSpec.parse(settings["mask"], bids=bids)
    model = {k: settings[k] for k in ("n_components", "max_iter", "tol", "variance_floor",
                                      "seed", "chunk_size", "mrf_beta", "bias_field",
                                      "bias_smoothness", "pve")}  # fmt: skip
    em_options = {**model, "scheduler": "threads" if workers and workers > 1 else "synchronous",
                  "workers": workers}  # fmt: skip
    make_estimator(em_options)  # option errors before any scan is touched
    _memory_budget(memory_limit)
    em_options["memory_limit"] = memory_limit
    if compresslevel is not None:
        em_options["compresslevel"] = _check_compresslevel(compresslevel)
    root = Path(output_dir or input_dir).absolute()
    output_root = root / "derivatives" / "segment" if bids else root
    if bids and derivative_dir is not None:
        output_root = Path(derivative_dir).absolute()
    check_out_dir_creatable(output_root)
    if bids:
        scans = discover_bids(input_dir, subjects=subjects, sessions=sessions, suffixes=suffixes)
    else:
        scans = discover(input_dir, patterns, recursive=recursive, exclude=[output_root])
    masks: dict[Path, str | SegmentError] = {}
    for scan in scans:
        try:
            masks[scan] = mask_spec.for_scan(scan, input_dir, exclude=[output_root])
        except SegmentError as error:
            masks[scan] = error
    scans = _leave_out_masks(scans, masks)
    if not scans:
        what = "anatomical NIfTI scans" if bids else (
            f"files matching {', '.join(patterns)}" if patterns else
            f"scans ({', '.join(SUPPORTED_EXTENSIONS)})")  # fmt: skip
        raise InputError(
            input_dir,
            f"no {what} found" + ("" if recursive or bids else "; add --recursive for sub-folders"),
        )
    output_root.mkdir(parents=True, exist_ok=True)
    with batch_lock(output_root):  # one batch per output folder
        return _run_locked(
            scans, masks, input_dir, output_root, settings=settings, sources=sources,
            pipeline=pipeline, command_line=command_line, em_options=em_options, bids=bids,
            resume=resume, overwrite=overwrite, scheduler=scheduler, jobs=jobs,
            on_result=on_result,
        )  # fmt: skip


def _run_locked(
    scans, masks, input_dir, output_root, *, settings, sources, pipeline, command_line,
    em_options, bids, resume, overwrite, scheduler, jobs, on_result,
) -> BatchResult:  # fmt: skip
    """The part of :func:`run_batch` that reads and writes the output folder (locked)."""
    from .pipelines import class_names

    extra = {"pipeline": pipeline.record() if pipeline else None, "final_options": settings,
             "option_sources": sources or {},
             "command_line": list(command_line) if command_line else None}  # fmt: skip
    names = class_names(pipeline, settings["n_components"])
    tasks, decided = plan(
        scans, input_dir, output_root, settings=settings, extra=extra, em_options=em_options,
        bids=bids, desc=pipeline.name if pipeline else None, class_names=names,
        resume=resume, overwrite=overwrite, masks=masks,
    )  # fmt: skip
    clean_stale_temporaries(output_root)
    if bids:
        _write_derivative_files(output_root, pipeline, names, input_dir)
    order = [s.relative_to(input_dir).as_posix() for s in scans]
    rows: dict[str, dict[str, Any]] = {}
    summary = output_root / SUMMARY_NAME

    def record(row: dict[str, Any]) -> None:
        rows[row["input"]] = row
        write_summary(summary, (rows[r] for r in order if r in rows))
        kill_point(f"summary-{len(rows)}")
        if on_result is not None:
            on_result(row, len(rows), len(order))

    write_summary(summary, [])  # valid from the start, even if the batch is killed
    for rel in order:
        if rel in decided:
            record(decided[rel])
    try:
        for row in _execute(tasks, scheduler=scheduler, jobs=jobs):
            record(row)
    finally:
        clean_stale_temporaries(output_root)  # e.g. of a worker killed in the middle of a scan
    return BatchResult([rows[r] for r in order], summary, output_root)


#: The lock file of an output folder (see :func:`batch_lock`).
LOCK_NAME = ".segment-batch.lock"


@contextlib.contextmanager
def batch_lock(output_root: Path):
    """Hold the advisory lock of ``output_root`` for one batch, or refuse at once.

    The lock is an exclusive ``flock`` on ``output_root/.segment-batch.lock``, which records
    who holds it (pid, host, start time) for the message of a second batch. The kernel
    releases it when the batch ends, however it ends (``kill -9`` included), so a stale lock
    never blocks a rerun.

    Raises
    ------
    SegmentError
        Another batch is writing into ``output_root``.
    """
    import fcntl
    import socket

    path = Path(output_root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise SegmentError(
                f"{output_root}: another segment batch ({holder}) is writing into this folder; "
                "wait for it to finish or give another --out-dir"
            ) from None
        except OSError:  # no flock on this file system: run unlocked
            pass
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still locked: nobody reads a stale holder
    finally:
        os.close(fd)


def _write_derivative_files(root: Path, pipeline, names: Sequence[str], raw: Path) -> None:
    """``dataset_description.json``, ``dseg.tsv`` and ``.bidsignore`` of the derivative."""
    try:
        raw_description = json.loads((raw / "dataset_description.json").read_text())
    except (OSError, ValueError):
        raw_description = {}
    description = naming.derivative_description(
        __version__, source=naming.relative_link(raw, root),
        pipeline=pipeline.name if pipeline else None,
        source_description=raw_description if isinstance(raw_description, dict) else {},
    )  # fmt: skip
    with atomic_write(root / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n")
    with atomic_write(root / "dseg.tsv") as tmp:
        tmp.write_text(naming.dseg_tsv(list(names)))
    with atomic_write(root / ".bidsignore") as tmp:
        tmp.write_text(naming.BIDSIGNORE)


def _execute(tasks: list[ScanTask], *, scheduler: str | None, jobs: int | None):
    """Yield the row of each task as it completes, on the chosen executor."""
    if not tasks:
        return
    if scheduler == "synchronous":
        for task in tasks:
            yield run_task(task)
        return
    from distributed import as_completed

    with _client(scheduler, jobs or min(os.cpu_count() or 1, len(tasks))) as client:
        futures = {
            client.submit(
                run_task, task, pure=False, key=f"segment-{i}-{scan_stem(task.input)}"
            ): task
            for i, task in enumerate(tasks)
        }
        total, done = len(futures), 0
        for future in as_completed(futures, loop=client.loop):
            task = futures.pop(future)
            try:
                row = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. a worker killed (out of memory)
                if _scheduler_lost(client, error):
                    raise SegmentError(
                        f"lost the connection to the dask scheduler {scheduler or ''} after "
                        f"{done} of {total} scans; the summary lists the finished ones, the "
                        "others have no sidecar (incomplete, never half-written): rerun the "
                        "same command to finish the batch"
                    ) from None
                row = _row(task.rel, "failed", error=f"{type(error).__name__}: {error} "
                           "(the worker running this scan died; out of memory?)")  # fmt: skip
            future.release()
            done += 1
            yield row


def _scheduler_lost(client, error: BaseException) -> bool:
    """Whether ``error`` of a future means the client lost its scheduler (not a scan's fault)."""
    import asyncio

    text = str(error)
    return (
        "scheduler-connection-lost" in text
        or "lost the connection to the scheduler" in text
        or (isinstance(error, asyncio.CancelledError) and client.status != "running")
    )


class _client:
    """Context manager: a Client on a new LocalCluster, or connected to an address."""

    def __init__(self, scheduler: str | None, jobs: int):
        self.scheduler, self.jobs = scheduler, jobs
        self.cluster = self.client = None

    def __enter__(self):
        import logging

        from distributed import Client, LocalCluster

        if not os.environ.get("SEGMENT_DEBUG"):  # a lost scheduler is one line, not tracebacks
            names = [n for n in list(logging.root.manager.loggerDict)
                     if n.split(".")[0] in ("distributed", "asyncio", "tornado")]  # fmt: skip
            for name in ["distributed", "distributed.client", *names]:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)

        if self.scheduler and "://" in self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
            except OSError as error:
                raise SegmentError(
                    f"cannot connect to the dask scheduler at {self.scheduler}: {error}; start "
                    "one with `dask scheduler` and workers with `dask worker "
                    f"{self.scheduler}`, or leave out --scheduler to run locally"
                ) from None
            return self.client
        self.cluster = LocalCluster(
            n_workers=1 if self.scheduler == "threads" else self.jobs,
            threads_per_worker=self.jobs if self.scheduler == "threads" else 1,
            processes=self.scheduler != "threads", dashboard_address=None,
            silence_logs=logging.ERROR,
        )  # fmt: skip
        self.client = Client(self.cluster, set_as_default=False)
        return self.client

    def __exit__(self, *exc_info):
        for resource in (self.client, self.cluster):
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # noqa: BLE001, S110 - closing is best effort
                    pass
        return False
