"""segment.sidecar: the JSON record of a run, its rounding and its volumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from segment import GaussianMixtureEM, __version__
from segment.sidecar import (
    build_sidecar,
    dumps,
    file_sha256,
    label_volumes,
    missing_outputs,
    model_record,
    name_labels,
    round_ml,
    round_significant,
    tissue_volumes,
)


@pytest.mark.parametrize("size", [0, 1, 7, 64, 65, 1000])
def test_file_sha256_reads_in_blocks(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_sha256(path, block_size=64) == hashlib.sha256(data).hexdigest()


def test_rounding():
    assert round_ml(553.9250000000001) == 553.925
    assert round_ml(np.float32(0.0004)) == 0.0 and isinstance(round_ml(np.float64(2)), float)
    assert round_significant(0.0010000000000000002) == 0.001
    assert round_significant(123456789.0, 3) == 1.23e8


def test_label_volumes_hard_soft_and_fractions():
    labels = np.zeros((4, 5, 6), np.uint8)  # 120 voxels: 0 outside, then 1, 2, 3
    labels[0] = 1  # 30 voxels
    labels[1:3] = 2  # 60
    labels[3, :2] = 3  # 12
    soft = np.array([29.5, 60.25, 12.0])
    voxel_ml = 0.001 * 1.1  # 1.1 mm^3
    rows = label_volumes(labels, soft, voxel_ml, fraction_volumes=np.array([0.1, 0.0665, 0.0]))
    assert [row["label"] for row in rows] == [1, 2, 3]
    assert [row["n_voxels"] for row in rows] == [30, 60, 12]
    assert [row["volume_ml"] for row in rows] == [0.033, 0.066, 0.013]  # 0.0132 rounded
    assert [row["soft_volume_ml"] for row in rows] == [0.032, 0.066, 0.013]
    assert [row["fraction_volume_ml"] for row in rows] == [0.1, 0.067, 0.0]  # 0.0665 half-even
    assert "fraction_volume_ml" not in label_volumes(labels, soft, voxel_ml)[0]


def test_label_volumes_counts_a_label_without_voxels():
    rows = label_volumes(np.array([[1, 1], [0, 0]], np.uint8), np.array([2.0, 0.0]), 1.0)
    assert [(r["n_voxels"], r["volume_ml"]) for r in rows] == [(2, 2.0), (0, 0.0)]


@pytest.mark.parametrize("fractions", [False, True])
def test_tissue_volumes_says_which_estimate(fractions):
    rows = [{"soft_volume_ml": 1.5, "fraction_volume_ml": 1.25},
            {"soft_volume_ml": 2.0, "fraction_volume_ml": 2.25}]  # fmt: skip
    record = tissue_volumes(rows, fractions)
    assert record["unit"] == "mL"
    assert record["estimate"] == ("fractions" if fractions else "posteriors")
    assert record["volume_ml"] == ([1.25, 2.25] if fractions else [1.5, 2.0])
    assert record["description"].startswith("sum over voxels of each label")
    assert ("posterior probability" in record["description"]) != fractions


def test_name_labels():
    record = {"labels": [{"label": 1}, {"label": 2}]}
    assert name_labels(record, ["csf", "gm"]) is record
    assert [row["name"] for row in record["labels"]] == ["csf", "gm"]
    assert list(record["label_names"]) == ["0", "1", "2"]
    assert record["label_names"]["1"] == "csf" and record["label_names"]["0"]


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(100, 5, 300), rng.normal(300, 8, 200)])[:, None]
    return GaussianMixtureEM(2, random_state=0, max_iter=50).fit(X)


def test_model_record_of_a_fit(fitted):
    record = model_record(fitted)
    assert record["n_components"] == 2 and record["n_channels"] == 1
    np.testing.assert_allclose(np.ravel(record["means"]), [100, 300], rtol=0.03)
    assert np.shape(record["covariances"]) == (2, 1, 1) and np.shape(record["variances"]) == (2, 1)
    assert sum(record["weights"]) == pytest.approx(1.0)
    assert record["n_iter"] == len(record["log_likelihood_trace"]) == fitted.n_iter_
    assert record["log_likelihood"] == record["log_likelihood_trace"][-1]
    assert record["log_likelihood_per_voxel"] == pytest.approx(record["log_likelihood"] / 500)
    assert record["n_voxels_fitted"] == 500.0 and record["seed"] == 0
    assert record["bias_field"] is None and record["mrf_beta"] == 0.0
    json.dumps(record)  # plain Python values only


def test_build_sidecar_schema_and_rounding(fitted, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not really a scan")
    labels = np.array([[1, 1, 2], [2, 2, 0]], np.uint8)
    record = build_sidecar(
        estimator=fitted, labels=labels, soft_counts=np.array([2.2, 2.8]),
        voxel_volume_ml=0.0010000000000000002, inputs=[scan], options={"n_components": 2},
        mask={"spec": "none"}, timings={"fit_s": 0.123456789}, outputs={"dseg": "x"},
        command_line=["segment", "run"],
    )  # fmt: skip
    assert list(record) == ["software", "command_line", "inputs", "options", "mask", "model",
                            "labels", "volumes", "partial_volume", "voxel_volume_ml",
                            "timings_s", "outputs"]  # fmt: skip
    assert record["software"]["name"] == "segment" and record["software"]["version"] == __version__
    assert record["inputs"] == [{"path": str(scan), "sha256": file_sha256(scan)}]
    assert record["voxel_volume_ml"] == 0.001 and record["timings_s"] == {"fit_s": 0.1235}
    assert [row["volume_ml"] for row in record["labels"]] == [0.002, 0.003]
    assert record["volumes"]["estimate"] == "posteriors"
    assert record["volumes"]["volume_ml"] == [0.002, 0.003]  # 0.0022, 0.0028 rounded
    assert "model_selection" not in record
    selection = {"criterion": "BIC", "n_components": 2}
    with_selection = build_sidecar(
        estimator=fitted, labels=labels, soft_counts=np.array([2.2, 2.8]), voxel_volume_ml=1e-3,
        inputs=[], options={}, mask={}, timings={}, outputs={}, command_line=[],
        fraction_volumes=np.array([0.0021, 0.0029]), model_selection=selection,
    )  # fmt: skip
    assert with_selection["model_selection"] == selection
    assert with_selection["volumes"]["estimate"] == "fractions"
    assert with_selection["volumes"]["volume_ml"] == [0.002, 0.003]


def test_dumps_converts_numpy_and_paths():
    text = dumps({"a": np.float32(1.5), "b": np.arange(3), "c": Path("x/y"), "d": np.int64(4)})
    assert text.endswith("}\n")
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "c": "x/y", "d": 4}
    with pytest.raises(TypeError, match="cannot serialise set"):
        dumps({"bad": {1, 2}})


def test_missing_outputs(tmp_path):
    sidecar = tmp_path / "scan_segment.json"
    assert missing_outputs(sidecar) == [sidecar]  # no sidecar: the set is incomplete
    (tmp_path / "scan_dseg.nii.gz").write_bytes(b"x")
    sidecar.write_text(json.dumps({"outputs": {"dseg": "scan_dseg.nii.gz",
                                               "qc": "scan_qc.png"}}))  # fmt: skip
    assert missing_outputs(sidecar) == [tmp_path / "scan_qc.png"]
    (tmp_path / "scan_qc.png").write_bytes(b"x")
    assert missing_outputs(sidecar) == []
    sidecar.write_text("{not json")
    assert missing_outputs(sidecar) == [sidecar]
