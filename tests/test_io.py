"""Tests for segment.io: loading scans, writing outputs on the input grid, atomic writes."""

from __future__ import annotations

import errno
import gzip
import os
import warnings
import zlib

import nibabel as nib
import numpy as np
import pytest

from segment import io as io_module
from segment.exceptions import DataWarning, InputError
from segment.io import (
    SUPPORTED_EXTENSIONS,
    Scan,
    atomic_write,
    check_same_grid,
    is_supported,
    load_scan,
    scan_stem,
    write_labels,
    write_nifti,
    write_nifti_slabs,
    write_probabilities,
)

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("scan.nii.gz", "scan"),
        ("scan.nii", "scan"),
        ("a.b.png", "a.b"),
        ("dir/sub-01_T1w.NII.GZ", "sub-01_T1w"),
        ("photo.TIFF", "photo"),
        ("notes.txt", "notes"),
    ],
)
def test_scan_stem(name, stem):
    assert scan_stem(name) == stem


def test_is_supported():
    for ext in SUPPORTED_EXTENSIONS:
        assert is_supported(f"x{ext}")
        assert is_supported(f"x{ext.upper()}")
    assert not is_supported("x.gz")
    assert not is_supported("x.mgz")
    assert not is_supported(".nii")  # no name before the extension


# --------------------------------------------------------------------------------------------
# Loading NIfTI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nifti2", [False, True])
@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_load_nifti(make_nifti, volume, affine, nifti2, name):
    scan = load_scan(make_nifti(name=name, nifti2=nifti2))
    assert isinstance(scan, Scan)
    assert scan.kind == "nifti"
    assert scan.shape == (7, 8, 9)
    assert scan.ndim == 3
    assert scan.data.dtype == np.int16
    np.testing.assert_array_equal(scan.data, volume)
    np.testing.assert_allclose(scan.affine, affine)
    assert scan.affine.dtype == np.float64
    assert scan.zooms == pytest.approx((1.5, 2.0, 2.5))
    assert scan.voxel_volume_ml == pytest.approx(1.5 * 2.0 * 2.5 / 1000)
    expected_header = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    assert type(scan.header) is expected_header


def test_uncompressed_nifti_is_a_memmap(make_nifti, volume):
    scan = load_scan(make_nifti(name="scan.nii"))
    assert isinstance(scan.data, np.memmap)
    np.testing.assert_array_equal(scan.data, volume)


def test_compressed_nifti_is_read_eagerly(make_nifti):
    scan = load_scan(make_nifti(name="scan.nii.gz"))
    assert type(scan.data) is np.ndarray


def test_scaling_is_applied_as_float32(make_nifti, volume):
    scan = load_scan(make_nifti(slope=0.5, inter=10.25))
    assert scan.data.dtype == np.float32
    np.testing.assert_allclose(scan.data, volume * 0.5 + 10.25, rtol=1e-6)


def test_integral_scaling_gives_integers(make_nifti, volume):
    scan = load_scan(make_nifti(slope=2.0, inter=-3.0))
    assert scan.data.dtype.kind in "iu"
    np.testing.assert_array_equal(scan.data, volume.astype(np.int64) * 2 - 3)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_dtype_is_kept_without_scaling(make_nifti, volume, dtype):
    data = np.clip(volume, 0, 255)
    scan = load_scan(make_nifti(data, dtype=dtype))
    assert scan.data.dtype == dtype
    np.testing.assert_array_equal(scan.data, data.astype(dtype))


def test_single_volume_4d_is_squeezed(make_nifti, volume):
    scan = load_scan(make_nifti(volume[..., np.newaxis], name="scan.nii"))
    assert scan.shape == (7, 8, 9)
    assert len(scan.zooms) == 3
    assert isinstance(scan.data, np.memmap)
    np.testing.assert_array_equal(scan.data, volume)


