"""Partial-volume fractions: the maths (_pve), the outputs, CLI, batch, BIDS, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from pve_phantom import pve_phantom

from segment import _pve, segment_array, segment_file
from segment.batch import read_summary
from segment.cli import cli
from segment.evaluate import evaluate_fraction_files, evaluate_fractions
from segment.exceptions import InputError, SegmentError
from segment.naming import bids_output_paths, plain_output_paths, pve_output_paths
from segment.partial_volume import estimate_fractions

MEANS = np.array([[0.3], [0.65], [1.0]])


def _model(sigma=0.03, weights=(0.3, 0.2, 0.2, 0.15, 0.15)):
    return _pve.PveModel(MEANS.copy(), np.full((3, 1, 1), sigma**2), np.array(weights))


# ------------------------------------------------------------------------------ the maths
def test_fractions_of_a_known_mixel_are_recovered():
    model = _model(sigma=0.005)
    f = np.array([0.25, 0.5, 0.8])
    gm_wm = f * 0.65 + (1 - f) * 1.0  # a fraction f of GM, 1 - f of WM, nearly noiseless
    csf_gm = f * 0.3 + (1 - f) * 0.65
    out = _pve.fractions(np.concatenate([gm_wm, csf_gm])[:, None], model)
    np.testing.assert_allclose(out[:3, 1], f, atol=0.03)
    np.testing.assert_allclose(out[:3, 2], 1 - f, atol=0.03)
    np.testing.assert_allclose(out[3:, 0], f, atol=0.03)
    np.testing.assert_allclose(out[3:, 1], 1 - f, atol=0.03)
    assert out[:3, 0].max() < 1e-3 and out[3:, 2].max() < 1e-3  # no third class


def test_fractions_sum_to_one_and_pure_voxels_are_one_hot(rng):
    model = _model()
    X = rng.uniform(0.0, 1.3, (5000, 1))
    out = _pve.fractions(X, model)
    assert out.dtype == np.float32 and out.shape == (5000, 3)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    pure = _pve.fractions(MEANS, _model(sigma=0.01))
    np.testing.assert_allclose(pure, np.eye(3), atol=0.02)
    far = _pve.fractions(np.array([[-0.5], [2.0]]), model)  # beyond the extreme classes
    np.testing.assert_allclose(far, [[1, 0, 0], [0, 0, 1]], atol=1e-6)


def test_fractions_are_chunk_invariant(rng):
    model = _model()
    X = rng.uniform(0.2, 1.1, (1003, 1))
    prior = _pve.mrf_log_prior(rng.dirichlet(np.ones(3), 1003))
    whole = _pve.fractions(X, model, prior)
    parts = np.concatenate(
        [_pve.fractions(X[s : s + 97], model, prior[s : s + 97]) for s in range(0, 1003, 97)]
    )
    np.testing.assert_array_equal(whole, parts)


def test_mrf_prior_favours_the_pair_the_posterior_holds():
    # a voxel half-way between CSF and WM means: alone, a CSF/GM mix or pure GM; with a
    # posterior that says GM/WM it leans towards WM
    X = np.array([[0.65]])
    plain = _pve.fractions(X, _model())
    prior = _pve.mrf_log_prior(np.array([[0.0, 0.5, 0.5]]))
    assert _pve.fractions(X, _model(), prior)[0, 0] < plain[0, 0]


def test_two_channel_model_and_two_classes(rng):
    means = np.array([[0.0, 1.0], [1.0, 0.0]])
    model = _pve.PveModel(means, np.tile(np.eye(2) * 1e-4, (2, 1, 1)), np.array([0.4, 0.4, 0.2]))
    X = np.array([[0.3, 0.7], [0.0, 1.0]])
    out = _pve.fractions(X, model)
    np.testing.assert_allclose(out, [[0.7, 0.3], [1.0, 0.0]], atol=0.03)


def test_fit_recovers_the_pure_means_from_a_pve_histogram(rng):
    n = 60_000
    kind = rng.choice(5, n, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    f = rng.uniform(0, 1, n)
    values = np.where(kind < 3, MEANS[np.minimum(kind, 2), 0], 0.0)
    values = np.where(kind == 3, f * 0.3 + (1 - f) * 0.65, values)
    values = np.where(kind == 4, f * 0.65 + (1 - f) * 1.0, values)
    values = values + rng.normal(0, 0.03, n)
    centres, counts = _pve.histogram_samples(values, 512, -0.1, 1.2)
    start = _pve.initial_model(MEANS + [[0.03], [-0.04], [0.03]], np.full((3, 1, 1), 0.004),
                               np.ones(3) / 3)  # fmt: skip
    model, trace = _pve.fit_pve_model(centres, counts, start, np.array([1e-6]))
    np.testing.assert_allclose(model.means[:, 0], MEANS[:, 0], atol=0.015)
    np.testing.assert_allclose(model.weights, [0.3, 0.25, 0.2, 0.15, 0.1], atol=0.03)
    assert trace[-1] >= trace[0]


# ------------------------------------------------------------------------------ phantom accuracy
@pytest.mark.parametrize(
    ("noise", "mae_target", "volume_target"), [(0.03, 0.06, 0.05), (0.09, 0.12, 0.10)]
)
def test_phantom_fraction_error_and_volumes(noise, mae_target, volume_target):
    image, truth, mask = pve_phantom(noise=noise)
    result = segment_array(image, mask, n_components=3, pve=True, mrf_beta=0.2)
    fractions = result.fractions[mask]
    mae = np.abs(fractions - truth[mask]).mean(0)
    volume_error = result.fraction_volumes() / (truth[mask].sum(0) * 1e-3) - 1
    assert mae.max() <= mae_target, mae
    assert np.abs(volume_error).max() <= volume_target, volume_error
    # the posteriors read as fractions are worse on volumes (GM at 3 %: +13 %)
    posterior_error = result.soft_counts / truth[mask].sum(0) - 1
    assert np.abs(volume_error).max() < np.abs(posterior_error).max()


def test_phantom_with_a_bias_field():
    image, truth, mask = pve_phantom(noise=0.03, field=0.2)
    result = segment_array(image, mask, n_components=3, pve=True, bias_field=True)
    mae = np.abs(result.fractions[mask] - truth[mask]).mean(0)
    volume_error = result.fraction_volumes() / (truth[mask].sum(0) * 1e-3) - 1
    assert mae.max() <= 0.06, mae
    assert np.abs(volume_error).max() <= 0.05, volume_error


def test_estimate_fractions_uses_the_bias_corrected_intensities():
    image, _, mask = pve_phantom(shape=(20, 22, 18), noise=0.03)
    result = segment_array(image, mask, n_components=3, pve=True)

    class Scaled:  # the same fit, but the image twice as bright under a field of 2
        def __getattr__(self, name):
            return getattr(result.estimator, name)

        bias_field_shape_ = image.shape + (1,)

        def bias_field_last_axis_slabs(self, step):
            for start in range(0, image.shape[-1], step):
                yield [np.full(image[..., start : start + step].shape, 2.0, np.float32)]

    doubled, _, _ = estimate_fractions(Scaled(), [image * 2], mask)
    np.testing.assert_allclose(doubled, result.flat_fractions, atol=1e-5)


def test_outside_the_mask_is_zero_and_k1_is_refused():
    image, _, mask = pve_phantom(shape=(16, 18, 14))
    result = segment_array(image, mask, n_components=2, pve=True)
    assert result.fractions.shape == mask.shape + (2,)
    assert not result.fractions[~mask].any()
    np.testing.assert_allclose(result.fractions[mask].sum(-1), 1, atol=1e-5)
    with pytest.raises(SegmentError, match="pve needs at least 2 classes"):
        segment_array(image, mask, n_components=1, pve=True)
    with pytest.raises(SegmentError, match="pve must be true or false"):
        segment_array(image, mask, n_components=2, pve="yes")


# ------------------------------------------------------------------------------ outputs
@pytest.fixture
def phantom_files(tmp_path):
    image, truth, mask = pve_phantom(shape=(24, 26, 20), noise=0.03)
    affine = np.diag([1.5, 1.0, 1.2, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    paths = {}
    for name, data in (("scan", image), ("mask", mask.astype(np.uint8)), ("truth", truth)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    return paths, affine


def test_segment_file_writes_the_pve_map_and_volumes(phantom_files, tmp_path):
    paths, affine = phantom_files
    out = tmp_path / "out"
    result = segment_file(paths["scan"], out, mask=paths["mask"], n_components=3, pve=True)
    pve = nib.load(out / "scan_pve.nii.gz")
    assert pve.shape == (24, 26, 20, 3) and pve.get_data_dtype() == np.float32
    np.testing.assert_allclose(pve.affine, affine)
    assert pve.header.get_zooms()[:3] == (1.5, 1.0, 1.2)
    data = pve.get_fdata()
    mask = nib.load(paths["mask"]).get_fdata() > 0
    np.testing.assert_allclose(data[mask].sum(-1), 1, atol=1e-5)
    assert not data[~mask].any()
    record = json.loads((out / "scan_segment.json").read_text())
    assert record["outputs"]["pve"] == "scan_pve.nii.gz"
    assert record["volumes"]["estimate"] == "fractions" and record["volumes"]["unit"] == "mL"
    voxel_ml = 1.5 * 1.2 / 1000
    np.testing.assert_allclose(
        record["volumes"]["volume_ml"], data[mask].sum(0) * voxel_ml, atol=5e-4
    )  # fmt: skip (rounded to 0.001 mL)
    assert record["labels"][1]["fraction_volume_ml"] == record["volumes"]["volume_ml"][1]
    assert record["partial_volume"]["mixed_weights"].keys() == {"1-2", "2-3"}
    assert result.written[-1].name == "scan_segment.json"
    # without --pve the volumes say they are posteriors
    plain = segment_file(paths["scan"], tmp_path / "plain", n_components=3)
    record = json.loads((tmp_path / "plain" / "scan_segment.json").read_text())
    assert record["volumes"]["estimate"] == "posteriors" and plain.flat_fractions is None
    assert not (tmp_path / "plain" / "scan_pve.nii.gz").exists()


def test_existing_pve_output_needs_overwrite(phantom_files, tmp_path):
    paths, _ = phantom_files
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scan_pve.nii.gz").write_text("old")
    with pytest.raises(InputError, match="scan_pve.nii.gz.*exists; pass --overwrite"):
        segment_file(paths["scan"], tmp_path / "out", n_components=3, pve=True)
    assert not (tmp_path / "out" / "scan_dseg.nii.gz").exists()


def test_2d_image_writes_a_tiff_stack(make_image, tmp_path):
    image, _, _ = pve_phantom(shape=(40, 44, 3), noise=0.02)
    picture = make_image((np.clip(image[..., 1], 0, 1.2) * 200).astype(np.uint8), "slice.png")
    segment_file(picture, tmp_path / "out", n_components=3, pve=True)
    import tifffile

    pages = tifffile.imread(tmp_path / "out" / "slice_pve.tif")
    assert pages.shape == (3, 40, 44) and pages.dtype == np.float32
    np.testing.assert_allclose(pages.sum(0), 1, atol=1e-5)


def test_pve_output_names():
    plain = plain_output_paths("d/scan.nii.gz", "o", kind="nifti")
    assert pve_output_paths(plain, 3) == [Path("o/scan_pve.nii.gz")]
    image = plain_output_paths("d/photo.png", "o", kind="image")
    assert pve_output_paths(image, 3) == [Path("o/photo_pve.tif")]
    bids = bids_output_paths("sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz", "d", desc="x")
    names = [p.name for p in pve_output_paths(bids, 3, ["csf", "grey matter", "white matter"])]
    assert names == [f"sub-01_ses-1_run-2_label-{t}_desc-x_probseg.nii.gz"
                     for t in ("CSF", "GM", "WM")]  # fmt: skip
    generic = [p.name for p in pve_output_paths(bids_output_paths("sub-01_T1w.nii", "d"), 2)]
    assert generic == ["sub-01_label-CLASS1_probseg.nii.gz", "sub-01_label-CLASS2_probseg.nii.gz"]


# ------------------------------------------------------------------------------ CLI and batch
def test_cli_run_pve_and_usage_errors(phantom_files, tmp_path):
    paths, _ = phantom_files
    runner = CliRunner()
    args = ["run", str(paths["scan"]), "-o", str(tmp_path / "o"), "-k", "3", "--pve", "-q"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "o" / "scan_pve.nii.gz") in result.output
    bad = runner.invoke(cli, ["run", str(paths["scan"]), "-o", str(tmp_path / "b"), "-k", "1",
                              "--pve"])  # fmt: skip
    assert bad.exit_code == 2 and "--pve needs at least 2 classes" in bad.output
    assert not (tmp_path / "b").exists()


def test_pipeline_pve_key(tmp_path, phantom_files):
    paths, _ = phantom_files
    toml = tmp_path / "mine.toml"
    toml.write_text('description = "pve"\n[model]\nn_components = 1\npve = true\n')
    bad = CliRunner().invoke(cli, ["run", str(paths["scan"]), "-o", str(tmp_path / "o"),
                                   "--pipeline", str(toml)])  # fmt: skip
    assert bad.exit_code == 2 and "pve needs at least 2 classes" in bad.output
    toml.write_text('description = "pve"\n[model]\nn_components = 3\npve = "yes"\n')
    bad = CliRunner().invoke(cli, ["run", str(paths["scan"]), "-o", str(tmp_path / "o"),
                                   "--pipeline", str(toml)])  # fmt: skip
    assert bad.exit_code != 0 and "pve" in bad.output
    toml.write_text('description = "pve"\n[model]\nn_components = 3\npve = true\n')
    ok = CliRunner().invoke(cli, ["run", str(paths["scan"]), "-o", str(tmp_path / "o"),
                                  "--pipeline", str(toml), "-q"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "o" / "scan_pve.nii.gz").exists()


def test_batch_pve_columns_and_resume(phantom_files, tmp_path):
    paths, _ = phantom_files
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(paths["scan"].read_bytes())
    out = tmp_path / "out"
    base = ["batch", str(folder), "-o", str(out), "-k", "3", "--scheduler", "synchronous", "-q"]
    first = CliRunner().invoke(cli, base)
    assert first.exit_code == 0, first.output
    row = read_summary(out / "batch_summary.tsv")[0]
    assert row["volume_estimate"] == "posteriors" and float(row["volume_ml_3"]) > 0
    # a sidecar written before the pve option existed counts as pve = false: still complete
    record = json.loads((out / "a_segment.json").read_text())
    del record["final_options"]["pve"]
    (out / "a_segment.json").write_text(json.dumps(record))
    assert CliRunner().invoke(cli, base).exit_code == 0
    assert read_summary(out / "batch_summary.tsv")[0]["status"] == "skipped"
    # --pve: the fraction map is missing, so the scan is redone
    redo = CliRunner().invoke(cli, [*base, "--pve"])
    assert redo.exit_code == 0, redo.output
    row = read_summary(out / "batch_summary.tsv")[0]
    assert row["status"] == "ok" and row["volume_estimate"] == "fractions"
    record = json.loads((out / "a_segment.json").read_text())
    assert float(row["volume_ml_2"]) == pytest.approx(record["volumes"]["volume_ml"][1], rel=1e-5)
    assert (out / "a_pve.nii.gz").exists()
    again = CliRunner().invoke(cli, [*base, "--pve"])  # complete: skipped
    assert again.exit_code == 0
    assert read_summary(out / "batch_summary.tsv")[0]["status"] == "skipped"
    # pve is part of the resume key: outputs made with it are not taken for a run without
    changed = CliRunner().invoke(cli, base)
    assert changed.exit_code == 1
    assert "pve=True, now False" in read_summary(out / "batch_summary.tsv")[0]["error"]


def test_batch_bids_names_fractions_by_tissue(phantom_files, tmp_path):
    paths, _ = phantom_files
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(paths["scan"].read_bytes())
    args = ["batch", str(root), "--bids", "--pipeline", "t1-brain-3class", "--mask", "none",
            "--pve", "--scheduler", "synchronous", "-q", "--max-iter", "40"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    anat = root / "derivatives" / "segment" / "sub-01" / "anat"
    for tissue in ("CSF", "GM", "WM"):
        image = nib.load(anat / f"sub-01_label-{tissue}_desc-t1brain3class_probseg.nii.gz")
        assert image.shape == (24, 26, 20)
    record = json.loads((anat / "sub-01_desc-t1brain3class_dseg.json").read_text())
    assert record["outputs"]["pve_2"] == "sub-01_label-GM_desc-t1brain3class_probseg.nii.gz"


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_fractions_maths():
    reference = np.zeros((2, 2, 1, 2))
    reference[..., 0] = [[[1.0], [0.5]], [[0.0], [0.0]]]
    reference[..., 1] = [[[0.0], [0.5]], [[1.0], [0.0]]]  # last voxel outside: both 0
    predicted = reference.copy()
    predicted[0, 1, 0] = [0.7, 0.3]
    result = evaluate_fractions(predicted, reference, voxel_volume_ml=1.0)
    assert result["n_voxels"] == 3
    assert [c["fraction_mae"] for c in result["classes"]] == pytest.approx([0.2 / 3, 0.2 / 3])
    assert result["classes"][0]["volume_error_percent"] == pytest.approx(100 * 0.2 / 1.5)


def test_cli_evaluate_reference_fractions(phantom_files, tmp_path):
    paths, affine = phantom_files
    segment_file(paths["scan"], tmp_path / "o", mask=paths["mask"], n_components=3, pve=True)
    predicted = tmp_path / "o" / "scan_pve.nii.gz"
    truth = (
        nib.load(paths["truth"]).get_fdata() * (nib.load(paths["mask"]).get_fdata() > 0)[..., None]
    )
    nib.save(nib.Nifti1Image(truth.astype(np.float32), affine), tmp_path / "ref.nii.gz")
    result = CliRunner().invoke(cli, ["evaluate", str(predicted), "--reference-fractions",
                                      str(tmp_path / "ref.nii.gz")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fraction MAE" in result.output and "volume error" in result.output
    numbers = evaluate_fraction_files(predicted, tmp_path / "ref.nii.gz")
    assert max(c["fraction_mae"] for c in numbers["classes"]) < 0.06
    assert max(abs(c["volume_error_percent"]) for c in numbers["classes"]) < 5
    both = CliRunner().invoke(cli, ["evaluate", str(predicted)])
    assert both.exit_code == 2 and "--reference-fractions" in both.output


@pytest.mark.parametrize(
    ("data", "affine_scale", "message"),
    [
        (np.full((24, 26, 20, 3), 1 / 3), 2.0, "grid differs from the prediction"),
        (np.full((24, 26, 19, 3), 1 / 3), 1.0, r"grid \(24, 26, 19\) differs"),
        (np.full((24, 26, 20, 2), 0.5), 1.0, "has 2 classes but the prediction"),
        (np.full((24, 26, 20, 3), 1.5), 1.0, r"outside \[0, 1\]"),
        (np.full((24, 26, 20), 0.5), 1.0, "expected a 4-D fraction map"),
    ],
)
def test_bad_reference_fractions(phantom_files, tmp_path, data, affine_scale, message):
    paths, affine = phantom_files
    segment_file(paths["scan"], tmp_path / "o", n_components=3, pve=True, qc=False)
    bad = tmp_path / "bad.nii.gz"
    scaled = affine.copy()
    scaled[:3, :3] *= affine_scale
    nib.save(nib.Nifti1Image(data.astype(np.float32), scaled), bad)
    with pytest.raises(InputError, match=message) as caught:
        evaluate_fraction_files(tmp_path / "o" / "scan_pve.nii.gz", bad)
    assert str(bad) in str(caught.value)
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "o" / "scan_pve.nii.gz"),
                                      "--reference-fractions", str(bad)])  # fmt: skip
    assert result.exit_code == 1 and str(bad) in result.output


def test_lookup_table_matches_the_direct_fractions(rng):
    model = _model()
    X = rng.uniform(0.1, 1.2, (4000, 1))
    prior = _pve.mrf_log_prior(rng.dirichlet(np.ones(3), 4000))
    table = _pve.tabulate(model, 0.1, 1.2)
    for log_prior in (None, prior):
        direct = _pve.fractions(X, model, log_prior)
        looked_up = _pve.fractions_from_table(X[:, 0], table, log_prior)
        np.testing.assert_allclose(looked_up, direct, atol=2e-4)


def test_class_by_class_lookup_with_the_mrf_prior_is_the_log_prior_lookup(rng):
    """The fast lookup (prior after the exp, (C, N) layout) gives the reference's numbers."""
    model = _model()
    x = rng.uniform(-0.2, 1.5, 5000)  # beyond the table on both sides: clipped
    posterior = rng.dirichlet(np.ones(3), 5000)
    posterior[:50] = np.eye(3)[rng.integers(0, 3, 50)]  # classes the neighbourhood rules out
    table = _pve.tabulate(model, 0.1, 1.2)
    for q in (None, posterior, posterior.astype(np.float32)):
        log_prior = None if q is None else _pve.mrf_log_prior(q)
        reference = _pve.fractions_from_table(x, table, log_prior)
        fast = _pve.fractions_from_table_mrf(x, table, q)
        assert fast.dtype == np.float32 and fast.shape == (5000, 3) and fast.flags.c_contiguous
        np.testing.assert_allclose(fast, reference, atol=1e-6)
        np.testing.assert_allclose(fast.sum(1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("step", [1, 3, 5, 17])
def test_slab_ranks_are_the_flatten_order(rng, step):
    from segment import masking
    from segment.partial_volume import slab_ranks

    mask = rng.random((7, 8, 9)) < 0.4
    values = np.arange(mask.size).reshape(mask.shape)
    flat = masking.flatten(values, mask)[:, 0]
    for start, inside, ranks in slab_ranks(mask, step):
        np.testing.assert_array_equal(flat[ranks], values[..., start : start + step][inside])
    assert sum(len(r) for *_, r in slab_ranks(mask, step)) == mask.sum()


def _dense_fractions(result, image, posterior=None):
    """The fractions computed the simple way, on the whole (N, 1) features at once."""
    from segment import partial_volume

    field = result.bias_field if result.estimator.bias_field_shape_ is not None else None
    X = partial_volume.corrected_features([image], result.mask, field)
    model, _ = partial_volume.fit_model(X, result.estimator)
    table = _pve.tabulate(model, float(X.min()), float(X.max()))
    prior = None if posterior is None else _pve.mrf_log_prior(posterior)
    return _pve.fractions_from_table(X[:, 0], table, prior)


@pytest.mark.parametrize(
    "options",
    [{"bias_field": True}, {"mrf_beta": 0.2}, {"mrf_beta": 0.2, "bias_field": True}],
    ids=["bias", "mrf", "mrf-bias"],
)
def test_fractions_do_not_depend_on_the_slab_size(options, monkeypatch):
    """Tiny slabs (and a posterior too big to keep) give the fractions and volumes of big ones."""
    import segment.io
    from segment.spatial.model import bounding_box

    image, _, mask = pve_phantom(shape=(20, 22, 19), noise=0.03, field=0.1)
    options = dict(n_components=3, pve=True, **options)
    big = segment_array(image, mask, **options)
    big_fractions, big_volumes = big.fractions, big.fraction_volumes()
    monkeypatch.setattr(segment.io, "SLAB_BYTES", 4 * 2 * 60 * 3)  # 1 plane, then 2, unequal
    limit = None
    if options.get("mrf_beta"):  # the MRF posterior streamed too: recomputed per slab
        box = int(np.prod([s.stop - s.start for s in bounding_box(mask)]))
        limit = box * 3 * 4 * 3 - 1
    small = segment_array(image, mask, memory_limit=limit, **options)
    if limit is not None:
        assert small.flat_responsibilities is None and big.flat_responsibilities is not None
    np.testing.assert_allclose(small.fraction_volumes(), big_volumes, rtol=1e-9)
    np.testing.assert_allclose(small.fractions, big_fractions, atol=1e-6)
    assert small.pve_record == big.pve_record
    # and both are the fractions computed on the whole features at once
    posterior = big.flat_responsibilities if options.get("mrf_beta") else None
    dense = _dense_fractions(big, image, posterior)
    np.testing.assert_allclose(big.flat_fractions, dense, atol=1e-6)
    np.testing.assert_allclose(big_volumes, dense.sum(0, dtype=np.float64) * 1e-3, rtol=1e-6)


def test_written_pve_map_is_streamed_and_equals_the_fractions(phantom_files, tmp_path, monkeypatch):
    import segment.io

    paths, _ = phantom_files
    monkeypatch.setattr(segment.io, "SLAB_BYTES", 24 * 26 * 4 * 3)  # 3 planes per slab
    result = segment_file(paths["scan"], tmp_path / "out", mask=paths["mask"], n_components=3,
                          pve=True, mrf_beta=0.2)  # fmt: skip
    written = nib.load(tmp_path / "out" / "scan_pve.nii.gz").get_fdata()
    np.testing.assert_allclose(written, result.fractions, atol=1e-7)
    record = json.loads((tmp_path / "out" / "scan_segment.json").read_text())
    voxel_ml = 1.5 * 1.2 / 1000
    mask = nib.load(paths["mask"]).get_fdata() > 0
    np.testing.assert_allclose(
        record["volumes"]["volume_ml"], written[mask].sum(0) * voxel_ml, atol=5e-4
    )


def test_two_channel_fractions_do_not_depend_on_the_slab_size(monkeypatch):
    import segment.io

    image, _, mask = pve_phantom(shape=(18, 20, 17), noise=0.03)
    noise = np.random.default_rng(1).normal(0, 0.03, image.shape)
    channels = np.stack([image, 1.3 - image + noise], axis=-1)
    big = segment_array(channels, mask, channel_axis=-1, n_components=3, pve=True)
    monkeypatch.setattr(segment.io, "SLAB_BYTES", 4 * 18 * 20 * 2)  # 2 planes per slab
    small = segment_array(channels, mask, channel_axis=-1, n_components=3, pve=True)
    np.testing.assert_allclose(small.fractions, big.fractions, atol=1e-6)
    np.testing.assert_allclose(small.fraction_volumes(), big.fraction_volumes(), rtol=1e-9)
    assert small.pve_record == big.pve_record


def test_segment_array_fractions_do_not_follow_later_changes_of_the_input():
    """The fractions are computed when read: from a private copy, not the caller's array."""
    image, _, mask = pve_phantom(shape=(16, 18, 15), noise=0.03, field=0.0)
    result = segment_array(image, mask, n_components=3, pve=True)
    fractions, volumes = result.fractions.copy(), result.fraction_volumes()
    image *= 0.5
    image[mask] += 100.0
    np.testing.assert_array_equal(result.fractions, fractions)
    np.testing.assert_allclose(result.fraction_volumes(), volumes, rtol=1e-12)


def test_a_class_of_weight_zero_gives_finite_table_fractions():
    """A mixed class of weight 0: the table lookups stay finite and match the exact model."""
    model = _pve.PveModel(
        means=np.array([[0.0], [1.0], [2.0]]),
        covariances=np.full((3, 1, 1), 0.01),
        weights=np.array([0.4, 0.3, 0.3, 0.0, 0.0]),
    )
    x = np.linspace(-0.5, 2.5, 301)
    table = _pve.tabulate(model, float(x.min()), float(x.max()))
    posterior = np.full((x.size, 3), 1 / 3, np.float32)
    exact = _pve.fractions(x[:, None], model)
    looked_up = _pve.fractions_from_table(x, table)
    with_prior = _pve.fractions_from_table_mrf(x, table, posterior)
    assert np.isfinite(looked_up).all() and np.isfinite(with_prior).all()
    np.testing.assert_allclose(looked_up, exact, atol=1e-3)
    np.testing.assert_allclose(with_prior.sum(1), 1.0, atol=1e-5)
