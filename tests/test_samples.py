"""Tests of segment.samples: the synthetic head phantom, the 2-D sample and the writers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage import io

from segment.exceptions import InputError, SegmentError
from segment.samples import (
    DEFAULT_SHAPE,
    TISSUES,
    _png_bytes,
    generate,
    main,
    make_head_phantom,
    make_microscopy_image,
    write_samples,
)

SHAPE = (40, 48, 36)
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_scans"
SHIPPED = [
    "head_t1.nii.gz",
    "head_t1_labels.nii.gz",
    "head_t1_brainmask.nii.gz",
    "head_t1_noisy.nii.gz",
    "head_t1_labels.tsv",
    "head_slice.png",
    "head_slice_labels.png",
    "microscopy.png",
    "microscopy_labels.png",
]
FAT_MEAN = 500.0 * 1.35  # brightest tissue mean; noise % is relative to it


@pytest.fixture(scope="module")
def clean():
    """Noise-free, field-free phantom (image, labels, affine) on the small test grid."""
    return make_head_phantom(SHAPE, noise=0.0, seed=1)


def test_same_seed_same_arrays_and_other_seed_differs():
    a_img, a_lab, a_aff = make_head_phantom(SHAPE, noise=3.0, nonuniformity=20.0, seed=1)
    b_img, b_lab, b_aff = make_head_phantom(SHAPE, noise=3.0, nonuniformity=20.0, seed=1)
    c_img, c_lab, _ = make_head_phantom(SHAPE, noise=3.0, nonuniformity=20.0, seed=2)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    np.testing.assert_array_equal(a_aff, b_aff)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_shapes_dtypes_and_ras_affine_centred(clean):
    image, labels, affine = clean
    assert image.shape == labels.shape == SHAPE
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(affine), [1, 1, 1, 1])
    centre = affine @ np.r_[(np.array(SHAPE) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], 0.0)
    _, _, affine2 = make_head_phantom(SHAPE, noise=0.0, seed=1, voxel_size=2.0)
    np.testing.assert_allclose(np.diag(affine2)[:3], 2.0)


def test_default_shape_is_asymmetric():
    assert len(set(DEFAULT_SHAPE)) == 3


def test_all_classes_present_and_ordered_by_intensity(clean):
    image, labels, _ = clean
    assert sorted(np.unique(labels).tolist()) == [1, 2, 3, 4, 5, 6]
    medians = [np.median(image[labels == k]) for k in range(1, 7)]
    assert np.all(np.diff(medians) > 50), medians
    expected = [500.0 * t[3] for t in TISSUES]
    np.testing.assert_allclose(medians, expected, atol=10)


def test_brain_is_inside_skull_inside_scalp(clean):
    _, labels, _ = clean
    assert np.all(labels[0] == 1) and np.all(labels[:, :, -1] == 1)  # air at the edges
    centre = tuple(n // 2 for n in SHAPE)
    assert labels[centre] in (3, 4, 5)  # brain or ventricles at the centre


def test_labels_do_not_depend_on_noise_or_field(clean):
    _, labels, _ = clean
    _, noisy_labels, _ = make_head_phantom(SHAPE, noise=9.0, nonuniformity=40.0, seed=1)
    np.testing.assert_array_equal(labels, noisy_labels)


def test_noise_sigma_is_percent_of_brightest_tissue(clean):
    image0, labels, _ = clean
    image5, _, _ = make_head_phantom(SHAPE, noise=5.0, seed=1)
    sigma = 0.05 * FAT_MEAN
    wm = labels == 5  # high SNR: Rician is close to Gaussian
    measured = np.std(image5[wm].astype(float) - image0[wm])
    assert measured == pytest.approx(sigma, rel=0.1)
    air = labels == 1  # Rayleigh: mean sigma * sqrt(pi / 2)
    assert image5[air].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)


def test_noise_free_image_has_only_texture(clean):
    image, labels, _ = clean
    assert np.all(image[labels == 1] == 0)
    wm = image[labels == 5].astype(float)
    assert 0.005 < wm.std() / wm.mean() < 0.04


def test_nonuniformity_widens_white_matter(clean):
    image0, labels, _ = clean
    image40, _, _ = make_head_phantom(SHAPE, noise=0.0, nonuniformity=40.0, seed=1)
    wm = labels == 5
    cv0 = image0[wm].std() / image0[wm].mean()
    cv40 = image40[wm].std() / image40[wm].mean()
    assert cv40 > 1.5 * cv0
    head = labels > 1
    ratio = image40[head].astype(float) / image0[head]  # the field, up to int16 rounding
    assert ratio.min() == pytest.approx(0.8, abs=0.01)
    assert ratio.max() == pytest.approx(1.2, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (40, 48)}, "shape must be 3 integers"),
        ({"shape": (8, 48, 36)}, ">= 16"),
        ({"noise": -1.0}, r"noise is a percentage in \[0, 100\]"),
        ({"nonuniformity": 150.0}, "nonuniformity is a percentage"),
        ({"voxel_size": 0.0}, "voxel_size must be a positive"),
    ],
)
def test_bad_phantom_parameters(kwargs, match):
    kwargs = {"shape": SHAPE, **kwargs}
    with pytest.raises(SegmentError, match=match):
        make_head_phantom(**kwargs)


def test_microscopy_image():
    image, labels = make_microscopy_image((64, 80), n_phases=3, seed=3)
    again, _ = make_microscopy_image((64, 80), n_phases=3, seed=3)
    other, _ = make_microscopy_image((64, 80), n_phases=3, seed=4)
    assert image.shape == labels.shape == (64, 80)
    assert image.dtype == np.uint16 and labels.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == [1, 2, 3]
    np.testing.assert_array_equal(image, again)
    assert not np.array_equal(image, other)
    medians = [np.median(image[labels == k]) for k in (1, 2, 3)]
    assert medians[0] < medians[1] < medians[2]
    with pytest.raises(SegmentError, match="n_phases must be between 2 and 6"):
        make_microscopy_image(n_phases=1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = rng.integers(0, np.iinfo(dtype).max, size=(7, 9), dtype=dtype)
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(array))
    back = io.imread(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, array)


def test_generate_custom_phantom_is_reproducible(tmp_path):
    first = generate(tmp_path / "a", noise=5, nonuniformity=20, shape=SHAPE, seed=1)
    second = generate(tmp_path / "b", noise=5, nonuniformity=20, shape=SHAPE, seed=1)
    assert [p.name for p in first] == ["head_t1_n5_rf20.nii.gz", "head_t1_n5_rf20_labels.nii.gz"]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
    img, lab = nib.load(first[0]), nib.load(first[1])
    assert img.shape == SHAPE and img.get_data_dtype() == np.int16
    assert lab.get_data_dtype() == np.uint8
    assert img.header.get_xyzt_units()[0] == "mm"
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    expected, labels, affine = make_head_phantom(SHAPE, noise=5, nonuniformity=20, seed=1)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), labels)
    np.testing.assert_allclose(img.affine, affine)
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary files left behind


def test_generate_refuses_to_overwrite(tmp_path):
    generate(tmp_path, noise=3, shape=SHAPE)
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        generate(tmp_path, noise=3, shape=SHAPE)
    assert len(generate(tmp_path, noise=3, shape=SHAPE, overwrite=True)) == 2


def test_main_writes_files_and_exits_1_on_existing(tmp_path, capsys):
    argv = [str(tmp_path), "--noise", "1", "--shape", *map(str, SHAPE)]
    assert main(argv) == 0
    assert (tmp_path / "head_t1_n1_rf0.nii.gz").is_file()
    assert "head_t1_n1_rf0_labels.nii.gz" in capsys.readouterr().out
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 1


def test_shipped_set_present_and_under_5_mb():
    sizes = {p.name: p.stat().st_size for p in SAMPLE_DIR.iterdir() if p.is_file()}
    assert set(SHIPPED) <= set(sizes)
    assert "README.md" in sizes
    assert sum(sizes.values()) < 5 * 1024 * 1024


def test_shipped_labels_match_table_and_image():
    labels = nib.load(SAMPLE_DIR / "head_t1_labels.nii.gz")
    image = nib.load(SAMPLE_DIR / "head_t1.nii.gz")
    np.testing.assert_allclose(labels.affine, image.affine)
    rows = (SAMPLE_DIR / "head_t1_labels.tsv").read_text().splitlines()
    assert rows[0] == "index\tname\tabbreviation"
    indices = [int(r.split("\t")[0]) for r in rows[1:]]
    assert indices == sorted(np.unique(np.asanyarray(labels.dataobj)).tolist())


@pytest.mark.slow
def test_shipped_set_regenerates_byte_for_byte(tmp_path):
    paths = write_samples(tmp_path, seed=0)
    assert [p.name for p in paths] == SHIPPED
    for path in paths:
        assert path.read_bytes() == (SAMPLE_DIR / path.name).read_bytes(), path.name