def test_2d_nifti_is_allowed(make_nifti, volume):
    scan = load_scan(make_nifti(volume[:, :, 0]))
    assert scan.kind == "nifti"
    assert scan.shape == (7, 8)
    assert scan.zooms == pytest.approx((1.5, 2.0))


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_bad_inputs(tmp_path, make_nifti, make_image, volume, rng):
    cases = []
    cases.append((tmp_path / "missing.nii.gz", "file not found"))
    (tmp_path / "folder.nii.gz").mkdir()
    cases.append((tmp_path / "folder.nii.gz", "is a directory, expected a file"))
    (tmp_path / "scan.mgz").write_bytes(b"x")
    cases.append((tmp_path / "scan.mgz", r"unsupported file type '\.mgz'; supported: \.nii, "))
    big = rng.normal(size=(30, 30, 30)).astype(np.float32)
    cases.append((_truncate(make_nifti(big, "trunc.nii.gz", dtype=np.float32)), "cannot read"))
    cases.append((_truncate(make_nifti(name="t.nii")), "cannot read NIfTI data: file is truncated"))
    cases.append((_truncate(make_image(name="trunc.png"), 0.6), "cannot read image"))
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    cases.append((tmp_path / "garbage.png", "cannot read image"))
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a gzip stream at all" * 20)
    cases.append((tmp_path / "garbage.nii.gz", "cannot read"))
    four_d = np.stack([volume] * 3, axis=-1)
    cases.append(
        (make_nifti(four_d, "4d.nii.gz"), r"4-D image with 3 volumes; segment one volume at a time")
    )
    cases.append((make_nifti(np.arange(100), "line.nii.gz"), r"1-D data \(shape \(100,\)\)"))
    cases.append((make_nifti(np.arange(100).reshape(100, 1, 1), "col.nii.gz"), "1-D data"))
    cases.append((make_image(np.arange(20, dtype=np.uint8)[np.newaxis], "row.png"), "1-D data"))
    cases.append((make_image(np.zeros((3, 10, 12), np.uint8), "stack.tif"), "multi-page TIFF"))
    for path, message in cases:
        with pytest.raises(InputError, match=message) as info:
            load_scan(path)
        assert info.value.path == path
        assert str(info.value).startswith(f"{path}: ")


def test_unreadable_file(make_nifti, monkeypatch):
    path = make_nifti()
    path.chmod(0)
    if os.name == "posix" and os.geteuid() == 0:  # root reads any file: deny as for a user
        real_access = os.access
        monkeypatch.setattr(
            "segment.io.read.os.access",
            lambda p, mode, *a, **k: False if str(p) == str(path) else real_access(p, mode),
        )
    try:
        with pytest.raises(InputError, match="cannot read: permission denied"):
            load_scan(path)
    finally:
        path.chmod(0o644)


def test_check_same_grid(make_nifti, volume, affine):
    reference = load_scan(make_nifti(name="ref.nii.gz"))
    check_same_grid(reference, load_scan(make_nifti(name="same.nii.gz")))

    shifted = affine.copy()
    shifted[0, 3] += 5.0
    other = load_scan(make_nifti(name="shifted.nii.gz", affine=shifted))
    with pytest.raises(InputError, match=r"mask grid does not match ref\.nii\.gz") as info:
        check_same_grid(reference, other, "mask")
    message = str(info.value)
    assert message.startswith(str(other.path))
    assert "[0, -2, 0, 95]" in message and "[0, -2, 0, 90]" in message

    smaller = load_scan(make_nifti(volume[:, :, :5], name="small.nii.gz"))
    with pytest.raises(InputError, match=r"shape \(7, 8, 5\) vs \(7, 8, 9\)"):
        check_same_grid(reference, smaller)


# --------------------------------------------------------------------------------------------
# Loading 2-D pictures
# --------------------------------------------------------------------------------------------


def test_png_grey_uint8(make_image):
    scan = load_scan(make_image())
    assert scan.kind == "image"
    assert scan.shape == (11, 13)
    assert scan.data.dtype == np.uint8
    assert scan.header is None
    np.testing.assert_array_equal(scan.affine, np.eye(4))
    assert scan.zooms == (1.0, 1.0)
    assert scan.voxel_volume_ml == pytest.approx(0.001)


def test_png_16bit(make_image, rng):
    data = rng.integers(0, 65535, size=(11, 13), dtype=np.uint16)
    scan = load_scan(make_image(data, "deep.png"))
    assert scan.data.dtype == np.uint16
    np.testing.assert_array_equal(scan.data, data)


