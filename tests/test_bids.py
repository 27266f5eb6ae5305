"""`segment bids` (BIDS-App form) and `segment batch --bids`: derivatives the validator accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from click.testing import CliRunner

from segment.cli import cli
from segment.samples import make_head_phantom

FAST = ["-k", "3", "--max-iter", "20", "--scheduler", "synchronous", "-q"]


def _validator() -> str | None:
    here = Path(sys.executable).with_name("bids-validator-deno")
    return str(here) if here.exists() else shutil.which("bids-validator-deno")


def validator_errors(root: Path) -> list[tuple[str, str]]:
    """(code, location) of every error the BIDS validator reports on ``root`` (no network)."""
    result = subprocess.run(
        [_validator(), "--format", "json", str(root)], capture_output=True, text=True, timeout=300
    )
    issues = json.loads(result.stdout)["issues"]["issues"]
    return sorted((i["code"], i.get("location", "")) for i in issues if i["severity"] == "error")


needs_validator = pytest.mark.skipif(
    _validator() is None, reason="bids-validator-deno not installed (pip install segment-em[test])"
)


@pytest.fixture
def raw_dataset(tmp_path) -> Path:
    """A two-subject raw BIDS dataset the validator accepts (0 errors)."""
    root = tmp_path / "raw"
    root.mkdir()
    description = {"Name": "two heads", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.0/x"}
    (root / "dataset_description.json").write_text(json.dumps(description))
    (root / "README").write_text("Two phantom heads for the tests of segment.\n")
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    for seed, sub in enumerate(["01", "02"], start=1):
        image, _, affine = make_head_phantom((24, 28, 20), seed=seed)
        img = nib.Nifti1Image(image, affine)
        img.header.set_xyzt_units("mm", "sec")
        path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(img, path)
        path.with_name(f"sub-{sub}_T1w.json").write_text("{}")
    return root


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@needs_validator
def test_raw_dataset_is_valid(raw_dataset):
    assert validator_errors(raw_dataset) == []


@needs_validator
def test_bids_app_output_passes_the_validator(raw_dataset, tmp_path):
    out = tmp_path / "elsewhere" / "seg"
    args = ["bids", str(raw_dataset), str(out), "participant", "--participant-label", "01",
            "02", "--bias-field", *FAST]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "sub-01/anat/sub-01_dseg.nii.gz" in _files(out)
    assert "sub-02/anat/sub-02_biasfield.nii.gz" in _files(out)  # --bias-field
    assert "sub-02/figures/sub-02_qc.png" in _files(out)  # QC pictures on
    assert validator_errors(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "segment-em"
    assert "CodeURL" not in description["GeneratedBy"][0]
    link = description["DatasetLinks"]["raw"]
    assert (out / link).resolve() == raw_dataset.resolve()
    assert description["SourceDatasets"] == [{"URL": link, "DOI": "doi:10.0/x"}]
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_dseg.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    table = (out / "dseg.tsv").read_text().splitlines()
    assert [row.split("\t")[:2] for row in table] == [
        ["index", "name"], ["1", "class1"], ["2", "class2"], ["3", "class3"]
    ]  # fmt: skip


@needs_validator
@pytest.mark.parametrize("elsewhere", [False, True])
def test_batch_bids_passes_the_validator(raw_dataset, tmp_path, elsewhere):
    extra = ["-o", str(tmp_path / "o")] if elsewhere else []
    result = CliRunner().invoke(cli, ["batch", str(raw_dataset), "--bids", *extra, *FAST])
    assert result.exit_code == 0, result.output
    deriv = (tmp_path / "o" if elsewhere else raw_dataset) / "derivatives" / "segment"
    assert validator_errors(deriv) == []
    link = json.loads((deriv / "dataset_description.json").read_text())["DatasetLinks"]["raw"]
    assert link == ("../../../raw" if elsewhere else "../..")
    assert (deriv / link).resolve() == raw_dataset.resolve()


def test_pybids_finds_every_output_by_its_entities(raw_dataset, tmp_path):
    bids = pytest.importorskip("bids")
    out = tmp_path / "seg"
    args = ["bids", str(raw_dataset), str(out), "participant", "--bias-field", "--pve", *FAST]
    assert CliRunner().invoke(cli, args).exit_code == 0
    layout = bids.BIDSLayout(raw_dataset, derivatives=[out])
    found = {
        Path(f.path).relative_to(out).as_posix()
        for f in layout.get(scope="segment-em", subject=["01", "02"])
    }
    ignored = {"batch_summary.tsv"}  # in .bidsignore, with the bias fields and figures
    for rel in set(_files(out)) - ignored:
        if rel.startswith(".") or "_biasfield" in rel or "/figures/" in rel:
            continue
        if rel.startswith("sub-"):
            assert rel in found, rel
    dseg = layout.get(scope="segment-em", subject="02", suffix="dseg", extension=".nii.gz")
    assert [Path(f.path).name for f in dseg] == ["sub-02_dseg.nii.gz"]
    pve = layout.get(scope="segment-em", subject="01", suffix="probseg", label="CLASS2")
    assert [Path(f.path).name for f in pve] == ["sub-01_label-CLASS2_probseg.nii.gz"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("label", "participant label 07 not in the dataset (it has 01, 02)"),
        ("description", "not a BIDS dataset: no dataset_description.json in it"),
        ("inside", "is inside the raw dataset's subject folder sub-01"),
    ],
)
def test_bids_bad_input_exits_2_writing_nothing(raw_dataset, tmp_path, case, message):
    out = tmp_path / "out"
    if case == "description":
        (raw_dataset / "dataset_description.json").unlink()
    if case == "inside":
        out = raw_dataset / "sub-01" / "seg"
    before = _files(tmp_path)
    labels = ["--participant-label", "01", "07"] if case == "label" else []
    result = CliRunner().invoke(cli, ["bids", str(raw_dataset), str(out), "participant",
                                      *labels, *FAST])  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert _files(tmp_path) == before and not out.exists()


def test_bids_needs_the_participant_level(raw_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["bids", str(raw_dataset), str(tmp_path / "o"), "group"])
    assert result.exit_code == 2 and "'group' is not 'participant'" in result.output
