"""Tests for segment.naming: plain-mode output names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from segment.naming import OutputPaths, plain_output_paths


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.NII.GZ"])
def test_plain_names_for_volumes(tmp_path, name):
    paths = plain_output_paths(Path("inputs") / name, tmp_path, kind="nifti")
    assert paths.dseg == tmp_path / "scan_dseg.nii.gz"
    assert paths.probseg == tmp_path / "scan_probseg.nii.gz"
    assert paths.sidecar == tmp_path / "scan_segment.json"
    assert paths.qc == tmp_path / "scan_qc.png"
    assert paths.all() == [paths.dseg, paths.probseg, paths.sidecar, paths.qc]


@pytest.mark.parametrize("name", ["scan.png", "scan.tif", "scan.jpeg", "scan.bmp"])
def test_plain_names_for_images(name):
    paths = plain_output_paths(name, "out", kind="image")
    assert [p.name for p in paths.all()] == [
        "scan_dseg.png",
        "scan_probseg.tif",
        "scan_segment.json",
        "scan_qc.png",
    ]
    assert all(p.parent == Path("out") for p in paths.all())


def test_dotted_stems_are_kept():
    paths = plain_output_paths("sub-01.run.1.nii.gz", "o", kind="nifti")
    assert paths.dseg.name == "sub-01.run.1_dseg.nii.gz"
    assert plain_output_paths("a.b.png", "o", kind="image").qc.name == "a.b_qc.png"


def test_output_paths_are_frozen_and_distinct():
    paths = plain_output_paths("scan.nii.gz", "o", kind="nifti")
    with pytest.raises(dataclasses.FrozenInstanceError):
        paths.dseg = Path("x")  # type: ignore[misc]
    assert len(set(paths.all())) == 4


def test_all_skips_unset_optional_fields():
    # BIDS mode may subclass OutputPaths with optional extra outputs (e.g. a mask).
    @dataclasses.dataclass(frozen=True)
    class WithMask(OutputPaths):
        mask: Path | None = None

    base = dict(dseg=Path("d"), probseg=Path("p"), sidecar=Path("s"), qc=Path("q"))
    assert WithMask(**base).all() == [Path("d"), Path("p"), Path("s"), Path("q")]
    assert WithMask(**base, mask=Path("m")).all()[-1] == Path("m")


def test_bad_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \('nifti', 'image'\); got 'volume'"):
        plain_output_paths("scan.nii.gz", "o", kind="volume")