@pytest.mark.parametrize("name", ["float.tif", "float.tiff"])
def test_float_tiff(make_image, rng, name):
    data = rng.normal(size=(11, 13)).astype(np.float32)
    scan = load_scan(make_image(data, name))
    assert scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data, data)


@pytest.mark.parametrize("name", ["photo.jpg", "photo.jpeg", "photo.bmp", "photo.tif"])
def test_other_formats(make_image, name):
    scan = load_scan(make_image(name=name))
    assert scan.shape == (11, 13)
    assert scan.data.dtype == np.uint8
    assert scan.data.max() > 150  # the bright square survived (JPEG is lossy)


@pytest.mark.parametrize("name", ["colour.png", "colour.tif"])
def test_rgb_becomes_luminance(make_image, rng, name):
    rgb = rng.integers(0, 255, size=(11, 13, 3), dtype=np.uint8)
    path = make_image(rgb, name)
    with pytest.warns(DataWarning, match=r"colour\.\w+: RGB image converted to luminance"):
        scan = load_scan(path)
    assert scan.data.dtype == np.float32
    assert scan.shape == (11, 13)
    expected = 0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2]
    np.testing.assert_allclose(scan.data, expected, rtol=1e-5)


def test_rgba_drops_alpha(make_image, rng):
    rgba = rng.integers(0, 255, size=(11, 13, 4), dtype=np.uint8)
    with pytest.warns(DataWarning, match="RGB image converted to luminance.*alpha"):
        scan = load_scan(make_image(rgba, "alpha.png"))
    expected = 0.2125 * rgba[..., 0] + 0.7154 * rgba[..., 1] + 0.0721 * rgba[..., 2]
    np.testing.assert_allclose(scan.data, expected, rtol=1e-5)


def test_grey_image_does_not_warn(make_image):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_scan(make_image())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _assert_same_geometry(out: nib.Nifti1Image, source: nib.Nifti1Image, n_spatial: int):
    oh, sh = out.header, source.header
    np.testing.assert_allclose(out.affine, source.affine)
    assert int(oh["sform_code"]) == int(sh["sform_code"])
    assert int(oh["qform_code"]) == int(sh["qform_code"])
    np.testing.assert_allclose(oh.get_sform(), sh.get_sform())
    np.testing.assert_allclose(oh.get_qform(), sh.get_qform())
    assert oh.get_zooms()[:n_spatial] == pytest.approx(sh.get_zooms()[:n_spatial])
    assert oh.get_xyzt_units()[0] == sh.get_xyzt_units()[0]  # spatial unit kept
    assert oh.get_xyzt_units()[1] == "unknown"  # no output is a time series
    assert out.shape[:n_spatial] == source.shape[:n_spatial]


@pytest.mark.parametrize("nifti2", [False, True])
def test_outputs_do_not_inherit_what_described_the_input(tmp_path, make_nifti, nifti2, rng):
    """A statistic map's intent, a time unit and a description are the input's, not ours: the
    label map says NIFTI_INTENT_LABEL, the maps no intent, all no time unit."""
    source = nib.load(make_nifti(nifti2=nifti2))
    source.header.set_intent("t test", (12.0,))
    source.header["descrip"] = b"scanner XYZ"
    source_path = tmp_path / "stat.nii.gz"
    nib.save(source, source_path)
    scan = load_scan(source_path)
    labels = write_labels(rng.integers(0, 4, size=scan.shape), scan, tmp_path / "d.nii.gz")
    maps = write_probabilities(
        rng.random(scan.shape + (3,)).astype(np.float32), scan, tmp_path / "p.nii.gz"
    )
    field = io_module.write_map(
        rng.random(scan.shape).astype(np.float32), scan, tmp_path / "b.nii.gz"
    )
    for path, intent in ((labels, "label"), (maps, "none"), (field, "none")):
        header = nib.load(path).header
        assert header.get_intent()[0] == intent
        assert header.get_xyzt_units() == ("mm", "unknown")
        assert bytes(header["descrip"]).rstrip(b"\0") == b"segment"


