"""Which scans a batch segments: a folder (patterns, sub-folders) or a BIDS dataset."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from . import naming
from .exceptions import InputError
from .io import is_supported

__all__ = ["discover", "discover_bids", "check_bids_app"]

_NIFTI = (".nii", ".nii.gz")


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
