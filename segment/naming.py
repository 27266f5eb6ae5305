"""Output file names.

Plain mode (this module today) writes next to each other in one output folder::

    scan.nii.gz -> scan_dseg.nii.gz, scan_probseg.nii.gz, scan_segment.json, scan_qc.png
    photo.png   -> photo_dseg.png,   photo_probseg.tif,   photo_segment.json, photo_qc.png

BIDS derivative naming is meant to live here too, as another ``*_output_paths`` function that
returns the same :class:`OutputPaths` record (adding optional fields, e.g. a mask, is supported:
:meth:`OutputPaths.all` lists every field that holds a path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from segment.io import scan_stem

__all__ = [
    "KINDS",
    "is_nifti",
    "OutputPaths",
    "plain_output_paths",
    "BIDS_ENTITIES",
    "parse_bids_entities",
    "bids_output_paths",
    "derivative_description",
    "relative_link",
    "BIDSIGNORE",
    "dseg_tsv",
    "dseg_tsv_path",
    "label_names",
    "run_dseg_tsv",
    "pve_output_paths",
]

#: Scan kinds, as in :attr:`segment.io.Scan.kind`.
KINDS = ("nifti", "image")

# Extensions of the label and probability outputs for each scan kind.  Volumes are always
# written compressed, even from an uncompressed ``.nii`` input.
_EXTENSIONS = {
    "nifti": {"dseg": ".nii.gz", "probseg": ".nii.gz"},
    "image": {"dseg": ".png", "probseg": ".tif"},
}


def is_nifti(path: str | Path) -> bool:
    """True when ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


@dataclass(frozen=True)
class OutputPaths:
    """Where the outputs of one scan go.

    Attributes
    ----------
    dseg : Path
        Discrete label map (``_dseg``).
    probseg : Path
        Per-component probabilities (``_probseg``).
    sidecar : Path
        JSON provenance (fitted parameters, options, volumes).
    qc : Path
        Quality-control PNG.
    probseg_sidecar : Path or None
        BIDS JSON of the probabilities (``LabelMap``, ``Sources``); BIDS mode only.
    """

    dseg: Path
    probseg: Path
    sidecar: Path
    qc: Path
    probseg_sidecar: Path | None = None

    def all(self) -> list[Path]:
        """Every output path, in field order (fields set to ``None`` are skipped)."""
        values = (getattr(self, f.name) for f in fields(self))
        return [Path(v) for v in values if v is not None]


def plain_output_paths(input_path: str | Path, out_dir: str | Path, *, kind: str) -> OutputPaths:
    """Output names for ``input_path`` in ``out_dir`` (plain, non-BIDS mode).

    Parameters
    ----------
    input_path : str or Path
        The scan; its name without the image extension is the prefix.
    out_dir : str or Path
        Output folder (not created here).
    kind : {"nifti", "image"}
        :attr:`segment.io.Scan.kind` of the input: volumes get ``.nii.gz`` outputs, 2-D images a
        ``.png`` label map and a ``.tif`` probability stack.

    Returns
    -------
    OutputPaths

    Examples
    --------
    >>> paths = plain_output_paths("data/scan.nii", "out", kind="nifti")
    >>> [p.name for p in paths.all()]
    ['scan_dseg.nii.gz', 'scan_probseg.nii.gz', 'scan_segment.json', 'scan_qc.png']
    """
    if kind not in _EXTENSIONS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    out_dir = Path(out_dir)
    stem = scan_stem(input_path)
    ext = _EXTENSIONS[kind]
    return OutputPaths(
        dseg=out_dir / f"{stem}_dseg{ext['dseg']}",
        probseg=out_dir / f"{stem}_probseg{ext['probseg']}",
        sidecar=out_dir / f"{stem}_segment.json",
        qc=out_dir / f"{stem}_qc.png",
    )


# --------------------------------------------------------------------------------------------
# BIDS derivatives
# --------------------------------------------------------------------------------------------
#: BIDS entities in the order the specification puts them in file names.
BIDS_ENTITIES: tuple[str, ...] = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain",
    "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space",
    "split", "recording", "chunk", "seg", "res", "den", "label", "desc",
)  # fmt: skip
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
_SUFFIX = re.compile(r"^[a-zA-Z0-9]+$")

