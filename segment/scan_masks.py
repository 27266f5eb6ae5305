"""Each scan's mask in a batch (or a run): none, auto, one file, a template, or the BIDS one.

:class:`MaskSpec` parses the ``--mask`` text once and gives each scan its mask;
:func:`find_bids_mask` finds a BIDS scan's brain mask in the dataset's derivatives.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import naming
from .exceptions import InputError, SegmentError
from .io import scan_stem

__all__ = ["MASK_PLACEHOLDERS", "MaskSpec", "find_bids_mask", "leave_out_masks"]

#: Placeholders of a per-scan mask template, e.g. ``{stem}_brainmask.nii.gz``.
MASK_PLACEHOLDERS = ("stem", "rel")
#: Entities a BIDS brain mask must share with its scan when both have them.
_BIDS_MASK_ENTITIES = ("acq", "run", "rec")
#: ``space-`` labels of a brain mask on the scan's own grid (preferred after no ``space-``).
_NATIVE_SPACES = ("orig", "T1w")
_NIFTI = (".nii", ".nii.gz")


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


def leave_out_masks(scans: list[Path], masks: dict[Path, Any]) -> list[Path]:
    """``scans`` without the files that are another scan's mask."""
    used = set()
    for scan, mask in masks.items():
        if isinstance(mask, str) and mask not in ("none", "auto"):
            path = Path(mask).resolve()
            if path != scan.resolve():
                used.add(path)
    return [scan for scan in scans if scan.resolve() not in used]
