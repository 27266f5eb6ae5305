"""Tests for segment.batch and `segment batch`: discovery, summary, resume, kill, dask, BIDS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import skimage.io
from click.testing import CliRunner

from segment import io as segment_io
from segment.batch import clean_stale_temporaries, discover, read_summary, run_batch
from segment.cli import cli
from segment.naming import bids_output_paths, parse_bids_entities
from segment.samples import make_head_phantom, make_microscopy_image

SEGMENT = str(Path(sys.executable).with_name("segment"))
SHAPE = (24, 28, 20)
FAST = ["--max-iter", "40", "-q"]


def write_head(path: Path, seed: int, *, shape=SHAPE) -> Path:
    image, _, affine = make_head_phantom(shape, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def write_picture(path: Path, seed: int) -> Path:
    image, _ = make_microscopy_image((33, 41), n_phases=2, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, image, photometric="minisblack")
    else:
        skimage.io.imsave(path, (image // 16).astype(np.uint8), check_contrast=False)
    return path


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def scan_folder(tmp_path, monkeypatch):
    """Sub-folders, NIfTI (.nii.gz, .nii), PNG, TIFF, a corrupt and an unreadable file."""
    root = tmp_path / "scans"
    write_head(root / "a.nii.gz", 1)
    write_head(root / "site1" / "b.nii", 2)
    write_picture(root / "site1" / "deep" / "c.png", 3)
    write_picture(root / "site2" / "d.tif", 4)
    (root / "site2" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    unreadable = write_head(root / "site2" / "locked.nii.gz", 5)
    unreadable.chmod(0)
    (root / "notes.txt").write_text("not a scan")
    (root / ".hidden.nii.gz").write_bytes(b"")
    if os.geteuid() == 0:  # root reads anything: make the permission check fail as for users
        real_access = segment_io.os.access
        monkeypatch.setattr(
            segment_io.os,
            "access",
            lambda p, mode, **kw: (
                False if Path(p).name == "locked.nii.gz" else real_access(p, mode)
            ),
        )
    yield root
    unreadable.chmod(0o644)


EXPECTED_ORDER = [
    "a.nii.gz",
    "site1/b.nii",
    "site1/deep/c.png",
    "site2/corrupt.nii.gz",
    "site2/d.tif",
    "site2/locked.nii.gz",
]


def test_discover(scan_folder, tmp_path):
    rel = [p.relative_to(scan_folder).as_posix() for p in discover(scan_folder, recursive=True)]
    assert rel == EXPECTED_ORDER
    assert [p.name for p in discover(scan_folder)] == ["a.nii.gz"]
    found = discover(scan_folder, ["*.NII*"], recursive=True)
    assert [p.name for p in found] == ["a.nii.gz", "b.nii", "corrupt.nii.gz", "locked.nii.gz"]
    found = discover(scan_folder, ["site1/*"], recursive=True)
    assert [p.name for p in found] == ["b.nii"]
    out = scan_folder / "out"
    write_head(out / "a_dseg.nii.gz", 0)
    assert "out/a_dseg.nii.gz" not in {
        p.relative_to(scan_folder).as_posix()
        for p in discover(scan_folder, recursive=True, exclude=[out])
    }


def test_batch_mixed_folder(scan_folder, tmp_path):
    out = tmp_path / "out"
    args = ["batch", str(scan_folder), "-o", str(out), "-r", "--scheduler", "synchronous"]
    result = CliRunner().invoke(cli, [*args, "-k", "2", "--max-iter", "40"])
    assert result.exit_code == 1, result.output  # some scans failed
    rows = read_summary(out / "batch_summary.tsv")
    assert [r["input"] for r in rows] == EXPECTED_ORDER
    status = {r["input"]: r for r in rows}
    assert status["site2/corrupt.nii.gz"]["status"] == "failed"
    assert "cannot read NIfTI" in status["site2/corrupt.nii.gz"]["error"]
    assert status["site2/locked.nii.gz"]["status"] == "failed"
    assert "permission denied" in status["site2/locked.nii.gz"]["error"]
    for name in ("a.nii.gz", "site1/b.nii", "site1/deep/c.png", "site2/d.tif"):
        row = status[name]
        assert row["status"] == "ok" and row["error"] == ""
        assert row["K"] == "2" and int(row["iterations"]) >= 1
        assert row["converged"] in ("true", "false")
        assert float(row["log_likelihood"]) < 0 and float(row["seconds"]) > 0
    # the input's sub-folders are mirrored
    assert (out / "a_dseg.nii.gz").exists() and (out / "a_segment.json").exists()
    assert (out / "site1" / "b_dseg.nii.gz").exists()
    assert (out / "site1" / "deep" / "c_dseg.png").exists()
    assert (out / "site2" / "d_probseg.tif").exists()
    assert not list(out.rglob("corrupt*")) and not list(out.rglob("locked*"))
    assert not temporaries(out)
    # plain log lines when stderr is not a terminal
    assert "[1/6] a.nii.gz: ok (K=2" in result.stderr
    assert "4 ok, 0 skipped, 2 failed" in result.stderr


def test_resume_overwrite_and_changed_options(tmp_path):
    root = tmp_path / "scans"
    for i in range(2):
        write_head(root / f"s{i}.nii.gz", i)
    out = tmp_path / "out"
    settings = {"n_components": 3, "max_iter": 30}
    first = run_batch(root, out, settings=settings, scheduler="synchronous")
    assert [r["status"] for r in first.rows] == ["ok", "ok"] and first.n_failed == 0
    before = (out / "s0_segment.json").stat().st_mtime_ns

    again = run_batch(root, out, settings=settings, scheduler="synchronous")
    assert [r["status"] for r in again.rows] == ["skipped", "skipped"]
    assert again.rows[0]["K"] == 3 and again.rows[0]["iterations"] >= 1
    assert (out / "s0_segment.json").stat().st_mtime_ns == before

    # an incomplete output set (no sidecar: killed before it was written) is redone
    (out / "s1_segment.json").unlink()
    partial = run_batch(root, out, settings=settings, scheduler="synchronous")
    assert [r["status"] for r in partial.rows] == ["skipped", "ok"]

    changed = run_batch(
        root, out, settings={**settings, "n_components": 2}, scheduler="synchronous"
    )
    assert [r["status"] for r in changed.rows] == ["failed", "failed"]
    assert "n_components=3, now 2" in changed.rows[0]["error"]
    assert "pass --overwrite" in changed.rows[0]["error"]

    redo = run_batch(
        root, out, settings={**settings, "n_components": 2}, scheduler="synchronous",
        overwrite=True,
    )  # fmt: skip
    assert [r["status"] for r in redo.rows] == ["ok", "ok"]
    assert json.loads((out / "s0_segment.json").read_text())["model"]["n_components"] == 2

    # the input changed: outputs are stale, only replaced when asked
    write_head(root / "s0.nii.gz", 7)
    stale = run_batch(root, out, settings={**settings, "n_components": 2}, scheduler="synchronous")
    assert stale.rows[0]["status"] == "failed" and "another version" in stale.rows[0]["error"]
    assert stale.rows[1]["status"] == "skipped"


def test_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["batch", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli, ["batch", str(tmp_path)])
    assert result.exit_code == 2 and "--out-dir" in result.output
    result = runner.invoke(
        cli, ["batch", str(tmp_path), "-o", str(tmp_path / "o"), "--suffix", "T1w"]
    )
    assert result.exit_code == 2 and "need --bids" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["batch", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no scans" in result.output


def test_clean_stale_temporaries(tmp_path):
    stale = tmp_path / "sub" / ".x_dseg.tmp-999999999-0123abcd.nii.gz"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    live = tmp_path / f".y_dseg.tmp-{os.getpid()}-0123abcd.nii.gz"
    live.write_bytes(b"being written")
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert live.exists()


def test_killed_batch_resumes(tmp_path):
    """SIGKILL the batch after the first result; a re-run finishes the rest, no temp left."""
    root = tmp_path / "scans"
    for i in range(6):
        write_head(root / ("deep" if i % 2 else "") / f"h{i}.nii.gz", i)
    out = tmp_path / "out"
    args = [SEGMENT, "batch", str(root), "-o", str(out), "-r", "--jobs", "1", "--tol", "0",
            "--max-iter", "60", "--no-qc", "-q"]  # fmt: skip
    # its own process group, killed whole (as a job scheduler does): a worker process that
    # outlived its parent for a moment could otherwise still write while the re-run checks
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    summary = out / "batch_summary.tsv"
    deadline = time.monotonic() + 60
    while not (summary.exists() and read_summary(summary)) and time.monotonic() < deadline:
        assert process.poll() is None, "the batch ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    done = read_summary(out / "batch_summary.tsv")
    assert 1 <= len(done) < 6 and {r["status"] for r in done} == {"ok"}
    finished = {r["input"] for r in done}
    for sidecar in out.rglob("*_segment.json"):  # every sidecar's output set is complete
        stem = sidecar.name.removesuffix("_segment.json")
        for suffix in ("_dseg.nii.gz", "_probseg.nii.gz"):
            assert nib.load(sidecar.with_name(stem + suffix)).get_fdata().size
    (out / ".h9_dseg.tmp-999999999-0badc0de.nii.gz").write_bytes(b"half")  # a dead writer's

    rerun = subprocess.run([*args, "--jobs", "2"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_summary(out / "batch_summary.tsv")
    assert len(rows) == 6
    assert {r["input"] for r in rows if r["status"] == "skipped"} == finished
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    assert len(list(out.rglob("*_segment.json"))) == 6
    assert len(list(out.rglob("*_dseg.nii.gz"))) == 6
    assert not temporaries(out)


def test_distributed_cluster_gives_the_same_outputs(tmp_path):
    distributed = pytest.importorskip("distributed")
    root = tmp_path / "scans"
    write_head(root / "a.nii.gz", 1)
    write_picture(root / "sub" / "b.png", 2)
    local = CliRunner().invoke(
        cli, ["batch", str(root), "-o", str(tmp_path / "local"), "-r", "-k", "3", *FAST,
              "--scheduler", "synchronous"],
    )  # fmt: skip
    assert local.exit_code == 0, local.output
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = CliRunner().invoke(
            cli, ["batch", str(root), "-o", str(tmp_path / "cluster"), "-r", "-k", "3", *FAST,
                  "--scheduler", cluster.scheduler_address],
        )  # fmt: skip
    assert remote.exit_code == 0, remote.output
    for name in ("a_dseg.nii.gz", "sub/b_dseg.png"):
        a, b = tmp_path / "local" / name, tmp_path / "cluster" / name
        assert a.read_bytes() == b.read_bytes()
    prob_a = nib.load(tmp_path / "local" / "a_probseg.nii.gz").get_fdata()
    prob_b = nib.load(tmp_path / "cluster" / "a_probseg.nii.gz").get_fdata()
    np.testing.assert_allclose(prob_a, prob_b, atol=1e-6)


def test_unreachable_scheduler(tmp_path, monkeypatch):
    monkeypatch.setattr("segment.batch.CONNECT_TIMEOUT", "0.5s")
    root = tmp_path / "scans"
    write_head(root / "a.nii.gz", 1)
    result = CliRunner().invoke(
        cli, ["batch", str(root), "-o", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9"]
    )
    assert result.exit_code == 1
    assert "cannot connect to the dask scheduler at tcp://127.0.0.1:9" in result.output


# ------------------------------------------------------------------------------ BIDS
def test_bids_names():
    assert parse_bids_entities("sub-01_ses-2_acq-fast_run-1_T1w.nii.gz") == {
        "sub": "01", "ses": "2", "acq": "fast", "run": "1", "suffix": "T1w",
    }  # fmt: skip
    with pytest.raises(ValueError, match="not a BIDS file name"):
        parse_bids_entities("head_t1.nii.gz")
    paths = bids_output_paths("sub-01/anat/sub-01_run-1_desc-old_T1w.nii.gz", "d", desc="t1-x")
    assert paths.dseg == Path("d/sub-01/anat/sub-01_run-1_desc-t1x_dseg.nii.gz")
    assert paths.probseg_sidecar == Path("d/sub-01/anat/sub-01_run-1_desc-t1x_probseg.json")
    assert paths.qc == Path("d/sub-01/figures/sub-01_run-1_desc-t1x_qc.png")


@pytest.fixture
def bids_dataset(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    write_head(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 1)
    write_head(root / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_acq-fast_T1w.nii.gz", 2)
    write_head(root / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_T2w.nii.gz", 3)
    write_head(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz", 4)
    write_head(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz", 5)
    return root


def test_bids_derivative_layout(bids_dataset):
    args = ["batch", str(bids_dataset), "--bids", "--suffix", "T1w", "--subject", "01",
            "--subject", "sub-02", "--pipeline", "t1-brain-3class", "--scheduler",
            "synchronous", *FAST]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    deriv = bids_dataset / "derivatives" / "segment"
    files = sorted(p.relative_to(deriv).as_posix() for p in deriv.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "batch_summary.tsv",
            "dataset_description.json",
            "dseg.tsv",
            "sub-01/anat/sub-01_desc-t1brain3class_biasfield.nii.gz",  # the preset fits one
            "sub-01/anat/sub-01_desc-t1brain3class_dseg.json",
            "sub-01/anat/sub-01_desc-t1brain3class_dseg.nii.gz",
            "sub-01/anat/sub-01_desc-t1brain3class_probseg.json",
            "sub-01/anat/sub-01_desc-t1brain3class_probseg.nii.gz",
            "sub-01/figures/sub-01_desc-t1brain3class_qc.png",
            "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_desc-t1brain3class_biasfield.nii.gz",
            "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_desc-t1brain3class_dseg.json",
            "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_desc-t1brain3class_dseg.nii.gz",
            "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_desc-t1brain3class_probseg.json",
            "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_desc-t1brain3class_probseg.nii.gz",
            "sub-02/figures/sub-02_ses-pre_acq-fast_desc-t1brain3class_qc.png",
        ]
    )
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "segment"
    tsv = (deriv / "dseg.tsv").read_text().splitlines()
    assert tsv[0] == "index\tname\tabbreviation\tmapping"
    assert tsv[1:] == ["1\tcsf\tCSF\t3", "2\tgrey matter\tGM\t1", "3\twhite matter\tWM\t2"]
    anat = deriv / "sub-01" / "anat"
    probseg = json.loads((anat / "sub-01_desc-t1brain3class_probseg.json").read_text())
    assert probseg["LabelMap"] == {"0": "csf", "1": "grey matter", "2": "white matter"}
    sidecar = json.loads((anat / "sub-01_desc-t1brain3class_dseg.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert sidecar["pipeline"]["name"] == "t1-brain-3class"
    assert sidecar["final_options"]["mask"] == "auto"
    assert nib.load(anat / "sub-01_desc-t1brain3class_probseg.nii.gz").shape == (*SHAPE, 3)
    rows = read_summary(deriv / "batch_summary.tsv")
    assert [r["input"] for r in rows] == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_T1w.nii.gz",
    ]
    # resume works in BIDS mode too
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert {r["status"] for r in read_summary(deriv / "batch_summary.tsv")} == {"skipped"}


def test_bids_needs_a_dataset(tmp_path):
    write_head(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", 1)
    result = CliRunner().invoke(cli, ["batch", str(tmp_path), "--bids"])
    assert result.exit_code == 1 and "not a BIDS dataset" in result.output