@pytest.mark.parametrize("nifti2", [False, True])
def test_write_labels_nifti(tmp_path, make_nifti, nifti2, rng):
    source_path = make_nifti(nifti2=nifti2, slope=0.5, inter=3.0)  # stale scaling must go
    scan = load_scan(source_path)
    labels = rng.integers(0, 4, size=scan.shape)
    out_path = write_labels(labels, scan, tmp_path / "scan_dseg.nii.gz")
    assert out_path == tmp_path / "scan_dseg.nii.gz"
    out = nib.load(out_path)
    assert type(out) is (nib.Nifti2Image if nifti2 else nib.Nifti1Image)
    _assert_same_geometry(out, nib.load(source_path), 3)
    assert out.shape == scan.shape
    assert out.get_data_dtype() == np.uint8
    assert out.header.get_slope_inter() == (None, None)
    assert (out.dataobj.slope, out.dataobj.inter) == (1.0, 0.0)
    assert float(out.header["cal_min"]) == 0.0
    assert float(out.header["cal_max"]) == float(labels.max())
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)


@pytest.mark.parametrize("nifti2", [False, True])
def test_write_probabilities_nifti(tmp_path, make_nifti, nifti2, rng):
    source_path = make_nifti(nifti2=nifti2)
    scan = load_scan(source_path)
    probabilities = rng.dirichlet(np.ones(3), size=scan.shape)
    out = nib.load(write_probabilities(probabilities, scan, tmp_path / "p.nii.gz"))
    _assert_same_geometry(out, nib.load(source_path), 3)
    assert out.shape == (7, 8, 9, 3)
    assert int(out.header["dim"][0]) == 4
    assert int(out.header["dim"][4]) == 3
    assert float(out.header["pixdim"][4]) == 1.0
    assert out.get_data_dtype() == np.float32
    assert out.header.get_slope_inter() == (None, None)
    assert (float(out.header["cal_min"]), float(out.header["cal_max"])) == (0.0, 1.0)
    np.testing.assert_allclose(np.asanyarray(out.dataobj), probabilities, rtol=1e-6)


def test_write_from_uncompressed_and_4d_inputs(tmp_path, make_nifti, volume, rng):
    scan = load_scan(make_nifti(volume[..., np.newaxis], name="scan.nii"))
    out = nib.load(write_labels(np.ones(scan.shape, int), scan, tmp_path / "l.nii.gz"))
    assert out.shape == (7, 8, 9)
    assert int(out.header["dim"][0]) == 3
    probs = rng.random(scan.shape + (2,))
    out = nib.load(write_probabilities(probs, scan, tmp_path / "p.nii"))
    assert out.shape == (7, 8, 9, 2)


def test_write_2d_nifti(tmp_path, make_nifti, volume, rng):
    scan = load_scan(make_nifti(volume[:, :, 0], name="slice.nii.gz"))
    labels = rng.integers(0, 3, size=scan.shape)
    out = nib.load(write_labels(labels, scan, tmp_path / "l.nii.gz"))
    assert out.shape == (7, 8)
    np.testing.assert_allclose(out.affine, scan.affine)
    probs = rng.random(scan.shape + (4,))
    out = nib.load(write_probabilities(probs, scan, tmp_path / "p.nii.gz"))
    assert out.shape == (7, 8, 1, 4)  # components stay on the 4th axis
    assert out.header.get_zooms()[:2] == pytest.approx(scan.zooms)
    assert float(out.header["pixdim"][4]) == 1.0
    np.testing.assert_allclose(np.asanyarray(out.dataobj)[:, :, 0, :], probs, rtol=1e-6)


def test_write_2d_image_outputs(tmp_path, make_image, rng):
    import skimage.io
    import tifffile

    scan = load_scan(make_image())
    labels = rng.integers(0, 4, size=scan.shape)
    png = write_labels(labels, scan, tmp_path / "image_dseg.png")
    read = skimage.io.imread(png)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, labels)

    probabilities = rng.dirichlet(np.ones(3), size=scan.shape)
    tif = write_probabilities(probabilities, scan, tmp_path / "image_probseg.tif")
    with tifffile.TiffFile(tif) as handle:
        assert len(handle.pages) == 3
        pages = handle.asarray()
    assert pages.dtype == np.float32
    assert pages.shape == (3, 11, 13)
    np.testing.assert_allclose(np.moveaxis(pages, 0, -1), probabilities, rtol=1e-6)