#: BIDS "common image-derived labels" that class names map onto (name -> (index, abbreviation)).
_BIDS_COMMON_LABELS: dict[str, tuple[int, str]] = {
    "grey matter": (1, "GM"), "gray matter": (1, "GM"), "gm": (1, "GM"),
    "white matter": (2, "WM"), "wm": (2, "WM"),
    "csf": (3, "CSF"), "cerebrospinal fluid": (3, "CSF"),
}  # fmt: skip


def parse_bids_entities(path: str | Path) -> dict[str, str]:
    """Entities of a BIDS file name, plus ``suffix``.

    Parameters
    ----------
    path : str or Path
        E.g. ``sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_T1w.nii.gz``.

    Returns
    -------
    dict
        Entity key -> label in file-name order, and ``"suffix"`` (e.g. ``"T1w"``).

    Raises
    ------
    ValueError
        The name is not ``key-label_..._suffix`` or has no ``sub`` entity.

    Examples
    --------
    >>> parse_bids_entities("sub-01_ses-pre_run-2_T1w.nii.gz")
    {'sub': '01', 'ses': 'pre', 'run': '2', 'suffix': 'T1w'}
    """
    parts = scan_stem(path).split("_")
    entities: dict[str, str] = {}
    problem = "" if len(parts) > 1 and _SUFFIX.match(parts[-1]) else "no _<suffix>"
    for part in parts[:-1]:
        match = _ENTITY.match(part)
        if not match:
            problem = problem or f"{part!r} is not a key-label entity"
            break
        entities[match[1]] = match[2]
    if not problem and "sub" not in entities:
        problem = "no sub-<label> entity"
    if problem:
        raise ValueError(
            f"{Path(path).name}: not a BIDS file name (sub-<label>[_key-<label>...]_<suffix>): "
            f"{problem}"
        )
    return {**entities, "suffix": parts[-1]}


def bids_output_paths(
    input_path: str | Path, derivative_root: str | Path, *, desc: str | None = None
) -> OutputPaths:
    """BIDS-derivative output names for the scan ``input_path``.

    ``<root>/sub-XX/[ses-YY/]anat/<source entities>[_desc-<desc>]_dseg.nii.gz`` and
    ``..._probseg.nii.gz``, with ``..._dseg.json`` (the full provenance sidecar) and
    ``..._probseg.json`` (``LabelMap``) next to them; the QC picture goes to
    ``<root>/sub-XX/figures/``.  The source's own ``desc`` entity is replaced.

    Examples
    --------
    >>> paths = bids_output_paths("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "d", desc="x")
    >>> str(paths.dseg)
    'd/sub-01/ses-1/anat/sub-01_ses-1_desc-x_dseg.nii.gz'
    """
    entities = parse_bids_entities(input_path)
    entities.pop("suffix")
    entities.pop("desc", None)
    if desc:
        entities["desc"] = re.sub(r"[^a-zA-Z0-9]", "", desc)
    order = {key: i for i, key in enumerate(BIDS_ENTITIES)}
    keys = sorted(entities, key=lambda k: order.get(k, len(order)))
    prefix = "_".join(f"{k}-{entities[k]}" for k in keys)
    folder = Path(derivative_root) / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return OutputPaths(
        dseg=folder / "anat" / f"{prefix}_dseg.nii.gz",
        probseg=folder / "anat" / f"{prefix}_probseg.nii.gz",
        sidecar=folder / "anat" / f"{prefix}_dseg.json",
        qc=Path(derivative_root) / f"sub-{entities['sub']}" / "figures" / f"{prefix}_qc.png",
        probseg_sidecar=folder / "anat" / f"{prefix}_probseg.json",
    )


#: The distribution that provides the ``segment`` command (``GeneratedBy[0].Name``).
DISTRIBUTION = "segment-em"

