"""Tests of segment.evaluate: matched Dice/Jaccard, confusion matrix, volumes, file checks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from skimage import io

from segment.evaluate import evaluate_files, evaluate_labels, format_table
from segment.exceptions import InputError, SegmentError

# Reference classes 1 (4 voxels) and 2 (4 voxels); prediction uses other numbers.
REFERENCE = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
PREDICTED = np.array([[7, 7, 7, 3], [7, 7, 3, 3]])


def _save_nifti(path, data, affine=None, zooms=(1.0, 1.0, 1.0)):
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_hand_computed_dice_and_jaccard():
    result = evaluate_labels(PREDICTED, REFERENCE)
    one, two = result["classes"]
    assert result["mapping"] == {"1": 7, "2": 3}
    # class 1: |R|=4, |P|=5, overlap 4; class 2: |R|=4, |P|=3, overlap 3
    assert one["dice"] == pytest.approx(8 / 9)
    assert one["jaccard"] == pytest.approx(4 / 5)
    assert two["dice"] == pytest.approx(6 / 7)
    assert two["jaccard"] == pytest.approx(3 / 4)
    assert result["mean_dice"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert (one["reference_voxels"], one["predicted_voxels"], one["overlap_voxels"]) == (4, 5, 4)
    assert one["reference_volume"] == pytest.approx(4e-3)
    assert one["predicted_volume"] == pytest.approx(5e-3)
    assert result["units"] == "mL" and result["voxel_volume_ml"] == 1e-3
    assert result["unmatched_predicted"] == []
    json.dumps(result)  # serialisable as is


def test_perfect_prediction_scores_one():
    result = evaluate_labels(REFERENCE * 10, REFERENCE)
    assert [c["dice"] for c in result["classes"]] == [1.0, 1.0]
    assert [c["jaccard"] for c in result["classes"]] == [1.0, 1.0]


def test_confusion_matrix_rows_reference_columns_predicted():
    cm = evaluate_labels(PREDICTED, REFERENCE)["confusion_matrix"]
    assert cm["reference_labels"] == [1, 2]
    assert cm["predicted_labels"] == [3, 7]
    assert cm["counts"] == [[0, 4], [3, 1]]


def test_label_permutation_gives_same_scores():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 5, size=(6, 7, 8))
    predicted = reference.copy()
    flip = rng.random(reference.shape) < 0.2
    predicted[flip] = rng.integers(0, 5, size=flip.sum())
    base = evaluate_labels(predicted, reference)
    permutation = np.array([3, 0, 4, 1, 2]) + 10
    permuted = evaluate_labels(permutation[predicted], reference)
    assert [c["dice"] for c in permuted["classes"]] == [c["dice"] for c in base["classes"]]
    assert permuted["mapping"] == {k: int(permutation[v]) for k, v in base["mapping"].items()}
    assert base["mapping"] == {str(k): k for k in range(5)}


def test_hungarian_beats_greedy_matching():
    # Contingency: ref 1 -> {pred 1: 3, pred 2: 2}; ref 2 -> {pred 1: 2}. Greedy (largest
    # overlap first) pairs 1-1 and leaves ref 2 with pred 2 (overlap 0, total 3); the optimal
    # assignment pairs 1-2 and 2-1 (total 4).
    reference = np.array([1, 1, 1, 1, 1, 2, 2])
    predicted = np.array([1, 1, 1, 2, 2, 1, 1])
    result = evaluate_labels(predicted, reference)
    assert result["mapping"] == {"1": 2, "2": 1}
    assert sum(c["overlap_voxels"] for c in result["classes"]) == 4


def test_more_reference_classes_than_predicted_labels():
    reference = np.array([1, 1, 2, 2, 3, 3])
    predicted = np.array([4, 4, 4, 4, 4, 9])
    result = evaluate_labels(predicted, reference)
    unmatched = [c for c in result["classes"] if c["matched_label"] is None]
    assert len(unmatched) == 1
    assert unmatched[0]["dice"] == 0.0 and unmatched[0]["predicted_voxels"] == 0
    assert result["mean_dice"] == pytest.approx(np.mean([c["dice"] for c in result["classes"]]))


def test_extra_predicted_labels_are_listed():
    reference = np.array([1, 1, 1, 2, 2, 2])
    predicted = np.array([1, 1, 5, 2, 2, 6])
    result = evaluate_labels(predicted, reference)
    assert result["mapping"] == {"1": 1, "2": 2}
    assert result["unmatched_predicted"] == [5, 6]
    assert result["classes"][0]["dice"] == pytest.approx(2 * 2 / (3 + 2))


def test_ignore_zero_drops_voxels_that_are_zero_in_either_map():
    reference = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    predicted = np.array([1, 2, 0, 1, 1, 0, 2, 2])
    result = evaluate_labels(predicted, reference, ignore_zero=True)
    assert [c["reference_label"] for c in result["classes"]] == [1, 2]
    assert result["n_voxels"] == 4  # voxels 0-2 (reference 0) and 5 (predicted 0) dropped
    assert [c["dice"] for c in result["classes"]] == [1.0, 1.0]
    assert result["confusion_matrix"]["predicted_labels"] == [1, 2]
    assert result["confusion_matrix"]["counts"] == [[2, 0], [0, 2]]
    without = evaluate_labels(predicted, reference)
    assert [c["reference_label"] for c in without["classes"]] == [0, 1, 2]


def test_mean_dice_leaves_out_label_0():
    """Label 0 is reported but its Dice against the background does not pad the mean."""
    reference = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([5, 5, 5, 5, 1, 2, 2, 2])
    result = evaluate_labels(predicted, reference)
    dice = {c["reference_label"]: c["dice"] for c in result["classes"]}
    assert dice[0] == 1.0
    assert result["mean_dice"] == pytest.approx((dice[1] + dice[2]) / 2)
    assert result["mean_dice"] < 0.8


def test_mask_scores_only_inside():
    reference = np.array([1, 1, 2, 2, 2, 2])
    predicted = np.array([1, 2, 2, 2, 1, 1])
    mask = np.array([True, False, True, True, False, False])
    result = evaluate_labels(predicted, reference, mask=mask)
    assert result["n_voxels"] == 3 and result["masked"]
    assert result["mean_dice"] == 1.0
    assert evaluate_labels(predicted, reference)["mean_dice"] < 0.7
    with pytest.raises(SegmentError, match="mask has shape"):
        evaluate_labels(predicted, reference, mask=mask[:3])


def test_whole_number_floats_are_labels():
    result = evaluate_labels(PREDICTED.astype(np.float32), REFERENCE.astype(np.float64))
    assert result["mean_dice"] == pytest.approx((8 / 9 + 6 / 7) / 2)


@pytest.mark.parametrize(
    ("predicted", "match"),
    [
        (np.zeros((2, 4), dtype=int), "only label 0"),
        (np.full((2, 4), 0.5), "not integer label data"),
        (np.array([[1, 1, np.nan, 2]] * 2), "NaN/inf"),
        (np.ones((4, 2), dtype=int), r"shape \(4, 2\) but the reference has shape \(2, 4\)"),
    ],
)
def test_bad_arrays(predicted, match):
    with pytest.raises(SegmentError, match=match):
        evaluate_labels(predicted, REFERENCE)


def test_no_overlap_in_reference_region():
    reference = np.array([0, 0, 1, 1])
    predicted = np.array([3, 3, 0, 0])
    with pytest.raises(SegmentError, match="no voxel left to score"):
        evaluate_labels(predicted, reference, ignore_zero=True)


def test_files_nifti_volumes_from_zooms(tmp_path):
    ref = np.zeros((5, 6, 7), dtype=np.uint8)
    ref[1:4, 1:5, 1:6] = 1
    ref[2, 2, 2:5] = 2
    pred = np.where(ref == 1, 4, np.where(ref == 2, 9, 0)).astype(np.int16)
    ref_path = _save_nifti(tmp_path / "ref.nii.gz", ref, zooms=(2.0, 1.5, 1.0))
    pred_path = _save_nifti(tmp_path / "pred.nii", pred, zooms=(2.0, 1.5, 1.0))
    result = evaluate_files(pred_path, ref_path)
    assert result["voxel_volume_ml"] == pytest.approx(3e-3)
    assert result["units"] == "mL"
    by_label = {c["reference_label"]: c for c in result["classes"]}
    assert by_label[1]["reference_volume"] == pytest.approx((ref == 1).sum() * 3e-3)
    assert by_label[2]["predicted_volume"] == pytest.approx(3 * 3e-3)
    assert result["mapping"] == {"0": 0, "1": 4, "2": 9}
    assert result["mean_dice"] == 1.0
    assert result["predicted_path"] == str(pred_path)
    json.dumps(result)


def test_files_png_uses_square_millimetres(tmp_path):
    ref = np.zeros((6, 8), dtype=np.uint8)
    ref[2:5, 1:7] = 2
    pred = ref.copy()
    pred[2, 1] = 0
    io.imsave(tmp_path / "ref.png", ref, check_contrast=False)
    io.imsave(tmp_path / "pred.png", pred, check_contrast=False)
    result = evaluate_files(tmp_path / "pred.png", tmp_path / "ref.png")
    assert result["units"] == "mm²" and result["voxel_volume_ml"] is None
    two = result["classes"][1]
    assert two["reference_volume"] == 18.0 and two["predicted_volume"] == 17.0
    assert two["dice"] == pytest.approx(2 * 17 / 35)


def test_files_shape_mismatch(tmp_path):
    ref = _save_nifti(tmp_path / "ref.nii.gz", np.ones((5, 6, 7), dtype=np.uint8))
    pred = _save_nifti(tmp_path / "pred.nii.gz", np.ones((5, 6, 8), dtype=np.uint8))
    with pytest.raises(InputError, match=r"pred\.nii\.gz: shape \(5, 6, 8\) differs .*\(5, 6, 7\)"):
        evaluate_files(pred, ref)


def test_files_affine_mismatch_prints_both(tmp_path):
    data = np.ones((5, 6, 7), dtype=np.uint8)
    ref = _save_nifti(tmp_path / "ref.nii.gz", data)
    shifted = np.eye(4)
    shifted[0, 3] = 2.5
    pred = _save_nifti(tmp_path / "pred.nii.gz", data, affine=shifted)
    with pytest.raises(InputError, match="grid differs from the reference") as excinfo:
        evaluate_files(pred, ref)
    message = str(excinfo.value)
    assert "predicted affine" in message and "reference affine" in message
    assert "2.500" in message
    nearly = np.eye(4)
    nearly[0, 3] = 5e-4  # within the 1e-3 tolerance
    close = _save_nifti(tmp_path / "close.nii.gz", data, affine=nearly)
    assert evaluate_files(close, ref)["mean_dice"] == 1.0


def test_files_all_zero_prediction(tmp_path):
    ref = _save_nifti(tmp_path / "ref.nii.gz", np.ones((5, 6, 7), dtype=np.uint8))
    pred = _save_nifti(tmp_path / "pred.nii.gz", np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(InputError, match=r"pred\.nii\.gz: the prediction holds only label 0"):
        evaluate_files(pred, ref)


def test_files_no_overlap(tmp_path):
    ref_data = np.zeros((5, 6, 7), dtype=np.uint8)
    ref_data[:2] = 1
    ref = _save_nifti(tmp_path / "ref.nii.gz", ref_data)
    pred = _save_nifti(tmp_path / "pred.nii.gz", (1 - ref_data) * 3)
    with pytest.raises(InputError, match="no voxel left to score"):
        evaluate_files(pred, ref, ignore_zero=True)


def test_files_mask_and_label_names(tmp_path):
    ref_data = np.zeros((5, 6, 7), dtype=np.uint8)
    ref_data[1:4, 1:5, 1:6] = 1
    ref_data[2, 2, 2:5] = 2
    pred_data = np.where(ref_data == 2, 7, ref_data * 3).astype(np.uint8)
    pred_data[4] = 7  # wrong outside the mask
    ref = _save_nifti(tmp_path / "ref.nii.gz", ref_data)
    pred = _save_nifti(tmp_path / "p_dseg.nii.gz", pred_data)
    (tmp_path / "ref.tsv").write_text("index\tname\n0\tair\n1\tbrain\n2\tlesion\n")
    (tmp_path / "p_dseg.tsv").write_text("index\tname\n0\toutside mask\n3\tgrey\n7\tbright\n")
    mask = _save_nifti(tmp_path / "mask.nii.gz", (np.arange(5) < 4)[:, None, None] * np.ones(
        (5, 6, 7), np.uint8))  # fmt: skip
    inside = evaluate_files(pred, ref, mask_path=mask)
    assert inside["mean_dice"] == 1.0 and inside["mask_path"].endswith("mask.nii.gz")
    assert evaluate_files(pred, ref)["mean_dice"] < 1.0
    names = {c["reference_name"]: c.get("matched_name") for c in inside["classes"]}
    assert names == {"air": "outside mask", "brain": "grey", "lesion": "bright"}
    assert "brain / grey" in format_table(inside)


def test_files_non_integer(tmp_path):
    ref = _save_nifti(tmp_path / "ref.nii.gz", np.ones((5, 6, 7), dtype=np.uint8))
    probs = np.full((5, 6, 7), 0.25, dtype=np.float32)
    pred = _save_nifti(tmp_path / "prob.nii.gz", probs)
    with pytest.raises(InputError, match=r"prob\.nii\.gz: not integer label data"):
        evaluate_files(pred, ref)
    with pytest.raises(InputError, match=r"prob\.nii\.gz: not integer label data"):
        evaluate_files(ref, pred)


def test_files_missing_4d_and_rgb(tmp_path):
    ref = _save_nifti(tmp_path / "ref.nii.gz", np.ones((5, 6, 7), dtype=np.uint8))
    with pytest.raises(InputError, match=r"nope\.nii\.gz: no such file"):
        evaluate_files(tmp_path / "nope.nii.gz", ref)
    four = _save_nifti(tmp_path / "four.nii.gz", np.ones((5, 6, 7, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="expected a 3-D label map"):
        evaluate_files(four, ref)
    io.imsave(tmp_path / "rgb.png", np.zeros((6, 8, 3), dtype=np.uint8), check_contrast=False)
    with pytest.raises(InputError, match="single-channel 2-D label image"):
        evaluate_files(tmp_path / "rgb.png", tmp_path / "rgb.png")


def test_format_table():
    text = format_table(evaluate_labels(PREDICTED, REFERENCE))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "matched", "Dice", "Jaccard", "ref", "mL", "pred", "mL"]
    assert lines[2].split() == ["1", "7", "0.8889", "0.8000", "0.004", "0.005"]
    assert lines[3].split() == ["2", "3", "0.8571", "0.7500", "0.004", "0.003"]
    assert lines[4].split() == ["mean", "0.8730"]
    assert "confusion matrix" in text
    assert lines[-3].split() == ["ref/pred", "3", "7"]
    assert lines[-2].split() == ["1", "0", "4"]
    assert lines[-1].split() == ["2", "3", "1"]