def test_write_bad_arguments(tmp_path, make_nifti, make_image):
    scan = load_scan(make_nifti())
    with pytest.raises(ValueError, match=r"labels shape \(7, 8\) does not match"):
        write_labels(np.zeros((7, 8), int), scan, tmp_path / "l.nii.gz")
    with pytest.raises(ValueError, match="must end in one of"):
        write_labels(np.zeros(scan.shape, int), scan, tmp_path / "l.mgz")
    with pytest.raises(ValueError, match=r"0\.\.255"):
        write_labels(np.full(scan.shape, 300), scan, tmp_path / "l.nii.gz")
    with pytest.raises(ValueError, match="cannot write a 3-D label map"):
        write_labels(np.zeros(scan.shape, int), scan, tmp_path / "l.png")
    with pytest.raises(ValueError, match="plus a components axis"):
        write_probabilities(np.zeros(scan.shape), scan, tmp_path / "p.nii.gz")
    image = load_scan(make_image())
    with pytest.raises(ValueError, match="must end in one of"):
        write_probabilities(np.zeros(image.shape + (2,)), image, tmp_path / "p.png")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_outputs_are_deterministic(tmp_path, make_nifti, rng):
    scan = load_scan(make_nifti())
    labels = rng.integers(0, 4, size=scan.shape)
    first = write_labels(labels, scan, tmp_path / "a.nii.gz").read_bytes()
    os.utime(tmp_path / "a.nii.gz", (0, 0))
    second = write_labels(labels, scan, tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    assert first[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME field
    assert gzip.decompress(first)  # a valid gzip stream


def test_write_nifti_uncompressed(tmp_path, volume, affine):
    img = nib.Nifti1Image(volume, affine)
    path = write_nifti(img, tmp_path / "plain.nii")
    assert path.read_bytes()[344:348] == b"n+1\x00"
    np.testing.assert_array_equal(nib.load(path).get_fdata(), volume)


# --------------------------------------------------------------------------------------------
# 4-D maps written from slabs of all volumes at once
# --------------------------------------------------------------------------------------------


class _SlabVolumes(list):
    """K volumes that can also be read as slabs of all K (what ``write_probabilities`` uses)."""

    def __init__(self, volumes, fail_after=None):
        super().__init__(volumes)
        self.fail_after = fail_after
        self.steps = []

    def slabs(self, step):
        self.steps.append(step)
        for index, start in enumerate(range(0, self[0].shape[-1], step)):
            if index == self.fail_after:
                raise KeyboardInterrupt
            yield [v[..., start : start + step] for v in self]


def _members(data: bytes) -> int:
    count = 0
    while data:
        unpacker = zlib.decompressobj(31)
        unpacker.decompress(data)
        data, count = unpacker.unused_data, count + 1
    return count


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of 2 slices of the 7 x 8 x 9 test grid: several gzip members per volume."""
    import segment.io

    monkeypatch.setattr(segment.io, "SLAB_BYTES", 7 * 8 * 4 * 2)


@pytest.mark.parametrize("name", ["p.nii.gz", "p.nii"])
@pytest.mark.parametrize("nifti2", [False, True])
def test_slab_writer_gives_the_bytes_of_the_volume_writer(
    tmp_path, make_nifti, rng, small_slabs, name, nifti2
):
    scan = load_scan(make_nifti(nifti2=nifti2))
    probabilities = rng.dirichlet(np.ones(3), size=scan.shape).astype(np.float32)
    volumes = _SlabVolumes([probabilities[..., k] for k in range(3)])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    by_volume = write_probabilities(probabilities, scan, tmp_path / "a" / name)
    by_slab = write_probabilities(volumes, scan, tmp_path / "b" / name)
    assert volumes.steps == [2]  # the slab path was taken
    assert by_slab.read_bytes() == by_volume.read_bytes()
    out = nib.load(by_slab)
    assert out.shape == (7, 8, 9, 3) and out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), probabilities)
    if name.endswith(".gz"):
        # header + 5 slabs of 3 volumes deflated apart, but one gzip member: readers that
        # stop after the first member (the BIDS validator) see the whole image
        assert _members(by_slab.read_bytes()) == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [name]  # no spill files


def test_slab_writer_2d_grid(tmp_path, make_nifti, volume, rng, small_slabs):
    scan = load_scan(make_nifti(volume[:, :, 0], name="slice.nii.gz"))
    probabilities = rng.random(scan.shape + (2,)).astype(np.float32)
    volumes = _SlabVolumes([probabilities[..., k] for k in range(2)])
    out = nib.load(write_probabilities(volumes, scan, tmp_path / "p.nii.gz"))
    assert out.shape == (7, 8, 1, 2)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj)[:, :, 0], probabilities)


def _copy_a_little_then_refuse(src, dst, count, *args):
    """A copy_file_range that copies 5 bytes once, then says the file system cannot."""
    if getattr(_copy_a_little_then_refuse, "done", False):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    _copy_a_little_then_refuse.done = True
    return os.write(dst, os.read(src, min(5, count)))


@pytest.mark.parametrize(
    "replacement", [None, _copy_a_little_then_refuse], ids=["missing", "partial"]
)
def test_slab_writer_without_copy_file_range(
    tmp_path, make_nifti, rng, small_slabs, monkeypatch, replacement
):
    scan = load_scan(make_nifti())
    probabilities = rng.random(scan.shape + (4,)).astype(np.float32)
    expected = write_probabilities(probabilities, scan, tmp_path / "a.nii.gz").read_bytes()
    if replacement is None:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        _copy_a_little_then_refuse.done = False
        monkeypatch.setattr(os, "copy_file_range", replacement)
    volumes = _SlabVolumes([probabilities[..., k] for k in range(4)])
    assert write_probabilities(volumes, scan, tmp_path / "b.nii.gz").read_bytes() == expected


@pytest.mark.parametrize("name", ["p.nii.gz", "p.nii"])
def test_interrupted_slab_write_leaves_nothing(tmp_path, make_nifti, rng, small_slabs, name):
    scan = load_scan(make_nifti())
    before = sorted(p.name for p in tmp_path.iterdir())
    volumes = _SlabVolumes([rng.random(scan.shape) for _ in range(3)], fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        write_probabilities(volumes, scan, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failed_append_leaves_nothing(tmp_path, make_nifti, rng, small_slabs, monkeypatch):
    scan = load_scan(make_nifti())
    before = sorted(p.name for p in tmp_path.iterdir())

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", disk_full)
    volumes = _SlabVolumes([rng.random(scan.shape) for _ in range(3)])
    with pytest.raises(OSError, match="No space left"):
        write_probabilities(volumes, scan, tmp_path / "p.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_slab_writer_checks_the_slabs(tmp_path, make_nifti):
    scan = load_scan(make_nifti())
    img = nib.Nifti1Image(np.zeros((7, 8, 9, 2), np.float32), np.eye(4))

    def wrong(step):
        yield [np.zeros((7, 8, step), np.float32)]  # one volume instead of two

    with pytest.raises(ValueError, match=r"slab 0 must be 2 arrays of shape \(7, 8, 9\)"):
        write_nifti_slabs(img.header, wrong, tmp_path / "p.nii.gz", shape=scan.shape)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.tmp-")
        assert tmp.name.endswith(".nii.gz")
        assert not tmp.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_cleans_up_on_any_exception(tmp_path, error):
    target = tmp_path / "out.png"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise error()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_interrupted_nifti_write_leaves_nothing(tmp_path, make_nifti, monkeypatch):
    scan = load_scan(make_nifti())
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module.gzip, "_deflate_piece", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_labels(np.zeros(scan.shape, int), scan, tmp_path / "scan_dseg.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unreadable_file_simulated(make_nifti, monkeypatch):
    # The real chmod test is skipped as root; exercise the same check with os.access denied.
    path = make_nifti()
    monkeypatch.setattr("segment.io.read.os.access", lambda *args, **kwargs: False)
    with pytest.raises(InputError, match="cannot read: permission denied"):
        load_scan(path)


def test_write_nifti_from_2d_image(tmp_path, make_image, rng):
    scan = load_scan(make_image())
    labels = rng.integers(0, 3, size=scan.shape)
    out = nib.load(write_labels(labels, scan, tmp_path / "l.nii.gz"))
    assert out.shape == (11, 13)
    np.testing.assert_allclose(out.affine, np.eye(4))
    assert int(out.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
    probs = rng.random(scan.shape + (2,))
    out = nib.load(write_probabilities(probs, scan, tmp_path / "p.nii.gz"))
    assert out.shape == (11, 13, 1, 2)
    assert out.header.get_zooms() == (1.0, 1.0, 1.0, 1.0)


def test_scaled_memmap_source_is_not_modified(make_nifti, volume):
    path = make_nifti(volume.astype(np.float32), name="f.nii", dtype=np.float32, slope=2.0)
    before = path.read_bytes()
    scan = load_scan(path)
    np.testing.assert_array_equal(scan.data, volume * 2)
    assert path.read_bytes() == before


@pytest.mark.parametrize("sizes", [(0, 5), (5, 0), (1, 1), (1000, 12345), (7, 1 << 20)])
def test_crc32_combine_equals_the_crc_of_the_concatenation(sizes):
    import zlib

    from segment.io.gzip import crc32_combine

    a, b = (np.random.default_rng(n).bytes(n) for n in sizes)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_parallel_gzip_is_one_member_gzip_accepts(tmp_path, make_nifti, rng, small_slabs):
    """Header and data in one gzip member (not one member per piece), CRC and length right."""
    import shutil
    import subprocess
    import zlib

    scan = load_scan(make_nifti())
    probabilities = rng.dirichlet(np.ones(4), size=scan.shape).astype(np.float32)
    path = write_probabilities(probabilities, scan, tmp_path / "p.nii.gz")
    data = path.read_bytes()
    unpacker = zlib.decompressobj(31)  # one member, checked (CRC-32, length) at its end
    raw = unpacker.decompress(data)
    assert unpacker.eof and unpacker.unused_data == b""
    assert len(raw) == 352 + probabilities.nbytes
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0


def test_gzip_members_choose_the_faster_strategy_only_when_it_compresses_as_well():
    """Z_RLE for maps whose bytes do not repeat; the default strategy where values repeat."""
    import zlib

    rng = np.random.default_rng(0)
    noisy = rng.random(1 << 20).astype(np.float32)  # mantissas that never repeat
    repeated = rng.choice(rng.random(50).astype(np.float32), 1 << 20)  # few distinct values
    assert io_module._strategy(noisy, 1) == zlib.Z_RLE
    assert io_module._strategy(repeated, 1) == zlib.Z_DEFAULT_STRATEGY
    for data in (noisy, repeated):  # either way a gzip member any reader decompresses
        assert np.array_equal(
            np.frombuffer(gzip.decompress(io_module._gzip_member(data, 1)), np.float32), data
        )


def test_staged_writes_name_the_final_file_and_commit_together(tmp_path):
    """Temporary names (and temporary files of them) map back to the file asked for; nothing
    appears under a final name before commit."""
    from segment.io import StagedWrites, _temporary_path

    staged = StagedWrites()
    first = staged.path(tmp_path / "a_dseg.nii.gz")
    second = staged.path(tmp_path / "a_qc.png")
    assert first.name.startswith(".a_dseg.tmp-") and first.name.endswith(".nii.gz")
    nested = _temporary_path(first)  # what atomic_write makes of a staged path
    assert staged.final_name(nested) == str(tmp_path / "a_dseg.nii.gz")
    assert staged.final_name(second) == str(tmp_path / "a_qc.png")
    assert staged.final_name(tmp_path / "other.png") == str(tmp_path / "other.png")
    first.write_bytes(b"labels")
    second.write_bytes(b"picture")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dseg.nii.gz", "a_qc.png"]
    assert (tmp_path / "a_dseg.nii.gz").read_bytes() == b"labels"
