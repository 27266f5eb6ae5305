"""Tests for segment.masking: masks, valid voxels and the flatten/unflatten voxel order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segment.exceptions import InputError, SegmentError
from segment.io import load_scan
from segment.masking import auto_mask, flatten, load_mask, unflatten, valid_voxels

# --------------------------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------------------------


def test_flatten_single_channel(rng, shape3d):
    data = rng.integers(0, 1000, size=shape3d).astype(np.int16)
    mask = rng.random(shape3d) > 0.4
    X = flatten(data, mask)
    assert X.shape == (mask.sum(), 1)
    assert X.dtype == np.int16
    # C order of mask.nonzero()
    np.testing.assert_array_equal(X[:, 0], [data[i, j, k] for i, j, k in zip(*mask.nonzero())])


def test_flatten_unflatten_round_trip_with_channels(rng, shape3d):
    data = rng.normal(size=shape3d + (3,)).astype(np.float32)
    mask = rng.random(shape3d) > 0.5
    X = flatten(data, mask)
    assert X.shape == (mask.sum(), 3)
    assert X.dtype == np.float32
    back = unflatten(X, mask, fill=np.nan)
    assert back.shape == shape3d + (3,)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back[mask], data[mask])
    assert np.isnan(back[~mask]).all()


def test_unflatten_labels_keep_dtype(rng, shape2d):
    mask = rng.random(shape2d) > 0.3
    labels = rng.integers(1, 4, size=mask.sum()).astype(np.uint8)
    grid = unflatten(labels, mask)
    assert grid.dtype == np.uint8
    assert grid.shape == shape2d
    assert (grid[~mask] == 0).all()
    np.testing.assert_array_equal(flatten(grid, mask)[:, 0], labels)


def test_flatten_reads_memmaps(make_nifti, volume):
    scan = load_scan(make_nifti(name="scan.nii"))
    mask = np.asarray(scan.data) > 500
    X = flatten(scan.data, mask)
    assert type(X) is np.ndarray
    np.testing.assert_array_equal(X[:, 0], volume[mask])


@settings(max_examples=40, deadline=None)
@given(
    mask=hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=3, max_side=6)),
    channels=st.integers(1, 3),
)
def test_round_trip_property(mask, channels):
    data = np.arange(mask.size * channels, dtype=np.float64).reshape(mask.shape + (channels,))
    X = flatten(data, mask)
    assert X.shape == (int(mask.sum()), channels)
    np.testing.assert_array_equal(unflatten(X, mask)[mask], data[mask])


def test_flatten_unflatten_bad_arguments(shape3d):
    mask = np.ones(shape3d, bool)
    with pytest.raises(ValueError, match="does not match mask"):
        flatten(np.zeros((7, 8, 10)), mask)
    with pytest.raises(TypeError, match="bool array"):
        flatten(np.zeros(shape3d), mask.astype(int))
    with pytest.raises(ValueError, match=r"shape \(504,\) or \(504, K\)"):
        unflatten(np.zeros(10), mask)


# --------------------------------------------------------------------------------------------
# valid_voxels
# --------------------------------------------------------------------------------------------


def test_valid_voxels_counts_nonfinite_inside_mask(rng, shape3d):
    a = rng.normal(size=shape3d)
    b = rng.normal(size=shape3d)
    mask = np.zeros(shape3d, bool)
    mask[1:6, 1:7, 1:8] = True
    a[2, 2, 2] = np.nan  # inside
    b[3, 3, 3] = np.inf  # inside
    a[3, 3, 3] = np.nan  # same voxel: counted once
    a[0, 0, 0] = np.nan  # outside the mask: not counted
    valid, n_bad = valid_voxels([a, b], mask)
    assert n_bad == 2
    assert valid.sum() == mask.sum() - 2
    assert not valid[2, 2, 2] and not valid[3, 3, 3] and not valid[0, 0, 0]

    stacked, n_stacked = valid_voxels(np.stack([a, b], axis=-1), mask)
    np.testing.assert_array_equal(stacked, valid)
    assert n_stacked == 2


def test_valid_voxels_without_mask(rng, shape2d):
    image = rng.normal(size=shape2d).astype(np.float32)
    image[0, :3] = np.nan
    valid, n_bad = valid_voxels(image, None)
    assert n_bad == 3
    assert valid.sum() == image.size - 3
    ints = rng.integers(0, 5, size=shape2d)
    valid, n_bad = valid_voxels([ints], None)
    assert valid.all() and n_bad == 0


def test_valid_voxels_shape_mismatch(shape3d):
    with pytest.raises(ValueError, match="channel 1 has shape"):
        valid_voxels([np.zeros(shape3d), np.zeros((7, 8, 8))], None)


# --------------------------------------------------------------------------------------------
# auto_mask
# --------------------------------------------------------------------------------------------


def _blob(rng, shape, centre, radius):
    """Bright ball on a noisy background plus one bright isolated noise voxel far away."""
    grid = np.indices(shape)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    truth = distance <= radius
    image = rng.normal(100.0, 10.0, size=shape)
    image[truth] += 400.0
    return image, truth


def test_auto_mask_2d(rng):
    image, truth = _blob(rng, (40, 50), (20, 28), 9)
    image[2, 2] = 600.0  # isolated bright speck: not the largest component
    image[20, 28] = 90.0  # dark hole inside the blob: filled
    mask = auto_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    assert not mask[2, 2]
    assert mask[20, 28]
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.97


def test_auto_mask_3d_with_nan(rng):
    shape = (30, 32, 34)
    image, truth = _blob(rng, shape, (15, 14, 18), 8)
    image[0, 0, :4] = np.nan
    image[29, 31, 33] = 700.0
    mask = auto_mask(image)
    assert mask.shape == shape
    assert not mask[29, 31, 33]
    assert not mask[0, 0, :4].any()
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.97


def test_auto_mask_single_slice_volume_fills_holes(rng):
    image, truth = _blob(rng, (40, 40), (20, 20), 10)
    image[18:23, 18:23] = 100.0  # a 5x5 dark hole
    mask = auto_mask(image[:, :, np.newaxis])
    assert mask.shape == (40, 40, 1)
    assert mask[18:23, 18:23, 0].all()


def test_auto_mask_refuses_constant_and_empty_images():
    with pytest.raises(SegmentError, match="constant"):
        auto_mask(np.full((5, 6), 3.0))
    with pytest.raises(SegmentError, match="no finite voxel"):
        auto_mask(np.full((5, 6), np.nan))


# --------------------------------------------------------------------------------------------
# load_mask
# --------------------------------------------------------------------------------------------


def test_load_mask_none_and_auto(make_nifti):
    scan = load_scan(make_nifti())
    assert load_mask(None, scan) is None
    assert load_mask("none", scan) is None
    assert load_mask("NONE", scan) is None
    mask = load_mask("auto", scan)
    assert mask.dtype == bool and mask.shape == scan.shape
    # the fixture volume has a bright 3x4x4 box
    assert mask[2:5, 2:6, 3:7].all()
    assert mask.sum() == 3 * 4 * 4


def test_load_mask_from_file(make_nifti, volume):
    scan = load_scan(make_nifti())
    mask_data = np.zeros(volume.shape, np.uint8)
    mask_data[1:4, 2:5, 3:6] = 1
    mask = load_mask(make_nifti(mask_data, "mask.nii.gz", dtype=np.uint8), scan)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, mask_data > 0)
    # a str path works too
    as_str = load_mask(str(make_nifti(mask_data, "mask2.nii", dtype=np.uint8)), scan)
    np.testing.assert_array_equal(as_str, mask)


def test_load_mask_from_array(make_image, shape2d):
    scan = load_scan(make_image())
    array = np.zeros(shape2d)
    array[2:5, 3:9] = 0.5
    array[0, 0] = np.nan
    mask = load_mask(array, scan)
    np.testing.assert_array_equal(mask, np.nan_to_num(array) > 0)
    with pytest.raises(InputError, match=r"mask array has shape \(3, 3\)"):
        load_mask(np.ones((3, 3), bool), scan)


def test_load_mask_errors(make_nifti, volume, affine):
    scan = load_scan(make_nifti())
    empty = make_nifti(np.zeros(volume.shape), "empty.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="mask is empty: no non-zero voxel") as info:
        load_mask(empty, scan)
    assert info.value.path == empty
    with pytest.raises(InputError, match="mask is empty: no non-zero voxel"):
        load_mask(np.zeros(scan.shape, bool), scan)

    moved = affine.copy()
    moved[:3, 3] += 1.0
    other_grid = make_nifti(np.ones(volume.shape), "moved.nii.gz", affine=moved, dtype=np.uint8)
    with pytest.raises(InputError, match="mask grid does not match scan.nii.gz") as info:
        load_mask(other_grid, scan)
    assert info.value.path == other_grid

    other_shape = make_nifti(np.ones((7, 8, 8)), "short.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match=r"shape \(7, 8, 8\) vs \(7, 8, 9\)"):
        load_mask(other_shape, scan)

    with pytest.raises(InputError, match="file not found"):
        load_mask("no_such_mask.nii.gz", scan)

    with pytest.raises(InputError, match="constant"):
        load_mask("auto", load_scan(make_nifti(np.full(volume.shape, 7), "flat.nii.gz")))


SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_scans"


@pytest.mark.parametrize("name", ["head_t1.nii.gz", "head_t1_noisy.nii.gz"])
def test_auto_mask_keeps_the_whole_head_of_the_sample(name):
    """Whole-head scan: air out; scalp, skull and CSF in (truth label 1 = air, 3 = CSF)."""
    import nibabel as nib

    image = nib.load(SAMPLE_DIR / name).get_fdata()
    truth = np.asarray(nib.load(SAMPLE_DIR / "head_t1_labels.nii.gz").dataobj).astype(int)
    mask = auto_mask(image)
    assert mask[truth != 1].mean() >= 0.98
    assert mask[truth == 3].mean() >= 0.99
    assert mask[truth == 2].mean() >= 0.98  # skull
    assert mask[truth == 1].mean() <= 0.05  # little air


def test_auto_mask_keeps_the_whole_brain_of_a_skull_stripped_scan():
    import nibabel as nib

    image = nib.load(SAMPLE_DIR / "head_t1.nii.gz").get_fdata()
    brain = np.asarray(nib.load(SAMPLE_DIR / "head_t1_brainmask.nii.gz").dataobj) > 0
    mask = auto_mask(np.where(brain, image, 0.0))
    assert mask[brain].mean() >= 0.99
    assert mask[~brain].mean() <= 0.001
