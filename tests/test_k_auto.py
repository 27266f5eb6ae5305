"""``-k auto`` (K chosen by BIC) in every entry point: run with --pve, batch, bids, pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from segment.batch import read_summary
from segment.cli import cli
from segment.exceptions import InputError
from segment.pipelines import load_pipeline

FAST = ["--max-iter", "60", "--scheduler", "synchronous", "-q", "--no-qc"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def three_levels(rng, shape=(12, 13, 14)) -> np.ndarray:
    """int16 volume with three well-separated intensity classes: BIC picks K = 3."""
    data = np.full(shape, 100.0)
    data[3:9, 3:10, 3:11] = 600.0
    data[5:7, 5:8, 5:9] = 1200.0
    return (data + rng.normal(0, 20, data.shape)).round().astype(np.int16)


def write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.1, 1.2, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def check_selection(record: dict, requested: str, tried: list[int]) -> None:
    """The sidecar says how K was chosen: the BIC of each K tried, the lowest one kept."""
    selection = record["model_selection"]
    assert selection["requested"] == requested and selection["criterion"] == "BIC"
    assert selection["tried"] == tried
    bics = {row["n_components"]: row["bic"] for row in selection["curve"]}
    assert list(bics) == tried
    assert selection["n_components"] == min(bics, key=bics.get) == 3
    assert record["model"]["n_components"] == 3


def test_run_k_auto_with_pve(rng, tmp_path):
    scan = write(tmp_path / "scan.nii.gz", three_levels(rng))
    out = tmp_path / "out"
    result = invoke("run", scan, "-o", out, "-k", "auto:2-4", "--pve", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scan_segment.json").read_text())
    check_selection(record, "auto:2-4", [2, 3, 4])
    fractions = np.asarray(nib.load(out / "scan_pve.nii.gz").dataobj)
    assert fractions.shape == (12, 13, 14, 3)  # one volume per class of the chosen K
    np.testing.assert_allclose(fractions.sum(-1), 1.0, atol=1e-5)
    assert record["volumes"]["estimate"] == "fractions"
    assert record["options"]["n_components"] == 3 and record["options"]["pve"] is True
    assert record["final_options"]["n_components"] == "auto:2-4"


def test_batch_k_auto_chooses_k_for_each_scan_and_resumes(rng, tmp_path):
    root = tmp_path / "scans"
    for name in ("a", "b"):
        write(root / f"{name}.nii.gz", three_levels(rng))
    out = tmp_path / "out"
    args = ["batch", root, "-o", out, "-k", "auto:2-4", *FAST]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = read_summary(out / "batch_summary.tsv")
    assert [(r["input"], r["status"], r["K"]) for r in rows] == [
        ("a.nii.gz", "ok", "3"), ("b.nii.gz", "ok", "3")]  # fmt: skip
    for name in ("a", "b"):
        record = json.loads((out / f"{name}_segment.json").read_text())
        check_selection(record, "auto:2-4", [2, 3, 4])
        assert record["final_options"]["n_components"] == "auto:2-4"
    assert invoke(*args).exit_code == 0  # the same request: complete, skipped
    assert {r["status"] for r in read_summary(out / "batch_summary.tsv")} == {"skipped"}
    assert invoke(*args[: -len(FAST)], "-k", "auto:2-5", *FAST).exit_code == 1  # another range
    error = read_summary(out / "batch_summary.tsv")[0]["error"]
    assert "n_components='auto:2-4', now 'auto:2-5'" in error


def test_bids_k_auto_with_pve_names_the_volumes_after_the_fit(rng, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    write(raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz", three_levels(rng))
    out = tmp_path / "deriv"
    result = invoke("bids", raw, out, "participant", "-k", "auto:2-4", "--pve", *FAST)
    assert result.exit_code == 0, result.output
    anat = out / "sub-01" / "anat"
    record = json.loads((anat / "sub-01_dseg.json").read_text())
    check_selection(record, "auto:2-4", [2, 3, 4])
    label_map = json.loads((anat / "sub-01_probseg.json").read_text())["LabelMap"]
    assert label_map == {"0": "class1", "1": "class2", "2": "class3"}
    fraction_files = sorted(p.name for p in anat.glob("*_label-*_probseg.nii.gz"))
    assert fraction_files == [f"sub-01_label-CLASS{k}_probseg.nii.gz" for k in (1, 2, 3)]
    assert "4\tclass4" in (out / "dseg.tsv").read_text()  # the labels any K of the range has


def test_pipeline_k_auto(rng, tmp_path):
    scan = write(tmp_path / "scan.nii.gz", three_levels(rng))
    preset = tmp_path / "auto.toml"
    preset.write_text('description = "K by BIC"\n[model]\nn_components = "auto:2-4"\n')
    assert load_pipeline(preset).options["n_components"] == "auto:2-4"
    out = tmp_path / "out"
    result = invoke("run", scan, "-o", out, "-p", preset, *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scan_segment.json").read_text())
    check_selection(record, "auto:2-4", [2, 3, 4])
    assert record["option_sources"]["n_components"] == "pipeline"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [('"auto:3-3"', "auto:A-B"), ('"auto:5-2"', "auto:A-B"), ('"sometimes"', "auto:A-B")],
)
def test_pipeline_k_auto_range_of_fewer_than_two_values_is_refused(tmp_path, value, fragment):
    preset = tmp_path / "bad.toml"
    preset.write_text(f'description = "x"\n[model]\nn_components = {value}\n')
    with pytest.raises(InputError, match="model.n_components") as caught:
        load_pipeline(preset)
    assert fragment in str(caught.value)
    result = invoke("run", tmp_path / "scan.nii.gz", "-o", tmp_path / "out", "-p", preset)
    assert result.exit_code == 2 and "n_components" in result.output
    assert not (tmp_path / "out").exists()


def test_pipeline_labels_need_an_integer_k(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text('description = "x"\nlabels = ["a", "b"]\n[model]\nn_components = "auto"\n')
    with pytest.raises(InputError, match="labels.*integer model.n_components"):
        load_pipeline(preset)


@pytest.mark.parametrize("command", ["batch", "bids"])
@pytest.mark.parametrize("value", ["auto:3-3", "auto:6-2"])
def test_batch_and_bids_k_auto_range_of_fewer_than_two_values_is_a_usage_error(
    rng, tmp_path, command, value
):
    raw = tmp_path / "raw"
    (raw / "sub-01" / "anat").mkdir(parents=True)
    (raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    out = tmp_path / "out"
    args = [raw, "-o", out] if command == "batch" else [raw, out, "participant"]
    result = invoke(command, *args, "-k", value)
    assert result.exit_code == 2
    assert "fewer than two values" in result.output
    assert not out.exists()
