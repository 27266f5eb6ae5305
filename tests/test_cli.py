"""End-to-end tests of ``segment run`` (and the group's --help/--version).

Most runs go through click's ``CliRunner`` (click >= 8.2 keeps ``result.stderr`` apart from
``result.stdout``); a few run the real program with ``python -m segment`` and the ``segment``
console script.  Every bad input of the issue has its own test: exit code (1 data, 2 usage), one
``Error:`` line naming the file, no traceback without ``--debug``, nothing on stdout and nothing
left in the output folder.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import segment
from segment.cli import cli
from segment.exceptions import ConvergenceWarning, DataWarning, InputError

K = 3
OUTPUT_SUFFIXES = ("_dseg.nii.gz", "_probseg.nii.gz", "_qc.png", "_dseg.tsv", "_segment.json")


# ------------------------------------------------------------------------------ helpers
def invoke(*args, **kwargs):
    """Run the CLI in-process with string arguments."""
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def leftovers(folder: Path) -> list[str]:
    """Names of every file in ``folder`` (recursively); [] when it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_ok(result) -> list[Path]:
    """The run succeeded; returns the paths printed on stdout (its only content)."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert paths and all(p.is_file() for p in paths), result.stdout
    return paths


def assert_failed(result, *fragments, code: int = 1, out_dir: Path | None = None) -> str:
    """One error line naming the problem, the right exit code, nothing written.

    Returns the error line.
    """
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit)  # no uncaught exception
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if code == 1:  # a data error is exactly one line
        assert result.stderr.strip() == errors[0], result.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0], (fragment, errors[0])
    if out_dir is not None:
        assert leftovers(out_dir) == [], leftovers(out_dir)
    return errors[0]


def outputs(out_dir: Path, stem: str = "scan") -> dict[str, Path]:
    return {suffix: out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES}


@pytest.fixture
def scan(make_nifti, tissues) -> Path:
    """``scan.nii.gz`` (int16, the conftest affine, sform code 2 / qform code 1)."""
    return make_nifti(tissues, "scan.nii.gz")


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "out"


# ------------------------------------------------------------------------------ help and version
def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert segment.__version__ in result.stdout


def test_group_help_lists_run():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "run" in result.stdout and "Usage: " in result.stdout
    assert invoke("-h").stdout == result.stdout


def test_run_help_shows_options_and_examples():
    result = invoke("run", "--help")
    assert result.exit_code == 0
    text = result.stdout
    for option in (
        "-k, --n-components",
        "--mask",
        "--max-iter",
        "--tol",
        "--seed",
        "--variance-floor",
        "--chunk-size",
        "--scheduler",
        "--workers",
        "--no-probseg",
        "--overwrite",
        "--quiet",
        "--debug",
        "-o, --out-dir",
    ):
        assert option in text, option
    assert "Examples:" in text
    assert "segment run sample_scans/head_t1.nii.gz -o out/" in text
    assert "[default: 6" in text


def test_run_without_arguments_is_a_usage_error():
    result = invoke("run")
    assert result.exit_code == 2
    assert "Missing argument" in result.stderr


# ------------------------------------------------------------------------------ NIfTI end to end
def test_run_nifti_writes_all_outputs_on_the_input_grid(scan, out_dir, affine, tissues):
    result = invoke("run", scan, "-o", out_dir, "-k", K, "--seed", 3)
    printed = assert_ok(result)
    files = outputs(out_dir)
    assert printed == [files[s] for s in OUTPUT_SUFFIXES]
    assert leftovers(out_dir) == sorted(p.name for p in files.values())  # no .tmp files
    assert result.stderr.startswith(f"{scan}: K=3, ")  # the summary goes to stderr

    source = nib.load(scan)
    dseg = nib.load(files["_dseg.nii.gz"])
    probseg = nib.load(files["_probseg.nii.gz"])
    for img in (dseg, probseg):
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_allclose(img.get_sform(), source.get_sform())
        np.testing.assert_allclose(img.get_qform(), source.get_qform(), atol=1e-6)
        assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 1
        assert img.header.get_zooms()[:3] == source.header.get_zooms()
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(source.affine)

    assert dseg.shape == tissues.shape and dseg.get_data_dtype() == np.uint8
    labels = np.asarray(dseg.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {1, 2, 3}
    assert probseg.shape == tissues.shape + (K,)
    assert probseg.get_data_dtype() == np.float32
    probabilities = np.asarray(probseg.dataobj)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(-1) + 1, labels)

    # 1..K in ascending mean intensity: the dark background, the box, the bright core.
    assert labels[0, 0, 0] == 1 and labels[5, 5, 4] == 2 and labels[10, 12, 8] == 3
    means = [tissues[labels == k].mean() for k in (1, 2, 3)]
    assert means == sorted(means)


def test_run_json_sidecar_records_enough_to_reproduce(scan, out_dir):
    assert_ok(
        invoke(
            "run",
            scan,
            "-o",
            out_dir,
            "-k",
            K,
            "--seed",
            7,
            "--tol",
            "1e-5",
            "--variance-floor",
            "2.5",
            "--max-iter",
            50,
        )
    )
    record = json.loads((out_dir / "scan_segment.json").read_text())
    model = record["model"]
    assert model["n_components"] == K and model["n_channels"] == 1
    assert np.shape(model["means"]) == (K, 1) and np.shape(model["covariances"]) == (K, 1, 1)
    assert np.shape(model["variances"]) == (K, 1)
    assert np.isclose(sum(model["weights"]), 1.0)
    assert np.all(np.diff(np.ravel(model["means"])) > 0)
    assert len(model["log_likelihood_trace"]) == model["n_iter"] >= 1
    assert isinstance(model["converged"], bool)
    assert model["seed"] == 7 and model["max_iter"] == 50 and model["tol"] == 1e-5
    assert model["variance_floor"] == [2.5]
    assert record["options"]["seed"] == 7 and record["options"]["variance_floor"] == 2.5
    assert record["mask"] == {"spec": "none", "n_voxels": 20 * 24 * 16, "n_nonfinite_excluded": 0}
    counts = [entry["n_voxels"] for entry in record["labels"]]
    assert [entry["label"] for entry in record["labels"]] == [1, 2, 3]
    assert sum(counts) == 20 * 24 * 16
    labels = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    assert counts == [int((labels == k).sum()) for k in (1, 2, 3)]
    assert {"load_s", "fit_s", "write_s"} <= set(record["timings_s"])
    import hashlib

    assert record["inputs"] == [
        {"path": str(scan), "sha256": hashlib.sha256(scan.read_bytes()).hexdigest()}
    ]
    assert record["software"]["name"] == "segment"
    assert record["software"]["version"] == segment.__version__
    assert record["command_line"][0] == "segment"
    assert record["outputs"] == {
        "dseg": "scan_dseg.nii.gz",
        "probseg": "scan_probseg.nii.gz",
        "qc": "scan_qc.png",
        "dseg_tsv": "scan_dseg.tsv",
    }


def test_written_labels_equal_the_api_labels(scan, out_dir):
    """Round trip: what `segment run` writes is what segment_file returns."""
    assert_ok(invoke("run", scan, "-o", out_dir, "-k", K, "--seed", 1))
    result = segment.segment_file(scan, n_components=K, seed=1)
    written = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    np.testing.assert_array_equal(written, result.labels)
    probabilities = np.asarray(nib.load(out_dir / "scan_probseg.nii.gz").dataobj)
    np.testing.assert_allclose(probabilities, result.responsibilities, atol=1e-7)
    record = json.loads((out_dir / "scan_segment.json").read_text())
    np.testing.assert_allclose(record["model"]["means"], result.estimator.means_)


def test_run_uncompressed_nifti2_input(make_nifti, tissues, out_dir, affine):
    path = make_nifti(tissues.astype(np.float32), "scan2.nii", nifti2=True, dtype=np.float32)
    assert_ok(invoke("run", path, "-o", out_dir, "-k", K))
    dseg = nib.load(out_dir / "scan2_dseg.nii.gz")
    assert isinstance(dseg, nib.Nifti2Image)
    np.testing.assert_allclose(dseg.affine, affine)
    assert dseg.shape == tissues.shape


def test_run_applies_nifti_scaling(make_nifti, tissues, out_dir):
    """Stored values 0..~90 with slope 10: fitted means are in scaled units."""
    path = make_nifti(np.round(tissues / 10), "scaled.nii.gz", slope=10.0, inter=5.0)
    assert_ok(invoke("run", path, "-o", out_dir, "-k", K))
    record = json.loads((out_dir / "scaled_segment.json").read_text())
    assert 600 < record["model"]["means"][-1][0] < 1000


def test_run_4d_nifti_with_one_volume(make_nifti, tissues, out_dir):
    path = make_nifti(tissues[..., np.newaxis], "vol4d.nii.gz")
    assert_ok(invoke("run", path, "-o", out_dir, "-k", K))
    assert nib.load(out_dir / "vol4d_dseg.nii.gz").shape == tissues.shape
    assert nib.load(out_dir / "vol4d_probseg.nii.gz").shape == tissues.shape + (K,)


def test_run_two_channels_is_one_multichannel_scan(make_nifti, tissues, out_dir, rng):
    t1 = make_nifti(tissues, "t1.nii.gz")
    t2 = make_nifti(1000 - tissues + rng.normal(0, 5, tissues.shape), "t2.nii.gz")
    printed = assert_ok(invoke("run", t1, t2, "-o", out_dir, "-k", K))
    assert [p.name for p in printed] == ["t1" + s for s in OUTPUT_SUFFIXES]
    record = json.loads((out_dir / "t1_segment.json").read_text())
    assert record["model"]["n_channels"] == 2
    assert np.shape(record["model"]["means"]) == (K, 2)
    assert np.shape(record["model"]["covariances"]) == (K, 2, 2)
    assert [entry["path"] for entry in record["inputs"]] == [str(t1), str(t2)]
    labels = np.asarray(nib.load(out_dir / "t1_dseg.nii.gz").dataobj)
    assert labels[0, 0, 0] == 1 and labels[10, 12, 8] == 3


def test_run_nonfinite_voxels_warned_and_labelled_zero(make_nifti, tissues, out_dir):
    data = tissues.astype(np.float32)
    data[0, 0, :5] = np.nan
    data[1, 1, 0] = np.inf
    path = make_nifti(data, "nan.nii.gz", dtype=np.float32)
    result = invoke("run", path, "-o", out_dir, "-k", K)
    assert_ok(result)
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(path) in warning[0] and "6 non-finite voxels" in warning[0]
    labels = np.asarray(nib.load(out_dir / "nan_dseg.nii.gz").dataobj)
    probabilities = np.asarray(nib.load(out_dir / "nan_probseg.nii.gz").dataobj)
    assert (labels[0, 0, :5] == 0).all() and labels[1, 1, 0] == 0
    assert (labels == 0).sum() == 6
    assert (probabilities[labels == 0] == 0).all()
    record = json.loads((out_dir / "nan_segment.json").read_text())
    assert record["mask"]["n_nonfinite_excluded"] == 6


def test_run_with_mask_file(make_nifti, tissues, out_dir):
    mask = np.zeros(tissues.shape, np.uint8)
    mask[2:18, 2:22, 1:15] = 1
    mask_path = make_nifti(mask, "mask.nii.gz", dtype=np.uint8)
    scan = make_nifti(tissues, "scan.nii.gz")
    assert_ok(invoke("run", scan, "-o", out_dir, "-k", K, "--mask", mask_path))
    labels = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    probabilities = np.asarray(nib.load(out_dir / "scan_probseg.nii.gz").dataobj)
    inside = mask.astype(bool)
    assert (labels[~inside] == 0).all() and (labels[inside] > 0).all()
    assert (probabilities[~inside] == 0).all()
    np.testing.assert_allclose(probabilities[inside].sum(-1), 1.0, atol=1e-5)
    record = json.loads((out_dir / "scan_segment.json").read_text())
    assert record["mask"]["spec"] == str(mask_path)
    assert record["mask"]["n_voxels"] == int(inside.sum())


def test_run_auto_mask(make_nifti, tissues, out_dir):
    data = tissues.copy()
    data[:3] = 0  # a dark slab of background around the object
    data[-3:] = 0
    scan = make_nifti(data, "scan.nii.gz")
    assert_ok(invoke("run", scan, "-o", out_dir, "-k", 2, "--mask", "auto"))
    labels = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    assert (labels[:3] == 0).all() and labels[10, 12, 8] == 2
    record = json.loads((out_dir / "scan_segment.json").read_text())
    assert record["mask"]["spec"] == "auto"
    assert record["mask"]["n_voxels"] == int((labels > 0).sum())


def test_run_no_probseg_and_no_qc(scan, out_dir):
    printed = assert_ok(invoke("run", scan, "-o", out_dir, "-k", K, "--no-probseg", "--no-qc"))
    assert [p.name for p in printed] == ["scan_dseg.nii.gz", "scan_dseg.tsv", "scan_segment.json"]
    assert leftovers(out_dir) == ["scan_dseg.nii.gz", "scan_dseg.tsv", "scan_segment.json"]
    record = json.loads((out_dir / "scan_segment.json").read_text())
    assert record["outputs"] == {"dseg": "scan_dseg.nii.gz", "dseg_tsv": "scan_dseg.tsv"}


def test_compression_level_changes_the_file_size_not_the_maps(scan, tmp_path):
    sizes, maps = {}, {}
    for level in (0, 1, 9):
        out = tmp_path / str(level)
        assert_ok(invoke("run", scan, "-o", out, "-k", K, "--no-qc", "--compression-level", level))
        probseg = out / "scan_probseg.nii.gz"
        sizes[level], maps[level] = probseg.stat().st_size, nib.load(probseg).get_fdata()
        assert gzip.decompress(probseg.read_bytes())[:4] == (348).to_bytes(4, "little")
    assert sizes[0] > sizes[1] > sizes[9]
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[9], maps[1])
    bad = invoke("run", scan, "-o", tmp_path / "bad", "--compression-level", 10)
    assert_failed(bad, "--compression-level", code=2, out_dir=tmp_path / "bad")


def test_run_schedulers_and_chunks_give_the_same_labels(scan, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert_ok(invoke("run", scan, "-o", a, "-k", K, "--scheduler", "synchronous"))
    assert_ok(
        invoke(
            "run",
            scan,
            "-o",
            b,
            "-k",
            K,
            "--scheduler",
            "threads",
            "--workers",
            2,
            "--chunk-size",
            997,
        )
    )
    np.testing.assert_array_equal(
        nib.load(a / "scan_dseg.nii.gz").get_fdata(), nib.load(b / "scan_dseg.nii.gz").get_fdata()
    )


# ------------------------------------------------------------------------------ 2-D pictures
@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("pic.png", np.uint8),
        ("pic16.png", np.uint16),
        ("pic.bmp", np.uint8),
        ("pic.jpg", np.uint8),
        ("pic.tif", np.float32),
        ("pic16.tiff", np.uint16),
    ],
)
def test_run_2d_picture(make_image, picture, out_dir, name, dtype):
    scale = 250.0 if dtype == np.uint16 else 1.0
    path = make_image((picture * scale).astype(dtype), name)
    printed = assert_ok(invoke("run", path, "-o", out_dir, "-k", K))
    stem = name.split(".")[0]
    assert [p.name for p in printed] == [
        f"{stem}_dseg.png",
        f"{stem}_probseg.tif",
        f"{stem}_qc.png",
        f"{stem}_dseg.tsv",
        f"{stem}_segment.json",
    ]
    assert leftovers(out_dir) == sorted(p.name for p in printed)
    import skimage.io

    labels = skimage.io.imread(out_dir / f"{stem}_dseg.png")
    assert labels.dtype == np.uint8 and labels.shape == picture.shape
    assert labels[0, 0] == 1 and labels[12, 12] == 2 and labels[20, 25] == 3
    pages = tifffile.imread(out_dir / f"{stem}_probseg.tif")
    assert pages.dtype == np.float32 and pages.shape == (K,) + picture.shape
    with tifffile.TiffFile(out_dir / f"{stem}_probseg.tif") as tif:
        assert len(tif.pages) == K
    np.testing.assert_allclose(pages.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pages.argmax(0) + 1, labels)
    record = json.loads((out_dir / f"{stem}_segment.json").read_text())
    assert np.shape(record["model"]["means"]) == (K, 1)
    assert record["outputs"]["probseg"] == f"{stem}_probseg.tif"
    assert skimage.io.imread(out_dir / f"{stem}_qc.png").ndim == 3


def test_run_rgb_picture_warns_about_luminance(make_image, picture, out_dir):
    grey = picture.astype(np.uint8)
    path = make_image(np.stack([grey, grey, grey], -1), "colour.png")
    result = invoke("run", path, "-o", out_dir, "-k", K)
    assert_ok(result)
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(path) in warning[0] and "luminance" in warning[0]
    import skimage.io

    assert skimage.io.imread(out_dir / "colour_dseg.png").shape == picture.shape


def test_quiet_silences_warnings_and_summary(make_image, picture, out_dir):
    grey = picture.astype(np.uint8)
    path = make_image(np.stack([grey, grey, grey, grey], -1), "rgba.png")
    result = invoke("run", path, "-o", out_dir, "-k", K, "--quiet")
    printed = assert_ok(result)
    assert result.stderr == ""
    assert len(printed) == 5


# ------------------------------------------------------------------------------ output safety
def test_existing_outputs_are_not_overwritten(scan, out_dir, monkeypatch):
    assert_ok(invoke("run", scan, "-o", out_dir, "-k", K))
    before = {p: p.read_bytes() for p in out_dir.iterdir()}

    def no_fit(*args, **kwargs):
        raise AssertionError("segment run fitted although the outputs exist")

    monkeypatch.setattr(segment.GaussianMixtureEM, "fit", no_fit)
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert_failed(result, out_dir / "scan_dseg.nii.gz", "exists; pass --overwrite")
    assert {p: p.read_bytes() for p in out_dir.iterdir()} == before
    monkeypatch.undo()
    assert_ok(invoke("run", scan, "-o", out_dir, "-k", 2, "--overwrite"))
    record = json.loads((out_dir / "scan_segment.json").read_text())
    assert record["model"]["n_components"] == 2
    assert leftovers(out_dir) == sorted(p.name for p in before)


def test_one_existing_output_is_enough_to_refuse(scan, out_dir):
    out_dir.mkdir()
    (out_dir / "scan_qc.png").write_bytes(b"keep me")
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert_failed(result, out_dir / "scan_qc.png", "exists")
    assert leftovers(out_dir) == ["scan_qc.png"]
    assert (out_dir / "scan_qc.png").read_bytes() == b"keep me"


def test_ctrl_c_while_writing_leaves_no_partial_file(scan, out_dir, monkeypatch):
    """Interrupted after the label map was written and inside the probability writer."""
    import segment.io

    def interrupted(probabilities, reference, path, **kwargs):
        with segment.io.atomic_write(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise KeyboardInterrupt

    monkeypatch.setattr(segment.io, "write_probabilities", interrupted)
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert leftovers(out_dir) == []


def test_ctrl_c_while_fitting_writes_nothing(scan, out_dir, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment.GaussianMixtureEM, "fit", interrupted)
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert result.exit_code == 130 and "Interrupted" in result.stderr
    assert not out_dir.exists()


def test_failed_write_names_the_file_and_cleans_up(scan, out_dir, monkeypatch):
    import segment.qc

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(segment.qc, "write_qc", disk_full)
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert_failed(result, out_dir / "scan_qc.png", "No space left on device", out_dir=out_dir)
    assert not out_dir.exists()  # created by this run, removed again


def test_unexpected_error_is_one_line_unless_debug(scan, out_dir, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(segment.GaussianMixtureEM, "fit", broken)
    line = assert_failed(invoke("run", scan, "-o", out_dir, "-k", K), "RuntimeError: boom")
    assert "--debug" in line
    result = invoke("run", scan, "-o", out_dir, "-k", K, "--debug")
    assert isinstance(result.exception, RuntimeError)  # propagates with its traceback


def test_stdout_holds_only_result_paths(scan, out_dir):
    result = invoke("run", scan, "-o", out_dir, "-k", K)
    assert result.stdout.splitlines() == [str(out_dir / f"scan{s}") for s in OUTPUT_SUFFIXES]
    assert "EM iteration" not in result.stderr  # no progress when stderr is not a terminal


def test_progress_printer_writes_to_a_terminal_only(capsys, monkeypatch):
    from segment.commands.common import progress_printer, show_warning

    assert progress_printer(quiet=False) is None  # captured stderr is not a TTY
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_printer(quiet=True) is None
    callback = progress_printer(quiet=False)
    callback(3, -1234.5, 2.5e-3)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "EM iteration    3" in captured.err and "-1.234500e+03" in captured.err
    assert "2.50e-03" in captured.err
    callback(4, -1234.0, 1e-4)
    show_warning("careful", DataWarning, "x.py", 1)  # ends the progress line first
    show_warning("again", ConvergenceWarning, "x.py", 2)
    show_warning("nibabel's own", UserWarning, "/site-packages/nibabel/x.py", 3)  # not shown
    err = capsys.readouterr().err
    assert err.startswith("\r\033[K  EM iteration    4") and err.endswith(
        "\nwarning: careful\nwarning: again\n"
    )
    assert not err.endswith("\n\nwarning: again\n")


# ------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path, out_dir):
    missing = tmp_path / "nope.nii.gz"
    assert_failed(invoke("run", missing, "-o", out_dir), missing, "file not found", out_dir=out_dir)
    assert not out_dir.exists()


def test_unreadable_file(scan, out_dir, monkeypatch):
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == scan and mode & os.R_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)  # chmod does not stop root
    assert_failed(invoke("run", scan, "-o", out_dir), scan, "permission denied", out_dir=out_dir)


def test_directory_given_as_file(tmp_path, out_dir):
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    assert_failed(invoke("run", folder, "-o", out_dir), folder, "is a directory", out_dir=out_dir)


def test_unsupported_extension(tmp_path, out_dir):
    path = tmp_path / "scan.mgz"
    path.write_bytes(b"\0" * 400)
    assert_failed(
        invoke("run", path, "-o", out_dir), path, "unsupported file type '.mgz'", out_dir=out_dir
    )


def test_truncated_nifti_gz(scan, tmp_path, out_dir):
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    assert_failed(invoke("run", path, "-o", out_dir), path, "cannot read NIfTI", out_dir=out_dir)


def test_truncated_uncompressed_nifti(make_nifti, tissues, tmp_path, out_dir):
    full = make_nifti(tissues, "full.nii")
    path = tmp_path / "cut.nii"
    path.write_bytes(full.read_bytes()[:1000])
    assert_failed(invoke("run", path, "-o", out_dir), path, "truncated", out_dir=out_dir)


def test_corrupt_nifti_gz(tmp_path, out_dir):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"this is no NIfTI header" * 30))
    assert_failed(invoke("run", path, "-o", out_dir), path, "cannot read NIfTI", out_dir=out_dir)


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.tif"])
def test_truncated_picture(make_image, picture, tmp_path, out_dir, name):
    full = make_image(picture.astype(np.uint8), "full" + Path(name).suffix)
    path = tmp_path / name
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    assert_failed(invoke("run", path, "-o", out_dir), path, "cannot read image", out_dir=out_dir)


def test_4d_nifti_with_several_volumes(make_nifti, tissues, out_dir):
    path = make_nifti(np.stack([tissues, tissues, tissues], -1), "series.nii.gz")
    assert_failed(invoke("run", path, "-o", out_dir), path, "3 volumes", out_dir=out_dir)


def test_1d_nifti(make_nifti, out_dir):
    path = make_nifti(np.arange(30).reshape(30, 1, 1), "line.nii.gz")
    assert_failed(invoke("run", path, "-o", out_dir), path, "1-D data", out_dir=out_dir)


def test_1d_picture(make_image, out_dir):
    path = make_image(np.arange(50, dtype=np.uint8).reshape(1, 50), "row.png")
    assert_failed(invoke("run", path, "-o", out_dir), path, "1-D data", out_dir=out_dir)


def test_channel_with_another_shape(scan, make_nifti, tissues, out_dir):
    other = make_nifti(tissues[:10], "other.nii.gz")
    assert_failed(
        invoke("run", scan, other, "-o", out_dir),
        other,
        "channel grid does not match scan.nii.gz",
        "(10, 24, 16)",
        out_dir=out_dir,
    )


def test_channel_with_another_affine(scan, make_nifti, tissues, out_dir, affine):
    shifted = affine.copy()
    shifted[:3, 3] += 10
    other = make_nifti(tissues, "moved.nii.gz", affine=shifted)
    assert_failed(
        invoke("run", scan, other, "-o", out_dir), other, "channel grid", "affine", out_dir=out_dir
    )


def test_mask_on_another_grid(scan, make_nifti, tissues, out_dir):
    mask = make_nifti(np.ones((20, 24, 15)), "small_mask.nii.gz", dtype=np.uint8)
    assert_failed(
        invoke("run", scan, "-o", out_dir, "--mask", mask),
        mask,
        "mask grid does not match",
        out_dir=out_dir,
    )


def test_empty_mask(scan, make_nifti, tissues, out_dir):
    mask = make_nifti(np.zeros(tissues.shape), "empty_mask.nii.gz", dtype=np.uint8)
    assert_failed(
        invoke("run", scan, "-o", out_dir, "--mask", mask), mask, "mask is empty", out_dir=out_dir
    )


def test_missing_mask_file(scan, tmp_path, out_dir):
    mask = tmp_path / "no_mask.nii.gz"
    assert_failed(
        invoke("run", scan, "-o", out_dir, "--mask", mask),
        mask,
        "mask file not found",
        out_dir=out_dir,
    )


def test_all_voxels_nonfinite(make_nifti, tissues, out_dir):
    path = make_nifti(np.full(tissues.shape, np.nan), "nan.nii.gz", dtype=np.float32)
    assert_failed(invoke("run", path, "-o", out_dir, "-k", 2), path, "NaN or inf", out_dir=out_dir)


def test_constant_image(make_nifti, tissues, out_dir):
    path = make_nifti(np.full(tissues.shape, 7), "flat.nii.gz")
    assert_failed(invoke("run", path, "-o", out_dir, "-k", 2), path, "constant", out_dir=out_dir)


def test_constant_image_with_auto_mask(make_nifti, tissues, out_dir):
    path = make_nifti(np.full(tissues.shape, 7), "flat.nii.gz")
    assert_failed(
        invoke("run", path, "-o", out_dir, "-k", 2, "--mask", "auto"),
        path,
        "constant",
        out_dir=out_dir,
    )


def test_fewer_distinct_intensities_than_k(make_nifti, tissues, out_dir):
    path = make_nifti(np.where(tissues > 300, 2, 1), "binary.nii.gz")
    line = assert_failed(
        invoke("run", path, "-o", out_dir, "-k", 3),
        path,
        "only 2 distinct intensities",
        "n_components=3",
        out_dir=out_dir,
    )
    assert "-k" in line


def test_out_dir_cannot_be_created(scan, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out_dir = blocker / "sub"
    assert_failed(
        invoke("run", scan, "-o", out_dir, "-k", K), out_dir, "cannot create the output folder"
    )
    assert blocker.read_text() == "not a folder"


def test_out_dir_is_a_file(scan, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_failed(invoke("run", scan, "-o", blocker, "-k", K), blocker, "is a file", code=2)
    assert blocker.read_text() == "not a folder"


def test_out_dir_not_writable(scan, out_dir, monkeypatch):
    out_dir.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).absolute() == out_dir.absolute() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)  # chmod does not stop root
    assert_failed(
        invoke("run", scan, "-o", out_dir, "-k", K), out_dir, "not writable", out_dir=out_dir
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scheduler", "bogus"], "'--scheduler'"),
        (["-k", "0"], "'-k' / '--n-components'"),
        (["-k", "many"], "'-k' / '--n-components'"),
        (["--tol", "-1"], "'--tol'"),
        (["--max-iter", "0"], "'--max-iter'"),
        (["--workers", "0"], "'--workers'"),
        (["--variance-floor", "0"], "'--variance-floor'"),
        (["--chunk-size", "0"], "'--chunk-size'"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_unknown_option_value_is_a_usage_error(scan, out_dir, args, fragment):
    result = invoke("run", scan, "-o", out_dir, *args)
    line = assert_failed(result, fragment, code=2, out_dir=out_dir)
    assert "Usage: " in result.stderr and line.startswith("Error: ")
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        ("{stem", "is malformed"),
        ("mask}.nii.gz", "is malformed"),
        ("{subject}_mask.nii.gz", "unknown placeholder {subject}"),
        ("/masks/{rel}/{stem:>4}.nii.gz", "unknown placeholder {stem:>4}"),
        ("bids", "needs BIDS mode (--bids)"),
    ],
)
def test_batch_bad_mask_template_is_a_usage_error(scan, out_dir, mask, fragment):
    result = invoke("batch", scan.parent, "-o", out_dir, "--mask", mask)
    line = assert_failed(result, "Invalid value for '--mask'", fragment, code=2)
    assert "Usage: " in result.stderr and line.startswith("Error: ")
    assert not out_dir.exists()


def test_batch_help_explains_mask_templates():
    result = invoke("batch", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "PATH|TEMPLATE|auto|none|bids" in text and "{stem}" in text and "{rel}" in text
    assert "--mask '{stem}_brainmask.nii.gz'" in text and "--mask bids" in text
    assert "PATH|TEMPLATE" not in invoke("run", "--help").output  # `run` takes one mask file


def test_debug_keeps_the_exception(tmp_path, out_dir):
    missing = tmp_path / "nope.nii.gz"
    result = invoke("run", missing, "-o", out_dir, "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, InputError) and result.exception.path == missing


# ------------------------------------------------------------------------------ real processes
def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_python_m_segment_runs_a_scan(scan, out_dir, tmp_path):
    proc = _run(
        [sys.executable, "-m", "segment", "run", scan, "-o", out_dir, "-k", K, "--seed", 2],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out_dir / f"scan{s}") for s in OUTPUT_SUFFIXES]
    assert proc.stderr.startswith(f"{scan}: K=3")
    assert "Traceback" not in proc.stderr
    record = json.loads((out_dir / "scan_segment.json").read_text())
    assert record["command_line"] == [
        "segment",
        "run",
        str(scan),
        "-o",
        str(out_dir),
        "-k",
        "3",
        "--seed",
        "2",
    ]
    written = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    np.testing.assert_array_equal(
        written, segment.segment_file(scan, n_components=K, seed=2).labels
    )


def _console_script() -> str:
    script = Path(sys.executable).with_name("segment")
    found = str(script) if script.exists() else shutil.which("segment")
    if found is None:
        pytest.skip("the segment console script is not installed")
    return found


def test_console_script_version_and_bad_input_with_debug(tmp_path):
    script = _console_script()
    proc = _run([script, "--version"])
    assert proc.returncode == 0 and segment.__version__ in proc.stdout
    missing = tmp_path / "nope.nii.gz"
    out_dir = tmp_path / "out"
    proc = _run([script, "run", missing, "-o", out_dir])
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"Error: {missing}: file not found"
    proc = _run([script, "run", missing, "-o", out_dir, "--debug"])
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "InputError" in proc.stderr
    assert not out_dir.exists()


def test_console_script_shows_progress_on_a_terminal(scan, out_dir):
    """stderr on a pseudo-terminal: the EM progress appears there, stdout stays clean."""
    pty = pytest.importorskip("pty")
    primary, replica = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                _console_script(),
                "run",
                str(scan),
                "-o",
                str(out_dir),
                "-k",
                str(K),
                "--tol",
                "0",
                "--max-iter",
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=replica,
            text=True,
        )
        os.close(replica)
        stdout, _ = proc.communicate(timeout=120)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO once the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    terminal = b"".join(chunks).decode()
    assert proc.returncode == 0, terminal
    assert stdout.splitlines() == [str(out_dir / f"scan{s}") for s in OUTPUT_SUFFIXES]
    assert "EM iteration    4" in terminal and "log-likelihood" in terminal
    lines = terminal.splitlines()
    # tol=0 gives a ConvergenceWarning; it starts its own line after the progress line.
    assert any(line.startswith("warning: EM did not converge") for line in lines), lines
    assert lines[-1].startswith(f"{scan}: K=3, 4 iterations, NOT converged")


# ------------------------------------------------------------------------------ -k auto
def three_level_scan(make_nifti, rng, name="scan.nii.gz"):
    """int16 volume with three well-separated intensity classes (BIC should pick K = 3)."""
    data = np.full((12, 13, 14), 100.0)
    data[3:9, 3:10, 3:11] = 600.0
    data[5:7, 5:8, 5:9] = 1200.0
    return make_nifti((data + rng.normal(0, 20, data.shape)).round().astype(np.int16), name)


def test_run_k_auto_picks_k_by_bic_and_records_the_curve(make_nifti, rng, tmp_path):
    scan = three_level_scan(make_nifti, rng)
    out_dir = tmp_path / "out"
    result = invoke("run", scan, "-o", out_dir, "-k", "auto:2-5")
    assert_ok(result)
    assert f"{scan}: K=3 (BIC over 2..5)" in result.stderr
    record = json.loads((out_dir / "scan_segment.json").read_text())
    selection = record["model_selection"]
    assert selection["requested"] == "auto:2-5" and selection["criterion"] == "BIC"
    assert selection["tried"] == [2, 3, 4, 5] and selection["n_components"] == 3
    bics = [row["bic"] for row in selection["curve"]]
    assert min(bics) == bics[1] and record["model"]["n_components"] == 3
    assert [row["n_parameters"] for row in selection["curve"]] == [5, 8, 11, 14]
    labels = np.asarray(nib.load(out_dir / "scan_dseg.nii.gz").dataobj)
    assert set(np.unique(labels)) == {1, 2, 3}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("auto:3-3", "fewer than two values"),
        ("auto:6-2", "fewer than two values"),
        ("auto:2", "'auto:A-B'"),
        ("many", "'auto:A-B'"),
    ],
)
def test_run_k_auto_bad_range_is_a_usage_error(make_nifti, tmp_path, value, fragment):
    out_dir = tmp_path / "out"
    result = invoke("run", make_nifti(), "-o", out_dir, "-k", value)
    assert_failed(result, "-k", fragment, code=2, out_dir=out_dir)