#: ``.bidsignore`` of the derivative: what we write that has no name in the BIDS schema.
BIDSIGNORE = (
    "# written by segment: files that have no BIDS name\n"
    "batch_summary.tsv\n"  # one row per scan of the batch
    "*_biasfield.nii.gz\n"  # the multiplicative bias field (--bias-field)
    "*_corrected.nii.gz\n"  # the bias-corrected scan
    "sub-*/figures\n"  # the QC pictures (the folder and what it holds)
)


def derivative_description(
    version: str,
    *,
    source: str = "../..",
    pipeline: str | None = None,
    source_description: dict | None = None,
) -> dict:
    """``dataset_description.json`` of the derivative dataset.

    Parameters
    ----------
    version : str
        Version of segment (``GeneratedBy[0].Version``).
    source : str
        Where the raw dataset is, relative to the derivative's root (POSIX ``/``; ``../..`` for
        ``<raw>/derivatives/segment``) or as a URI: ``DatasetLinks["raw"]``, which the
        sidecars' ``bids:raw:<path>`` sources resolve through, and ``SourceDatasets[0].URL``.
    pipeline : str, optional
        Name of the pipeline preset (``GeneratedBy[0].Description``).
    source_description : dict, optional
        The raw dataset's own ``dataset_description.json``: its ``DatasetDOI`` and ``Name``
        are carried into ``SourceDatasets``.

    Examples
    --------
    >>> description = derivative_description("1.0", source="../raw")
    >>> description["DatasetLinks"], description["SourceDatasets"]
    ({'raw': '../raw'}, [{'URL': '../raw'}])
    """
    generated: dict[str, Any] = {"Name": DISTRIBUTION, "Version": version}
    if pipeline is not None:
        generated["Description"] = f"segment, pipeline {pipeline}"
    dataset: dict[str, Any] = {"URL": source}
    if source_description and source_description.get("DatasetDOI"):
        dataset["DOI"] = str(source_description["DatasetDOI"])
    return {
        "Name": "segment: Gaussian-mixture tissue segmentation",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [dataset],
        "DatasetLinks": {"raw": source},
    }


def relative_link(target: str | Path, start: str | Path) -> str:
    """``target`` as seen from the folder ``start``: a relative POSIX path (``../..``).

    Both are made absolute first; a target on another drive gets a ``file://`` URI.

    Examples
    --------
    >>> relative_link("/data/raw", "/data/raw/derivatives/segment")
    '../..'
    >>> relative_link("/data/raw", "/scratch/out")
    '../../data/raw'
    """
    import os

    target, start = Path(target).absolute(), Path(start).absolute()
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:  # no relative path between them (another Windows drive)
        return target.as_uri()


def label_table(names: list[str]) -> list[dict[str, Any]]:
    """Rows of ``dseg.tsv``: ``index``, ``name``, ``abbreviation``, ``mapping``.

    ``mapping`` is the index of the BIDS common image-derived label (GM 1, WM 2, CSF 3) when a
    class name is one of them, else ``n/a``.  Our labels are ordered by ascending mean
    intensity, not by BIDS index, so the mapping is what links the two.
    """
    rows = []
    for index, name in enumerate(names, start=1):
        common = _BIDS_COMMON_LABELS.get(name.lower())
        abbreviation = common[1] if common else re.sub(r"[^A-Za-z0-9]", "", name)[:6].upper()
        rows.append({"index": index, "name": name, "abbreviation": abbreviation,
                     "mapping": common[0] if common else "n/a"})  # fmt: skip
    return rows


def dseg_tsv(names: list[str]) -> str:
    """Text of the derivative's root ``dseg.tsv`` for labels 1..K named ``names``."""
    lines = ["index\tname\tabbreviation\tmapping"]
    lines += [f"{r['index']}\t{r['name']}\t{r['abbreviation']}\t{r['mapping']}"
              for r in label_table(names)]  # fmt: skip
    return "\n".join(lines) + "\n"


