"""Tests of the Python API: ``segment_array``, ``segment_file`` and ``SegmentationResult.save``."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segment
from segment import (
    ConvergenceWarning,
    DataWarning,
    InputError,
    SegmentationResult,
    SegmentError,
    segment_array,
    segment_file,
)

K = 3


@pytest.fixture
def scan(make_nifti, tissues) -> Path:
    return make_nifti(tissues, "scan.nii.gz")


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------ exports
def test_public_api_is_exported():
    for name in (
        "segment_file",
        "segment_array",
        "SegmentationResult",
        "GaussianMixtureEM",
        "SpatialGaussianMixture",
    ):
        assert name in segment.__all__ and hasattr(segment, name)
    assert segment.segment_file is segment.api.segment_file
    assert "segment_file" in dir(segment)
    with pytest.raises(AttributeError, match="no_such_thing"):
        segment.no_such_thing  # noqa: B018


# ------------------------------------------------------------------------------ segment_array
def test_segment_array_2d(picture):
    result = segment_array(picture, n_components=K)
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == picture.shape and result.labels.dtype == np.uint8
    assert result.responsibilities.shape == picture.shape + (K,)
    assert result.responsibilities.dtype == np.float32
    np.testing.assert_allclose(result.responsibilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.responsibilities.argmax(-1) + 1, result.labels)
    assert result.labels[0, 0] == 1 and result.labels[12, 12] == 2 and result.labels[20, 25] == 3
    means = result.estimator.means_.ravel()
    assert np.all(np.diff(means) > 0)
    np.testing.assert_allclose(means, [40, 120, 200], atol=3)
    assert result.log_likelihood_trace == result.estimator.log_likelihood_trace_
    assert len(result.log_likelihood_trace) == result.estimator.n_iter_
    assert result.mask.all() and result.mask_spec == "none" and result.inputs == []


def test_segment_array_labels_are_ordered_by_mean(tissues):
    result = segment_array(tissues, n_components=K, seed=5)
    label_means = [tissues[result.labels == k].mean() for k in (1, 2, 3)]
    assert label_means == sorted(label_means)


def test_segment_array_trace_never_decreases(picture):
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        result = segment_array(picture, n_components=K, tol=0, max_iter=8)
    trace = np.array(result.log_likelihood_trace)
    assert len(trace) == 8
    assert np.all(np.diff(trace) >= -1e-8 * np.abs(trace[:-1]))


def test_segment_array_callback_reports_each_iteration(picture):
    calls = []
    with pytest.warns(ConvergenceWarning):
        result = segment_array(
            picture, n_components=K, tol=0, max_iter=5, callback=lambda *args: calls.append(args)
        )
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([c[1] for c in calls], result.log_likelihood_trace)
    assert all(np.isfinite(c[2]) for c in calls)


def test_segment_array_mask_gives_label_zero_outside(picture):
    mask = np.zeros(picture.shape, bool)
    mask[5:35, 5:45] = True
    result = segment_array(picture, mask, n_components=K)
    assert (result.labels[~mask] == 0).all() and (result.labels[mask] > 0).all()
    assert (result.responsibilities[~mask] == 0).all()
    np.testing.assert_allclose(result.responsibilities[mask].sum(-1), 1.0, atol=1e-5)
    assert result.mask_spec == "array"
    assert result.estimator.n_samples_ == mask.sum()


def test_segment_array_nonfinite_voxels(picture):
    data = picture.copy()
    data[0, :4] = np.nan
    data[1, 0] = -np.inf
    with pytest.warns(DataWarning, match="^5 non-finite voxels"):
        result = segment_array(data, n_components=K)
    assert result.n_nonfinite == 5
    assert (result.labels == 0).sum() == 5 and result.labels[0, 0] == 0
    assert (result.responsibilities[0, :4] == 0).all()


def test_segment_array_channels(picture, rng):
    second = 300 - picture + rng.normal(0, 2, picture.shape)
    as_list = segment_array([picture, second], n_components=K)
    stacked = segment_array(np.stack([picture, second], -1), channel_axis=-1, n_components=K)
    assert as_list.estimator.means_.shape == (K, 2)
    assert as_list.estimator.covariances_.shape == (K, 2, 2)
    np.testing.assert_array_equal(as_list.labels, stacked.labels)


def test_segment_array_is_deterministic_across_chunkings(tissues):
    one = segment_array(tissues, n_components=K, chunk_size=10**6, scheduler="synchronous")
    many = segment_array(tissues, n_components=K, chunk_size=733, workers=2)
    np.testing.assert_array_equal(one.labels, many.labels)
    np.testing.assert_allclose(one.estimator.means_, many.estimator.means_, rtol=1e-9)


@pytest.mark.parametrize(
    ("array", "options", "message"),
    [
        (np.arange(10.0), {}, "2-D or 3-D image"),
        (np.arange(10.0).reshape(1, 10), {}, "2-D or 3-D image"),
        (np.full((10, 12), np.nan), {"n_components": 2}, "NaN or inf"),
        (np.full((10, 12), 3.0), {"n_components": 2}, "constant"),
        (np.tile([1.0, 2.0], (10, 6)), {"n_components": 3}, "only 2 distinct intensities"),
        (np.ones((10, 12)), {"n_components": 0}, "n_components must be an integer"),
        (np.ones((10, 12)), {"colour": "blue"}, r"unknown option\(s\) \['colour'\]"),
        (np.ones((10, 12)), {"scheduler": "bogus"}, "scheduler='bogus'"),
        ([np.ones((10, 12)), np.ones((10, 13))], {}, "same shape"),
    ],
)
def test_segment_array_bad_inputs(array, options, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises((SegmentError, ValueError), match=message):
            segment_array(array, **options)


# ------------------------------------------------------------------------------ segment_file
def test_segment_file_without_out_dir_writes_nothing(scan, tmp_path, tissues, affine):
    before = files_in(tmp_path)
    result = segment_file(scan, n_components=K)
    assert files_in(tmp_path) == before and result.written == []
    assert result.inputs == [scan]
    np.testing.assert_allclose(result.reference.affine, affine)
    assert result.labels.shape == tissues.shape
    assert {"load_s", "flatten_s", "fit_s", "predict_s"} <= set(result.timings)


def test_segment_file_matches_segment_array(scan, tissues):
    from_file = segment_file(str(scan), n_components=K, seed=4)
    from_array = segment_array(tissues, n_components=K, seed=4)
    np.testing.assert_array_equal(from_file.labels, from_array.labels)
    np.testing.assert_allclose(from_file.estimator.means_, from_array.estimator.means_)


def test_uncompressed_nifti_stays_memory_mapped(make_nifti, tissues):
    from segment.io import load_scan

    path = make_nifti(tissues, "lazy.nii")
    data = load_scan(path).data
    assert isinstance(data, np.memmap)
    result = segment_file(path, n_components=K)
    assert isinstance(result.reference.data, np.memmap)
    assert result.labels.shape == tissues.shape


def test_segment_file_saves_and_round_trips(scan, tmp_path, affine):
    out_dir = tmp_path / "deep" / "out"
    result = segment_file(scan, out_dir, n_components=K, command_line=["my", "call"])
    names = ["scan_dseg.nii.gz", "scan_probseg.nii.gz", "scan_qc.png", "scan_dseg.tsv",
             "scan_segment.json"]  # fmt: skip
    assert [p.name for p in result.written] == names
    assert files_in(out_dir) == sorted(names)
    rows = [line.split("\t") for line in (out_dir / "scan_dseg.tsv").read_text().splitlines()]
    assert rows[0][:2] == ["index", "name"]
    assert [row[:2] for row in rows[1:]] == [["0", "outside mask"], ["1", "class1"],
                                             ["2", "class2"], ["3", "class3"]]  # fmt: skip
    dseg = nib.load(out_dir / "scan_dseg.nii.gz")
    np.testing.assert_array_equal(np.asarray(dseg.dataobj), result.labels)
    np.testing.assert_allclose(dseg.affine, affine)
    probseg = nib.load(out_dir / "scan_probseg.nii.gz")
    np.testing.assert_array_equal(probseg.get_fdata(dtype=np.float32), result.responsibilities)
    record = segment.api.read_sidecar(out_dir / "scan_segment.json")
    assert record["command_line"] == ["my", "call"]
    assert record["inputs"][0]["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert record["model"]["log_likelihood_trace"] == result.log_likelihood_trace
    assert [v["n_voxels"] for v in record["labels"]] == [
        int((result.labels == k).sum()) for k in (1, 2, 3)
    ]
    assert [v["name"] for v in record["labels"]] == ["class1", "class2", "class3"]
    assert record["label_names"]["0"] == "outside mask"
    for row in record["labels"]:  # volumes rounded to 0.001 mL, not 553.9250000000001
        assert row["volume_ml"] == round(row["volume_ml"], 3)
        assert len(repr(row["soft_volume_ml"]).split(".")[-1]) <= 3


def test_segment_array_save_names_and_dseg_tsv(tmp_path, tissues):
    result = segment.segment_array(tissues.astype(np.float32), n_components=K)
    result.save(tmp_path, qc=False, class_names=["dark", "grey", "bright"])
    assert files_in(tmp_path) == sorted(
        ["segment_dseg.nii.gz", "segment_probseg.nii.gz", "segment_dseg.tsv", "segment.json"]
    )
    rows = (tmp_path / "segment_dseg.tsv").read_text().splitlines()
    assert [row.split("\t")[1] for row in rows[1:]] == ["outside mask", "dark", "grey", "bright"]
    record = segment.api.read_sidecar(tmp_path / "segment.json")
    assert [v["name"] for v in record["labels"]] == ["dark", "grey", "bright"]


def test_segment_file_2d_outputs(make_image, picture, tmp_path):
    import skimage.io
    import tifffile

    path = make_image(picture.astype(np.uint8), "slice.png")
    result = segment_file(path, tmp_path / "out", n_components=K, qc=False)
    assert [p.name for p in result.written] == [
        "slice_dseg.png",
        "slice_probseg.tif",
        "slice_dseg.tsv",
        "slice_segment.json",
    ]
    np.testing.assert_array_equal(skimage.io.imread(result.written[0]), result.labels)
    np.testing.assert_array_equal(
        tifffile.imread(result.written[1]), np.moveaxis(result.responsibilities, -1, 0)
    )


def test_segment_file_warning_names_the_file(make_nifti, tissues):
    data = tissues.astype(np.float32)
    data[0, 0, 0] = np.nan
    path = make_nifti(data, "nan.nii.gz", dtype=np.float32)
    with pytest.warns(DataWarning, match=f"^{path}: 1 non-finite voxels"):
        result = segment_file(path, n_components=K)
    assert result.labels[0, 0, 0] == 0


def test_segment_file_mask_options(make_nifti, tissues, scan):
    mask = np.zeros(tissues.shape, np.uint8)
    mask[2:18, 2:22, 1:15] = 1
    mask_path = make_nifti(mask, "mask.nii.gz", dtype=np.uint8)
    result = segment_file(scan, mask=mask_path, n_components=K)
    assert (result.labels[mask == 0] == 0).all() and result.mask_spec == str(mask_path)
    result = segment_file(scan, mask=mask.astype(bool), n_components=K)
    assert (result.labels[mask == 0] == 0).all() and result.mask_spec == "array"
    result = segment_file(scan, mask="auto", n_components=2)
    assert result.mask_spec == "auto" and 0 < result.mask.sum() < mask.size


def test_segment_file_mask_template_names_the_mask_after_the_scan(make_nifti, tissues, scan):
    mask = np.zeros(tissues.shape, np.uint8)
    mask[3:15, 4:20, 2:12] = 1
    mask_path = make_nifti(mask, "scan_brainmask.nii.gz", dtype=np.uint8)
    assert mask_path.parent == scan.parent
    result = segment_file(scan, mask="{stem}_brainmask.nii.gz", n_components=K)
    assert result.mask_spec == str(mask_path.absolute())
    assert (result.labels[mask == 0] == 0).all() and (result.labels[mask == 1] > 0).all()
    with pytest.raises(InputError, match="mask file not found .*'{stem}_other.nii.gz'"):
        segment_file(scan, mask="{stem}_other.nii.gz", n_components=K)
    with pytest.raises(SegmentError, match="unknown placeholder {name}"):
        segment_file(scan, mask="{name}_mask.nii.gz", n_components=K)


def test_segment_file_checks_outputs_before_fitting(scan, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "scan_segment.json").write_text("{}")

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted although an output exists")

    monkeypatch.setattr(segment.GaussianMixtureEM, "fit", no_fit)
    with pytest.raises(InputError, match="scan_segment.json: exists; pass --overwrite"):
        segment_file(scan, out_dir, n_components=K)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the output folder: .* is a file"):
        segment_file(scan, blocker / "sub", n_components=K)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda tmp: tmp / "missing.nii.gz", "missing.nii.gz: file not found"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: _write(tmp / "scan.txt", b"x"), "unsupported file type '.txt'"),
        (lambda tmp: _write(tmp / "bad.nii.gz", b"\x1f\x8b junk"), "cannot read NIfTI"),
        (lambda tmp: _write(tmp / "bad.png", b"\x89PNG\r\n\x1a\njunk"), "cannot read image"),
    ],
)
def test_segment_file_bad_files(tmp_path, setup, message):
    with pytest.raises(InputError, match=message) as info:
        segment_file(setup(tmp_path), n_components=2)
    assert info.value.path.name in str(info.value)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_segment_file_bad_data(make_nifti, tissues, scan, tmp_path):
    with pytest.raises(InputError, match="mask file not found"):
        segment_file(scan, mask=tmp_path / "nomask.nii.gz", n_components=2)
    other = make_nifti(tissues[:, :, :8], "other.nii.gz")
    with pytest.raises(InputError, match="other.nii.gz: channel grid does not match"):
        segment_file([scan, other], n_components=2)
    with pytest.raises(InputError, match="other.nii.gz: mask grid does not match"):
        segment_file(scan, mask=other, n_components=2)
    binary = make_nifti(np.where(tissues > 300, 5, 1), "binary.nii.gz")
    with pytest.raises(InputError, match="binary.nii.gz: only 2 distinct intensities"):
        segment_file(binary, n_components=4)
    with pytest.raises(SegmentError, match="no input file"):
        segment_file([], n_components=2)


# ------------------------------------------------------------------------------ save
def test_save_array_result_on_an_identity_grid(picture, tmp_path):
    result = segment_array(picture, n_components=K)
    paths = result.save(tmp_path / "out", prefix="arr", qc=False)
    img = nib.load(paths.dseg)
    assert paths.dseg.name == "arr_dseg.nii.gz" and img.shape == picture.shape
    np.testing.assert_allclose(img.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(img.dataobj), result.labels)
    assert nib.load(paths.probseg).shape[-1] == K
    assert json.loads(paths.sidecar.read_text())["inputs"] == []


def test_save_refuses_to_overwrite(picture, tmp_path):
    result = segment_array(picture, n_components=K)
    result.save(tmp_path, prefix="p", qc=False)
    before = (tmp_path / "p_dseg.nii.gz").read_bytes()
    with pytest.raises(InputError, match="p_dseg.nii.gz: exists; pass --overwrite"):
        result.save(tmp_path, prefix="p", qc=False)
    assert (tmp_path / "p_dseg.nii.gz").read_bytes() == before
    result.save(tmp_path, prefix="p", qc=False, overwrite=True)


@pytest.mark.parametrize("fail_in", ["write_probabilities", "write_qc"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_save_removes_what_it_wrote(picture, tmp_path, monkeypatch, fail_in, error):
    import segment.io
    import segment.qc

    def interrupted(*args, **kwargs):
        raise error

    module = segment.qc if fail_in == "write_qc" else segment.io
    monkeypatch.setattr(module, fail_in, interrupted)
    result = segment_array(picture, n_components=K)
    out_dir = tmp_path / "new" / "out"
    with pytest.raises(error):
        result.save(out_dir, prefix="p")
    assert not (tmp_path / "new").exists()  # folders created by save are removed again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "other.txt").write_text("not ours")
    with pytest.raises(error):
        result.save(kept, prefix="p")
    assert files_in(kept) == ["other.txt"]
    assert result.written == []


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fail_in", ["write_probabilities", "write_qc"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failed_overwrite_keeps_the_old_outputs(picture, tmp_path, monkeypatch, fail_in, error):
    """--overwrite replaces nothing until the whole new set is written."""
    import segment.io
    import segment.qc

    segment_array(picture, n_components=K).save(tmp_path, prefix="p")
    before = _contents(tmp_path)
    assert len(before) == 5  # dseg, dseg.tsv, probseg, qc, sidecar

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(segment.qc if fail_in == "write_qc" else segment.io, fail_in, failing)
    other = segment_array(picture, n_components=K + 1)
    with pytest.raises(error):
        other.save(tmp_path, prefix="p", overwrite=True)
    assert _contents(tmp_path) == before  # the same files, byte for byte; no temporary files
    assert other.written == []


@pytest.mark.parametrize("fail_at", [1, 2, 4])
@pytest.mark.parametrize("existing", [True, False])
def test_interrupted_renaming_puts_everything_back(picture, tmp_path, monkeypatch, fail_at,
                                                   existing):  # fmt: skip
    """An interrupt while the finished files are renamed into place: the old outputs come
    back (or, for a new set, nothing is left), whichever rename it hits."""
    import os

    import segment.io

    out = tmp_path / "out"
    if existing:
        segment_array(picture, n_components=K).save(out, prefix="p")
    before = _contents(out) if existing else {}
    calls = []
    real_replace = os.replace

    def replace(source, target):
        if not (Path(source).name.startswith(".") and Path(target).name.startswith(".")):
            calls.append(source)  # a rename of the commit (a final name on one side)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(segment.io.atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        segment_array(picture, n_components=K + 1).save(out, prefix="p", overwrite=True)
    monkeypatch.setattr(segment.io.os, "replace", real_replace)
    assert (_contents(out) if out.exists() else {}) == before
    assert out.exists() == existing  # a folder the call created is removed again


def test_overwrite_replaces_the_whole_set(picture, tmp_path):
    segment_array(picture, n_components=K).save(tmp_path, prefix="p")
    before = _contents(tmp_path)
    new = segment_array(picture, n_components=K + 1)
    new.save(tmp_path, prefix="p", overwrite=True)
    after = _contents(tmp_path)
    assert sorted(after) == sorted(before)  # no temporary or set-aside files left
    assert all(after[name] != before[name] for name in after)
    assert nib.load(tmp_path / "p_probseg.nii.gz").shape[-1] == K + 1
    assert json.loads((tmp_path / "p_segment.json").read_text())["model"]["n_components"] == K + 1


@pytest.fixture
def head(tmp_path) -> Path:
    from segment.samples import make_head_phantom

    image, _, affine = make_head_phantom(shape=(20, 24, 18), seed=3)
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def _kept_and_streamed(tmp_path, inputs, **options):
    """Segment ``inputs`` twice: probabilities kept, and streamed under a 1 kB memory limit."""
    options = {"qc": False, **options}
    kept = segment_file(inputs, tmp_path / "kept", **options)
    streamed = segment_file(inputs, tmp_path / "streamed", memory_limit=1000, **options)
    assert kept.flat_responsibilities is not None and kept.channels is None
    assert streamed.flat_responsibilities is None and streamed.channels is not None
    return kept, streamed


def _assert_same_outputs(tmp_path, kept, streamed):
    """Same labels, probabilities and output files, byte for byte (the JSON up to timings)."""
    np.testing.assert_array_equal(kept.labels, streamed.labels)
    np.testing.assert_array_equal(streamed.responsibilities, kept.responsibilities)
    assert [p.name for p in kept.written] == [p.name for p in streamed.written]
    for a, b in zip(kept.written[:-1], streamed.written[:-1]):  # all but the JSON sidecar
        assert a.read_bytes() == b.read_bytes(), a.name
    probseg = next(p for p in streamed.written if "_probseg." in p.name)
    if probseg.name.endswith(".nii.gz"):
        img = nib.load(probseg)
        assert img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), kept.responsibilities)
    json_a, json_b = (json.loads(r.written[-1].read_text()) for r in (kept, streamed))
    for row_a, row_b in zip(json_a["labels"], json_b["labels"]):
        assert row_a["n_voxels"] == row_b["n_voxels"]
        assert row_a["soft_volume_ml"] == pytest.approx(row_b["soft_volume_ml"], rel=1e-6)
    assert files_in(tmp_path / "kept") == files_in(tmp_path / "streamed")  # no spill files left


def test_streamed_probabilities_equal_kept_ones(tmp_path, head):
    """3-D, one chunk, one slab: a tiny memory_limit gives the same files, byte for byte."""
    kept, streamed = _kept_and_streamed(tmp_path, head, n_components=4)
    _assert_same_outputs(tmp_path, kept, streamed)


def test_streamed_probabilities_multi_chunk_and_slab(tmp_path, head, monkeypatch):
    """Odd chunks, several gzip members per map, a mask, NaN voxels: still the same bytes."""
    import segment.io

    image = nib.load(head)
    data = image.get_fdata(dtype=np.float32)
    data[3, 4, 5] = data[10, 11, 17] = np.nan
    path = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), path)
    monkeypatch.setattr(segment.io, "SLAB_BYTES", 20 * 24 * 4 * 5)  # 5 slices per member
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        kept, streamed = _kept_and_streamed(
            tmp_path, path, n_components=4, chunk_size=997, mask="auto"
        )
    assert not kept.mask.all() and kept.labels[3, 4, 5] == 0
    # written in 1 + 4 x 4 pieces (head, then 5 slices of each map) joined into one gzip member
    assert gzip_members(tmp_path / "kept" / "holes_probseg.nii.gz") == 1
    _assert_same_outputs(tmp_path, kept, streamed)


def test_streamed_probabilities_two_channels_uncompressed(tmp_path, head, monkeypatch):
    """Two channels from uncompressed ``.nii`` memory maps, several slabs: same bytes."""
    import segment.io

    image = nib.load(head)
    first = image.get_fdata(dtype=np.float32)
    second = np.sqrt(first + 1.0) * 7.0 + np.random.default_rng(1).normal(0, 1, first.shape)
    paths = [tmp_path / "t1.nii", tmp_path / "t2.nii"]
    for channel, path in zip((first, second.astype(np.float32)), paths):
        nib.save(nib.Nifti1Image(channel, image.affine), path)
    monkeypatch.setattr(segment.io, "SLAB_BYTES", 20 * 24 * 4 * 4 + 1)
    kept, streamed = _kept_and_streamed(tmp_path, paths, n_components=3, chunk_size=1001)
    assert isinstance(streamed.reference.data, np.memmap)  # read slab by slab, not copied
    assert np.shares_memory(streamed.channels[0], streamed.reference.data)
    _assert_same_outputs(tmp_path, kept, streamed)


def test_streamed_probabilities_2d_picture(tmp_path, make_image, picture):
    """A 2-D picture: the K-page TIFF is the same when the maps are recomputed."""
    path = make_image(picture.astype(np.float32), "slice.tif")
    kept, streamed = _kept_and_streamed(tmp_path, path, n_components=K)
    _assert_same_outputs(tmp_path, kept, streamed)


def test_streamed_volumes_index_like_the_kept_ones(head):
    kept = segment_file(head, n_components=4)
    streamed = segment_file(head, n_components=4, memory_limit=1000)
    volumes = streamed.responsibility_volumes()
    assert len(volumes) == 4 and callable(volumes.slabs)
    for k in (0, 3):
        np.testing.assert_array_equal(volumes[k], kept.responsibilities[..., k])
    with pytest.raises(IndexError):
        volumes[4]


def gzip_members(path: Path) -> int:
    """Number of gzip members in ``path``."""
    import zlib

    data, count = path.read_bytes(), 0
    while data:
        unpacker = zlib.decompressobj(31)
        unpacker.decompress(data)
        data, count = unpacker.unused_data, count + 1
    return count


def test_memory_limit_is_validated(tmp_path):
    with pytest.raises(SegmentError, match="memory_limit must be a positive size"):
        segment_array(np.arange(100.0).reshape(10, 10), n_components=2, memory_limit="lots")


def test_compresslevel_is_validated_and_reaches_batch_outputs(tmp_path, make_nifti, tissues):
    from segment.batch import run_batch

    scan = make_nifti(tissues, "scan.nii.gz")
    for bad in (10, -1, 1.5, True):
        with pytest.raises(SegmentError, match="compresslevel must be an integer from 0 to 9"):
            segment_file(scan, tmp_path / "out", n_components=3, compresslevel=bad)
    assert not (tmp_path / "out").exists()
    sizes = {}
    for level in (0, 9):
        folder = tmp_path / f"in{level}"
        folder.mkdir()
        make_nifti(tissues, folder / "scan.nii.gz")
        # an in-process cluster: the level travels in the scan's task all the same
        result = run_batch(folder, tmp_path / f"batch{level}", settings={"n_components": 3},
                           compresslevel=level, scheduler="threads")  # fmt: skip
        assert [row["status"] for row in result.rows] == ["ok"]
        sizes[level] = (tmp_path / f"batch{level}" / "scan_probseg.nii.gz").stat().st_size
    assert sizes[0] > 2 * sizes[9]


def test_a_callback_with_phase_hears_each_phase(tmp_path):
    """Progress names its phases: initialisation, EM, bias field EM, MRF sweeps, writing."""

    class Recorder:
        def __init__(self):
            self.events = []

        def phase(self, name):
            self.events.append(name)

        def __call__(self, iteration, log_likelihood, change):
            if not self.events or self.events[-1] != "iteration":
                self.events.append("iteration")

    recorder = Recorder()
    scan = Path(__file__).resolve().parent.parent / "sample_scans" / "head_t1.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # a uniform scan: the field is discarded
        segment.segment_file(
            scan, tmp_path / "out", n_components=3, mask="auto", mrf_beta=0.2, bias_field=True,
            max_iter=20, callback=recorder, qc=False, probseg=False,
        )  # fmt: skip
    events = recorder.events
    assert events[:4] == ["initialisation", "EM", "iteration", "bias field EM"]
    assert "MRF sweep 1" in events and events[-1] == "writing"
    assert events.index("bias field EM") < events.index("MRF sweep 1")


def test_progress_line_prefixes_iterations_with_the_phase(capsys):
    from segment.commands.common import ProgressLine

    line = ProgressLine()
    line.phase("bias field EM")
    line(3, -1234.5, 1e-3)
    ProgressLine.end()
    err = capsys.readouterr().err
    assert "bias field EM iteration    3" in err and err.endswith("\n")
