"""Tests for segment.batch and `segment batch`: discovery, summary, resume, kill, dask, BIDS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import skimage.io
from click.testing import CliRunner

from segment import io as segment_io
from segment.batch import (
    MaskSpec,
    clean_stale_temporaries,
    discover,
    find_bids_mask,
    read_summary,
    run_batch,
)
from segment.cli import cli
from segment.exceptions import InputError, SegmentError
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
    """SIGKILL the batch right after its first summary row; a re-run finishes the rest."""
    root = tmp_path / "scans"
    for i in range(6):
        write_head(root / ("deep" if i % 2 else "") / f"h{i}.nii.gz", i)
    out = tmp_path / "out"
    args = [SEGMENT, "batch", str(root), "-o", str(out), "-r", "--jobs", "1", "--tol", "0",
            "--max-iter", "60", "--no-qc", "-q"]  # fmt: skip
    # killed at a known point (the test hook), not after a sleep; in its own process group,
    # killed whole afterwards (as a job scheduler does), so no worker outlives it
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "SEGMENT_KILL_AT": "summary-1"},
    )  # fmt: skip
    assert process.wait(timeout=120) == -signal.SIGKILL
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    done = read_summary(out / "batch_summary.tsv")
    assert len(done) == 1 and done[0]["status"] == "ok"
    # a worker may have finished another scan before the group was killed: what counts as
    # finished is every output set with its sidecar (the set's commit record)
    finished = set()
    for sidecar in out.rglob("*_segment.json"):  # every sidecar's output set is complete
        stem = sidecar.name.removesuffix("_segment.json")
        for suffix in ("_dseg.nii.gz", "_probseg.nii.gz"):
            assert nib.load(sidecar.with_name(stem + suffix)).get_fdata().size
        finished.add(sidecar.relative_to(out).parent.joinpath(stem + ".nii.gz").as_posix())
    assert done[0]["input"] in finished and len(finished) < 6
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


def test_an_error_outside_the_scan_fails_that_scan_alone(tmp_path, monkeypatch):
    """An exception the scan's own handling never sees (a worker whose imports fail) is a
    ``failed`` row for that scan; the others finish."""
    import segment.batch

    original = segment.batch.run_task

    def run_task(task):
        if task.rel.startswith("b"):
            raise ModuleNotFoundError("No module named 'scipy.linalg'")
        return original(task)

    monkeypatch.setattr(segment.batch, "run_task", run_task)
    root = tmp_path / "scans"
    write_head(root / "a.nii.gz", 1)
    write_head(root / "b.nii.gz", 2)
    result = CliRunner().invoke(
        cli, ["batch", str(root), "-o", str(tmp_path / "o"), "-k", "3", *FAST,
              "--scheduler", "threads", "--jobs", "2"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    rows = {row["input"]: row for row in read_summary(tmp_path / "o" / "batch_summary.tsv")}
    assert rows["a.nii.gz"]["status"] == "ok"
    assert rows["b.nii.gz"]["status"] == "failed"
    assert "ModuleNotFoundError" in rows["b.nii.gz"]["error"]
    assert (tmp_path / "o" / "a_dseg.nii.gz").exists()


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
            ".segment-batch.lock",  # the folder's batch lock (hidden, empty once released)
            ".bidsignore",  # batch_summary.tsv, bias fields, figures: no BIDS names
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
    assert description["GeneratedBy"][0]["Name"] == "segment-em"  # the distribution
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


# ------------------------------------------------------------------------------ per-scan masks
BOX_A = np.s_[3:20, 4:22, 3:16]
BOX_B = np.s_[6:18, 2:25, 5:18]
SMALL = {"n_components": 2, "max_iter": 20, "probseg": False, "qc": False}


def write_mask(path: Path, scan: Path, box, *, shape=None) -> Path:
    """A uint8 mask on the grid of ``scan`` (or of another ``shape``), 1 inside ``box``."""
    image = nib.load(scan)
    data = np.zeros(shape or image.shape, np.uint8)
    data[box] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return path


def inside(dseg: Path) -> np.ndarray:
    """Voxels of a label map that are not label 0."""
    return np.asarray(nib.load(dseg).dataobj) > 0


def box_mask(box) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[box] = True
    return mask


def test_mask_spec_parse():
    assert MaskSpec.parse(None).kind == "none" and MaskSpec.parse("AUTO").kind == "auto"
    assert MaskSpec.parse("brain.nii.gz").kind == "file"
    assert MaskSpec.parse("bids", bids=True).kind == "bids"
    template = MaskSpec.parse("/m/{rel}/{stem}_mask.nii.gz")
    assert template.kind == "template" and template.fields == {"rel", "stem"}
    assert MaskSpec.parse("odd{{name}}.nii.gz").kind == "file"  # escaped braces only
    for bad, fragment in [
        ("{stem", "is malformed"),
        ("mask}.nii", "is malformed"),
        ("{subject}_mask.nii.gz", "unknown placeholder {subject}"),
        ("{stem!r}.nii", "unknown placeholder {stem!r}"),
        ("{stem:>9}.nii", "unknown placeholder {stem:>9}"),
        ("{}.nii", "unknown placeholder {}"),
        ("bids", "needs BIDS mode"),
    ]:
        with pytest.raises(SegmentError, match="mask") as caught:
            MaskSpec.parse(bad)
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_mask_spec_for_scan(tmp_path):
    root = tmp_path / "in"
    scan = root / "site" / "a.nii.gz"
    literal = tmp_path / "odd{name}.nii.gz"
    for path in (literal, root / "site" / "a_m.nii.gz", root / "m" / "site" / "a.nii"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert MaskSpec.parse("none").for_scan(scan, root) == "none"
    assert MaskSpec.parse(str(tmp_path / "odd{{name}}.nii.gz")).for_scan(scan, root) == str(literal)
    # relative: against the scan's folder; with {rel}: against the input folder
    assert MaskSpec.parse("{stem}_m.nii.gz").for_scan(scan, root) == str(scan.parent / "a_m.nii.gz")
    assert MaskSpec.parse("m/{rel}/{stem}.nii").for_scan(scan, root) == str(
        root / "m" / "site" / "a.nii"
    )
    assert MaskSpec.parse(f"{root}/m/{{rel}}/{{stem}}.nii").for_scan(scan, root) == str(
        root / "m" / "site" / "a.nii"
    )
    with pytest.raises(InputError, match="a_x.nii.gz: mask file not found .*'{stem}_x.nii.gz'"):
        MaskSpec.parse("{stem}_x.nii.gz").for_scan(scan, root)


def test_per_scan_masks_are_applied_and_not_segmented(tmp_path):
    root = tmp_path / "scans"
    a = write_head(root / "a.nii.gz", 1)
    b = write_head(root / "site" / "b.nii", 2)
    write_mask(root / "a_brainmask.nii.gz", a, BOX_A)
    write_mask(root / "site" / "b_brainmask.nii.gz", b, BOX_B)
    out = tmp_path / "out"
    args = ["batch", str(root), "-o", str(out), "-r", "-k", "3", *FAST, "--no-qc",
            "--mask", "{stem}_brainmask.nii.gz", "--scheduler", "synchronous"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = read_summary(out / "batch_summary.tsv")  # the masks are not scans
    assert [(r["input"], r["status"]) for r in rows] == [("a.nii.gz", "ok"), ("site/b.nii", "ok")]
    assert not list(out.rglob("*brainmask*"))
    dseg_a, dseg_b = out / "a_dseg.nii.gz", out / "site" / "b_dseg.nii.gz"
    assert np.array_equal(inside(dseg_a), box_mask(BOX_A))
    assert np.array_equal(inside(dseg_b), box_mask(BOX_B))
    assert not np.array_equal(inside(dseg_a), inside(dseg_b))
    sidecar = json.loads((out / "site" / "b_segment.json").read_text())
    assert sidecar["final_options"]["mask"] == "{stem}_brainmask.nii.gz"
    assert sidecar["mask_file"]["path"] == str(root / "site" / "b_brainmask.nii.gz")
    assert len(sidecar["mask_file"]["sha256"]) == 64
    assert sidecar["mask"]["n_voxels"] == int(box_mask(BOX_B).sum())


def test_mask_templates_with_rel_and_absolute(tmp_path):
    root = tmp_path / "scans"
    a = write_head(root / "a.nii.gz", 1)
    b = write_head(root / "site" / "b.nii.gz", 2)
    masks = tmp_path / "masks"
    write_mask(masks / "a_mask.nii.gz", a, BOX_A)
    write_mask(masks / "site" / "b_mask.nii.gz", b, BOX_B)
    out = tmp_path / "out"
    result = run_batch(root, out, recursive=True, mask=f"{masks}/{{rel}}/{{stem}}_mask.nii.gz",
                       settings=SMALL, scheduler="synchronous")  # fmt: skip
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
    assert np.array_equal(inside(out / "a_dseg.nii.gz"), box_mask(BOX_A))
    assert np.array_equal(inside(out / "site" / "b_dseg.nii.gz"), box_mask(BOX_B))

    # a relative template with {rel} mirrors the tree under INPUT_DIR; the mirror is not scanned
    shutil.copytree(masks, root / "masks")
    result = run_batch(root, tmp_path / "out2", recursive=True,
                       mask="masks/{rel}/{stem}_mask.nii.gz", settings=SMALL,
                       scheduler="synchronous")  # fmt: skip
    assert [(r["input"], r["status"]) for r in result.rows] == [
        ("a.nii.gz", "ok"), ("site/b.nii.gz", "ok")
    ]  # fmt: skip
    sidecar = json.loads((tmp_path / "out2" / "site" / "b_segment.json").read_text())
    assert sidecar["mask_file"]["path"] == str(root / "masks" / "site" / "b_mask.nii.gz")


def test_one_mask_file_for_every_scan_is_not_a_scan(tmp_path):
    root = tmp_path / "scans"
    a = write_head(root / "a.nii.gz", 1)
    write_head(root / "b.nii.gz", 2)
    brain = write_mask(root / "brain.nii.gz", a, BOX_A)
    result = run_batch(root, tmp_path / "out", mask=brain, settings=SMALL,
                       scheduler="synchronous")  # fmt: skip
    assert [(r["input"], r["status"]) for r in result.rows] == [("a.nii.gz", "ok"),
                                                                 ("b.nii.gz", "ok")]  # fmt: skip
    for name in ("a", "b"):
        assert np.array_equal(inside(tmp_path / "out" / f"{name}_dseg.nii.gz"), box_mask(BOX_A))


def test_a_missing_mask_fails_its_scan_alone(tmp_path):
    root = tmp_path / "scans"
    for i, name in enumerate(("s1", "s2", "s3")):
        scan = write_head(root / f"{name}.nii.gz", i)
        if name != "s2":
            write_mask(root / f"{name}_mask.nii.gz", scan, BOX_A)
    out = tmp_path / "out"
    args = ["batch", str(root), "-o", str(out), "-k", "2", *FAST, "--no-qc", "--no-probseg",
            "--mask", "{stem}_mask.nii.gz", "--scheduler", "synchronous"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    rows = {r["input"]: r for r in read_summary(out / "batch_summary.tsv")}
    assert list(rows) == ["s1.nii.gz", "s2.nii.gz", "s3.nii.gz"]
    assert rows["s2.nii.gz"]["status"] == "failed"
    assert f"{root / 's2_mask.nii.gz'}: mask file not found" in rows["s2.nii.gz"]["error"]
    assert rows["s1.nii.gz"]["status"] == rows["s3.nii.gz"]["status"] == "ok"
    assert not list(out.glob("s2_*"))


def test_bad_masks_fail_their_scan_alone(tmp_path):
    root = tmp_path / "scans"
    scans = [write_head(root / f"s{i}.nii.gz", i) for i in range(4)]
    write_mask(root / "s0_mask.nii.gz", scans[0], BOX_A)
    write_mask(root / "s1_mask.nii.gz", scans[1], BOX_A, shape=(24, 28, 19))
    (root / "s2_mask.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_mask(root / "s3_mask.nii.gz", scans[3], np.s_[0:0])
    result = run_batch(root, tmp_path / "out", mask="{stem}_mask.nii.gz", settings=SMALL,
                       scheduler="synchronous")  # fmt: skip
    assert [r["status"] for r in result.rows] == ["ok", "failed", "failed", "failed"]
    errors = [r["error"] for r in result.rows[1:]]
    assert errors[0].startswith(f"{root / 's1_mask.nii.gz'}: mask grid does not match s1.nii.gz")
    assert errors[1].startswith(f"{root / 's2_mask.nii.gz'}: cannot read")
    assert errors[2].startswith(f"{root / 's3_mask.nii.gz'}: mask is empty")


def test_resume_compares_each_scans_mask(tmp_path):
    root = tmp_path / "scans"
    scans = [write_head(root / f"s{i}.nii.gz", i) for i in range(2)]
    masks = [write_mask(root / f"s{i}_mask.nii.gz", scan, BOX_A) for i, scan in enumerate(scans)]
    out = tmp_path / "out"

    def batch(template="{stem}_mask.nii.gz", **kwargs):
        result = run_batch(root, out, patterns=["s?.nii.gz"], mask=template, settings=SMALL,
                           scheduler="synchronous", **kwargs)  # fmt: skip
        return [r["status"] for r in result.rows], [r["error"] for r in result.rows]

    assert batch()[0] == ["ok", "ok"]
    assert batch()[0] == ["skipped", "skipped"]
    later = masks[1].stat().st_mtime_ns + 10**9
    os.utime(masks[1], ns=(later, later))  # touched, same content: still the same mask
    assert batch()[0] == ["skipped", "skipped"]

    write_mask(masks[0], scans[0], BOX_B)  # another mask content for s0
    later = masks[0].stat().st_mtime_ns + 2 * 10**9
    os.utime(masks[0], ns=(later, later))
    status, errors = batch()
    assert status == ["failed", "skipped"]
    assert "made with another version of the mask s0_mask.nii.gz" in errors[0]
    assert "pass --overwrite" in errors[0]
    assert batch(overwrite=True)[0] == ["ok", "ok"]
    assert np.array_equal(inside(out / "s0_dseg.nii.gz"), box_mask(BOX_B))
    assert batch()[0] == ["skipped", "skipped"]

    # the dataset moved with its masks (same contents, other paths): still complete
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copies modification times too
    result = run_batch(moved, out, patterns=["s?.nii.gz"], mask="{stem}_mask.nii.gz",
                       settings=SMALL, scheduler="synchronous")  # fmt: skip
    assert [r["status"] for r in result.rows] == ["skipped", "skipped"]


def test_resume_notices_the_same_mask_option_naming_another_file(tmp_path, monkeypatch):
    root = tmp_path / "scans"
    scan = write_head(root / "s0.nii.gz", 0)
    first, second = (write_mask(tmp_path / d / "brain.nii.gz", scan, box)
                     for d, box in (("one", BOX_A), ("two", BOX_B)))  # fmt: skip
    out = tmp_path / "out"

    def batch(**kwargs):
        return run_batch(root, out, mask="brain.nii.gz", settings=SMALL,
                         scheduler="synchronous", **kwargs).rows[0]  # fmt: skip

    monkeypatch.chdir(first.parent)  # a relative mask path is relative to the working folder
    assert batch()["status"] == "ok"
    assert batch()["status"] == "skipped"
    monkeypatch.chdir(second.parent)
    row = batch()
    assert row["status"] == "failed"
    assert f"made with another mask ({first}, now {second})" in row["error"]
    assert batch(overwrite=True)["status"] == "ok"
    assert np.array_equal(inside(out / "s0_dseg.nii.gz"), box_mask(BOX_B))
    sidecar = json.loads((out / "s0_segment.json").read_text())
    assert sidecar["final_options"]["mask"] == "brain.nii.gz"  # as given
    assert sidecar["mask_file"]["path"] == sidecar["mask"]["spec"] == str(second)


# ------------------------------------------------------------------------------ BIDS masks
def test_find_bids_mask_prefers_the_closest_match(tmp_path):
    root = tmp_path / "ds"
    scan = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_acq-fast_run-2_T1w.nii.gz"
    anat = root / "derivatives" / "prep" / "sub-01" / "ses-1" / "anat"

    def touch(name: str, folder: Path = anat) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
        return folder / name

    with pytest.raises(InputError, match="no brain mask found: nothing matches derivatives/"):
        find_bids_mask(scan, root)
    touch("sub-01_desc-brain_mask.nii.gz", root / "derivatives" / "prep" / "sub-01" / "anat")
    touch("sub-01_ses-1_acq-slow_desc-brain_mask.nii.gz")  # another acquisition
    touch("sub-01_ses-1_desc-brain_mask.json")  # not an image
    touch("sub-01_ses-1_desc-head_mask.nii.gz")  # not the brain
    touch("sub-02_ses-1_desc-brain_mask.nii.gz")  # another subject
    with pytest.raises(InputError, match="no brain mask found"):
        find_bids_mask(scan, root)
    generic = touch("sub-01_ses-1_desc-brain_mask.nii.gz")
    assert find_bids_mask(scan, root) == generic
    exact = touch("sub-01_ses-1_acq-fast_run-2_space-T1w_desc-brain_mask.nii")
    assert find_bids_mask(scan, root) == exact  # acq and run exactly the scan's
    touch("sub-01_ses-1_acq-fast_run-2_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
    assert find_bids_mask(scan, root) == exact  # the scan's own space
    native = touch("sub-01_ses-1_acq-fast_run-2_desc-brain_mask.nii.gz")
    assert find_bids_mask(scan, root) == native  # no space- at all
    ours = root / "derivatives" / "segment" / "sub-01" / "ses-1" / "anat"
    touch(native.name, ours)
    touch(native.name, root / "derivatives" / "mine" / "sub-01" / "ses-1" / "anat")
    exclude = [root / "derivatives" / "mine"]
    assert find_bids_mask(scan, root, exclude=exclude) == native
    other = touch(native.name, root / "derivatives" / "other" / "sub-01" / "ses-1" / "anat")
    with pytest.raises(InputError, match="several brain masks fit") as caught:
        find_bids_mask(scan, root, exclude=exclude)
    message = str(caught.value)
    assert str(native.relative_to(root)) in message and str(other.relative_to(root)) in message
    assert "segment/" not in message and "mine/" not in message


def test_bids_masks_from_the_derivatives(bids_dataset):
    deriv = bids_dataset / "derivatives"
    t1 = bids_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    prep = deriv / "prep" / "sub-01" / "anat"
    write_mask(prep / "sub-01_desc-brain_mask.nii.gz", t1, BOX_A)
    write_mask(prep / "sub-01_space-MNI152NLin6Asym_desc-brain_mask.nii.gz", t1, BOX_B)
    # our own folder is never searched (it would make sub-01 ambiguous)
    write_mask(deriv / "segment" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz", t1, BOX_B)
    # a session: the mask of that session, not another acquisition's nor the subject's
    ses = deriv / "prep" / "sub-02" / "ses-pre" / "anat"
    write_mask(ses / "sub-02_ses-pre_desc-brain_mask.nii.gz", t1, BOX_B)
    write_mask(ses / "sub-02_ses-pre_acq-slow_desc-brain_mask.nii.gz", t1, BOX_A)
    write_mask(deriv / "prep" / "sub-02" / "anat" / "sub-02_desc-brain_mask.nii.gz", t1, BOX_A)
    # two template spaces, none of them the scan's: ambiguous
    for space in ("MNI152NLin6Asym", "MNIPediatricAsym"):
        write_mask(deriv / "prep" / "sub-03" / "anat" / f"sub-03_space-{space}_desc-brain_mask"
                   ".nii.gz", t1, BOX_A)  # fmt: skip
    args = ["batch", str(bids_dataset), "--bids", "--suffix", "T1w", "-k", "3", *FAST,
            "--no-qc", "--mask", "bids", "--scheduler", "synchronous"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    out = deriv / "segment"
    rows = {r["input"]: r for r in read_summary(out / "batch_summary.tsv")}
    sub1, sub2 = (
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_T1w.nii.gz",
    )
    assert rows[sub1]["status"] == rows[sub2]["status"] == "ok"
    assert np.array_equal(inside(out / "sub-01/anat/sub-01_dseg.nii.gz"), box_mask(BOX_A))
    dseg = out / "sub-02/ses-pre/anat/sub-02_ses-pre_acq-fast_dseg.nii.gz"
    assert np.array_equal(inside(dseg), box_mask(BOX_B))
    sidecar = json.loads((out / "sub-01/anat/sub-01_dseg.json").read_text())
    assert sidecar["mask_file"]["path"] == str(prep / "sub-01_desc-brain_mask.nii.gz")
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
                                  "bids:raw:derivatives/prep/sub-01/anat/"
                                  "sub-01_desc-brain_mask.nii.gz"]  # fmt: skip
    failed = rows["sub-03/anat/sub-03_T1w.nii.gz"]
    assert failed["status"] == "failed" and "several brain masks fit" in failed["error"]
    assert "sub-03_space-MNI152NLin6Asym_desc-brain_mask.nii.gz" in failed["error"]
    assert "sub-03_space-MNIPediatricAsym_desc-brain_mask.nii.gz" in failed["error"]


def test_resume_keeps_volumes_and_redraws_a_qc_of_another_scale(tmp_path):
    """A skipped scan's summary row has the volumes its sidecar recorded; a rerun asking for
    the other QC histogram scale redoes the scan instead of keeping the old picture."""
    root = tmp_path / "scans"
    write_head(root / "s0.nii.gz", 0)
    out = tmp_path / "out"
    settings = {"n_components": 3, "max_iter": 30, "qc": True}
    first = run_batch(root, out, settings=settings, scheduler="synchronous")
    again = run_batch(root, out, settings=settings, scheduler="synchronous")
    assert again.rows[0]["status"] == "skipped"
    for column in ("volume_estimate", "volume_ml_1", "volume_ml_2", "volume_ml_3", "dseg"):
        assert again.rows[0][column] == first.rows[0][column] != "", column
    picture = (out / "s0_qc.png").read_bytes()
    log = run_batch(
        root, out, settings={**settings, "qc_histogram": "log"}, scheduler="synchronous"
    )
    assert log.rows[0]["status"] == "ok"
    assert (out / "s0_qc.png").read_bytes() != picture
    sidecar = json.loads((out / "s0_segment.json").read_text())
    assert sidecar["final_options"]["qc_histogram"] == "log"


@pytest.mark.parametrize("command", ["batch", "bids"])
def test_write_corrected_is_refused_by_batch_not_ignored(tmp_path, command):
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    if command == "bids":
        args = [command, str(tmp_path), str(tmp_path / "out"), "participant"]
    else:
        args = [command, str(tmp_path), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args + ["--bias-field", "--write-corrected"])
    assert result.exit_code == 2, result.output
    assert "--write-corrected is only written by `segment run`" in result.output
    assert not (tmp_path / "out").exists()
