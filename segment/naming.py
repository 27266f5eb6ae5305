"""Output file names.

Plain mode (this module today) writes next to each other in one output folder::

    scan.nii.gz -> scan_dseg.nii.gz, scan_probseg.nii.gz, scan_segment.json, scan_qc.png
    photo.png   -> photo_dseg.png,   photo_probseg.tif,   photo_segment.json, photo_qc.png

BIDS derivative naming is meant to live here too, as another ``*_output_paths`` function that
returns the same :class:`OutputPaths` record (adding optional fields, e.g. a mask, is supported:
:meth:`OutputPaths.all` lists every field that holds a path).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from segment.io import scan_stem

__all__ = ["KINDS", "OutputPaths", "plain_output_paths"]

#: Scan kinds, as in :attr:`segment.io.Scan.kind`.
KINDS = ("nifti", "image")

# Extensions of the label and probability outputs for each scan kind.  Volumes are always
# written compressed, even from an uncompressed ``.nii`` input.
_EXTENSIONS = {
    "nifti": {"dseg": ".nii.gz", "probseg": ".nii.gz"},
    "image": {"dseg": ".png", "probseg": ".tif"},
}


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
    """

    dseg: Path
    probseg: Path
    sidecar: Path
    qc: Path

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