def label_names(names, n_components: int) -> list[str]:
    """Names of labels 1..K: ``names`` when they are K, else ``class1`` ... ``classK``.

    Examples
    --------
    >>> label_names(None, 2)
    ['class1', 'class2']
    >>> label_names(["csf", "grey matter"], 2)
    ['csf', 'grey matter']
    """
    names = [str(name) for name in (names or [])]
    if len(names) != n_components:
        return [f"class{k}" for k in range(1, n_components + 1)]
    return names


#: Name of label 0 in the look-up tables: voxels outside the mask (air, with ``--mask auto``
#: on a whole-head scan) and voxels that are not finite.
OUTSIDE_NAME = "outside mask"


def dseg_tsv_path(paths: OutputPaths) -> Path | None:
    """``<stem>_dseg.tsv`` next to the plain-mode label map; None in BIDS mode (the
    derivative's root ``dseg.tsv`` describes every label map there).

    Examples
    --------
    >>> dseg_tsv_path(plain_output_paths("data/scan.nii", "out", kind="nifti")).name
    'scan_dseg.tsv'
    """
    if paths.probseg_sidecar is not None:
        return None
    stem = paths.dseg.name.split("_dseg")[0]
    return paths.dseg.with_name(f"{stem}_dseg.tsv")


def run_dseg_tsv(names: list[str]) -> str:
    """Text of one run's ``<stem>_dseg.tsv``: label 0 (outside the mask), then 1..K.

    Columns ``index``, ``name``, ``abbreviation`` and ``mapping`` (see :func:`label_table`).

    Examples
    --------
    >>> run_dseg_tsv(["csf", "grey matter"]).splitlines()[:3]
    ['index\\tname\\tabbreviation\\tmapping', '0\\toutside mask\\tBG\\tn/a', '1\\tcsf\\tCSF\\t3']
    """
    text = dseg_tsv(names)
    header, _, rows = text.partition("\n")
    return f"{header}\n0\t{OUTSIDE_NAME}\tBG\tn/a\n{rows}"


def pve_output_paths(
    paths: OutputPaths, n_components: int, names: list[str] | None = None
) -> list[Path]:
    """Where the partial-volume fractions go.

    Plain mode: one 4-D file next to the label map, ``<stem>_pve.nii.gz`` (``_pve.tif`` for
    2-D images), one volume per label in label order, as FSL FAST's ``_pve_<k>`` maps stacked.
    BIDS mode (``paths.probseg_sidecar`` set): one 3-D file per class,
    ``<source entities>_label-<abbreviation>[_desc-<preset>]_probseg.nii.gz``, as fMRIPrep
    publishes FAST's fractions (``label-GM``, ``label-WM``, ``label-CSF`` when the class names
    are BIDS common labels, else the sanitised name, e.g. ``label-CLASS1``).

    Examples
    --------
    >>> p = bids_output_paths("sub-01/anat/sub-01_T1w.nii.gz", "d", desc="brain")
    >>> pve_output_paths(p, 3, ["CSF", "GM", "WM"])[1].name
    'sub-01_label-GM_desc-brain_probseg.nii.gz'
    """
    if paths.probseg_sidecar is None:
        ext = ".tif" if paths.probseg.name.endswith((".tif", ".tiff")) else ".nii.gz"
        stem = paths.dseg.name.split("_dseg")[0]
        return [paths.dseg.with_name(f"{stem}_pve{ext}")]
    names = list(names or [])
    if len(names) != n_components:
        names = [f"class{k}" for k in range(1, n_components + 1)]
    abbreviations = [row["abbreviation"] or f"CLASS{row['index']}" for row in label_table(names)]
    if len(set(abbreviations)) < len(abbreviations):  # keep the names apart
        abbreviations = [f"{a}{k}" for k, a in enumerate(abbreviations, start=1)]
    parts = paths.probseg.name[: -len("_probseg.nii.gz")].split("_")
    at = next((i for i, p in enumerate(parts) if p.startswith("desc-")), len(parts))
    return [
        paths.probseg.with_name(
            "_".join(parts[:at] + [f"label-{a}"] + parts[at:]) + "_probseg.nii.gz"
        )
        for a in abbreviations
    ]
