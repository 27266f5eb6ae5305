"""pv_fit: tissue Gaussians from the mixed-voxel model (the maths, the estimator, CLI, sidecar)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from pve_phantom import pve_phantom

from segment import GaussianMixtureEM, SpatialGaussianMixture, _pve, segment_array
from segment.cli import cli
from segment.exceptions import DataWarning, SegmentError
from segment.partial_volume import fit_tissues

MEANS = np.array([[0.3], [0.65], [1.0]])


def _mixel_sample(rng, n, sigma=0.03, weights=(0.3, 0.25, 0.2, 0.15, 0.1)):
    """Intensities of pure voxels and of CSF/GM and GM/WM mixels (uniform fractions), and each
    voxel's crisp tissue (its largest fraction)."""
    kind = rng.choice(5, n, p=weights)
    f = rng.uniform(0, 1, n)
    values = MEANS[np.minimum(kind, 2), 0]
    values = np.where(kind == 3, f * 0.3 + (1 - f) * 0.65, values)
    values = np.where(kind == 4, f * 0.65 + (1 - f) * 1.0, values)
    tissue = np.minimum(kind, 2)
    tissue = np.where(kind == 3, np.where(f > 0.5, 0, 1), tissue)
    tissue = np.where(kind == 4, np.where(f > 0.5, 1, 2), tissue)
    return values + rng.normal(0, sigma, n), tissue


def test_tissue_moments_are_those_of_each_tissues_voxels(rng):
    """Under the model itself, the moments of the voxels a tissue owns (Monte Carlo)."""
    model = _pve.PveModel(MEANS.copy(), np.full((3, 1, 1), 0.03**2),
                          np.array([0.3, 0.25, 0.2, 0.15, 0.1]), n_steps=20)  # fmt: skip
    grid = _pve.fraction_grid(20)
    n = 400_000
    kind = rng.choice(5, n, p=model.weights)
    f = grid[rng.integers(0, 20, n)]  # the model's mixels sit on its fraction grid
    lower = np.where(kind == 4, 1, 0)  # CSF/GM mixels (3) and GM/WM mixels (4)
    mean = np.where(kind < 3, MEANS[np.minimum(kind, 2), 0], f * MEANS[lower, 0]
                    + (1 - f) * MEANS[lower + 1, 0])  # fmt: skip
    values = mean + rng.normal(0, 0.03, n)
    owner = np.where(kind < 3, np.minimum(kind, 2), np.where(f > 0.5, lower, lower + 1))
    weights, means, covariances = _pve.tissue_moments(model)
    for k in range(3):
        mine = values[owner == k]
        assert weights[k] == pytest.approx(len(mine) / n, abs=0.003)
        assert means[k, 0] == pytest.approx(mine.mean(), abs=0.002)
        assert np.sqrt(covariances[k, 0, 0]) == pytest.approx(mine.std(), rel=0.02)


def test_the_one_channel_fit_is_the_general_fit(rng):
    values, _ = _mixel_sample(rng, 20_000)
    centres, counts = _pve.histogram_samples(values, 256, -0.1, 1.2)
    start = _pve.initial_model(MEANS + 0.02, np.full((3, 1, 1), 0.004), np.ones(3) / 3)
    fast, fast_trace = _pve.fit_pve_model(centres, counts, start, np.array([1e-6]), max_iter=40)
    slow, slow_trace = _pve._fit_pve_model_general(centres, counts, start, np.array([1e-6]),
                                                   40, 1e-6)  # fmt: skip
    np.testing.assert_allclose(fast_trace, slow_trace, rtol=1e-10)
    for a, b in zip(
        (fast.means, fast.covariances, fast.weights), (slow.means, slow.covariances, slow.weights)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_fit_tissues_moves_the_boundaries_to_the_largest_fraction(rng):
    """The ML 3-Gaussian fit lets the mixels widen a class and move its boundary; the tissue
    Gaussians label the voxels by their largest fraction more often."""
    values, tissue = _mixel_sample(rng, 100_000, weights=(0.15, 0.25, 0.25, 0.2, 0.15))
    plain = GaussianMixtureEM(n_components=3, random_state=0).fit(values)
    fitted = GaussianMixtureEM(n_components=3, random_state=0, pv_fit=True).fit(values)
    plain_right = (plain.predict(values) == tissue).mean()
    fitted_right = (fitted.predict(values) == tissue).mean()
    assert fitted_right > plain_right + 0.01, (plain_right, fitted_right)
    # the tissue means are near the moments of each tissue's voxels
    truth = np.array([values[tissue == k].mean() for k in range(3)])
    assert np.abs(fitted.means_[:, 0] - truth).max() < np.abs(plain.means_[:, 0] - truth).max()
    assert np.abs(fitted.means_[:, 0] - truth).max() < 0.02
    np.testing.assert_allclose(fitted.weights_.sum(), 1)
    np.testing.assert_allclose(fitted.soft_counts_.sum(), len(values), rtol=1e-9)
    assert fitted.pv_model_.n_classes == 3 and fitted.pv_trace_[-1] >= fitted.pv_trace_[0]
    assert plain.pv_model_ is None


def test_fit_tissues_keeps_the_input_order():
    means = np.array([[1.0], [0.3], [0.65]])
    covariances = np.full((3, 1, 1), 0.004)
    values = np.linspace(0.1, 1.2, 500)[:, None]
    model, _, (w, mu, _) = fit_tissues(values, None, np.ones(3) / 3, means, covariances, [1e-6])
    assert np.all(np.diff(model.means[:, 0]) > 0)
    assert np.argmax(mu[:, 0]) == 0 and np.argmin(mu[:, 0]) == 1


def test_pv_fit_on_the_phantom_is_chunk_and_scheduler_invariant():
    image, truth, mask = pve_phantom(shape=(26, 28, 24), noise=0.05, field=0.2)
    crisp = truth.argmax(-1) + 1
    runs = [
        segment_array(
            image, mask, n_components=3, pv_fit=True, bias_field=True, mrf_beta=0.2, **options
        )  # fmt: skip
        for options in ({}, {"chunk_size": 1000, "scheduler": "synchronous"})
    ]
    np.testing.assert_allclose(runs[0].estimator.means_, runs[1].estimator.means_, rtol=1e-6)
    assert (runs[0].labels != runs[1].labels).mean() < 1e-4
    plain = segment_array(image, mask, n_components=3, bias_field=True, mrf_beta=0.2)
    agree = (runs[0].labels[mask] == crisp[mask]).mean()
    assert agree >= (plain.labels[mask] == crisp[mask]).mean() - 0.005
    assert agree > 0.9


def test_parameter_checks():
    with pytest.raises(SegmentError, match="pv_fit needs at least 2 classes"):
        GaussianMixtureEM(n_components=1, pv_fit=True).fit(np.arange(10.0))
    with pytest.raises(SegmentError, match="pv_fit must be True or False"):
        SpatialGaussianMixture(n_components=2, pv_fit="yes").fit(np.arange(10.0))


@pytest.fixture
def phantom_file(tmp_path):
    image, _, mask = pve_phantom(shape=(24, 26, 20), noise=0.03)
    path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), mask_path)
    return path, mask_path


def test_cli_pv_fit_records_the_model_and_reuses_it_for_pve(phantom_file, tmp_path):
    path, mask_path = phantom_file
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(path), "--mask", str(mask_path), "-k", "3",
                                      "--pv-fit", "--pve", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out / "brain_segment.json").read_text())
    assert sidecar["options"]["pv_fit"] is True
    record = sidecar["model"]["pv_fit"]
    assert record.pop("status") == "applied"
    assert len(record["means"]) == 3 and record["n_iter"] >= 1
    assert record == sidecar["partial_volume"]  # --pve reads the same model
    means = [row[0] for row in record["means"]]
    assert means == sorted(means)
    usage = CliRunner().invoke(cli, ["run", str(path), "-k", "1", "--pv-fit", "-o", str(out)])
    assert usage.exit_code == 2 and "--pv-fit needs at least 2 classes" in usage.output


def test_a_class_widened_over_the_mixed_voxels_does_not_trap_the_fit():
    """Recorded from the brain preset at 30 mm on the noise-free partial-volume phantom with a
    40 % field (benchmarks/realistic.py pv-n0-f40): the histogram of the corrected intensities
    and the mixture EM handed over, whose CSF class spans the CSF/GM mixels (sd 0.24). From
    that start alone the model keeps the broad class; the second start finds the phantom's
    pure intensities (0.3 / 0.65 / 1.0) and its mixels."""
    with np.load(Path(__file__).parent / "data" / "pv_fit_trap.npz") as z:
        case = {name: z[name].astype(np.float64) for name in z.files}
    samples, counts = case["centres"][:, None], case["counts"]
    order = np.argsort(case["means"][:, 0])
    trapped, _ = _pve.fit_pve_model(
        samples, counts,
        _pve.initial_model(case["means"][order], case["covariances"][order],
                           case["weights"][order]),
        case["floor"], max_iter=2000, tol=1e-7,
    )  # fmt: skip
    assert np.sqrt(trapped.covariances[0, 0, 0]) > 0.1
    model, _, (_, means, covariances) = fit_tissues(
        samples, counts, case["weights"], case["means"], case["covariances"], case["floor"]
    )
    np.testing.assert_allclose(model.means[:, 0], [0.3, 0.65, 1.0], atol=0.01)
    assert np.sqrt(model.covariances[:, 0, 0]).max() < 0.03
    assert model.weights[3] > 0.02  # the CSF/GM mixels are found
    assert np.sqrt(covariances[:, 0, 0]).max() < 0.1


def test_a_model_that_loses_a_class_is_not_used(rng, monkeypatch):
    """Two tissues and no mixels, fitted with three classes: the middle pure class dies from
    both starts, so no tissue Gaussians come out of it; the estimator then keeps its mixture,
    with a warning and the reason in pv_fit_status_."""
    values = np.concatenate([rng.normal(0.3, 0.02, 50_000), rng.normal(1.0, 0.02, 50_000)])
    start = (np.array([0.4995, 0.001, 0.4995]), MEANS, np.full((3, 1, 1), 0.02**2))
    assert fit_tissues(values[:, None], None, *start, [1e-6]) is None
    plain = GaussianMixtureEM(n_components=3, random_state=0).fit(values)
    monkeypatch.setattr("segment.partial_volume.fit_tissues", lambda *args: None)
    with pytest.warns(DataWarning, match="pv_fit not applied: the partial-volume model lost"):
        fitted = GaussianMixtureEM(n_components=3, random_state=0, pv_fit=True).fit(values)
    assert fitted.pv_fit_status_.startswith("not applied") and fitted.pv_model_ is None
    np.testing.assert_array_equal(fitted.means_, plain.means_)


def test_several_channels_keep_the_mixture_with_a_warning(rng):
    X = np.concatenate([rng.normal((0.3, 1.0), 0.03, (3000, 2)),
                        rng.normal((1.0, 0.3), 0.03, (3000, 2))])  # fmt: skip
    plain = GaussianMixtureEM(n_components=2, random_state=0).fit(X)
    with pytest.warns(DataWarning, match="pv_fit not applied: it is implemented for one channel"):
        fitted = GaussianMixtureEM(n_components=2, random_state=0, pv_fit=True).fit(X)
    np.testing.assert_array_equal(fitted.means_, plain.means_)
    assert fitted.pv_fit_status_ == "not applied: it is implemented for one channel"
    image = np.stack([np.where(np.arange(12)[:, None, None] < 6, 0.3, 1.0) * np.ones((12, 10, 8)),
                      np.where(np.arange(12)[:, None, None] < 6, 1.0, 0.3) * np.ones((12, 10, 8))],
                     -1) + rng.normal(0, 0.03, (12, 10, 8, 2))  # fmt: skip
    with pytest.warns(DataWarning, match="pv_fit not applied"):
        result = segment_array(image, channel_axis=-1, n_components=2, pv_fit=True, mrf_beta=0.2)
    assert result.sidecar()["model"]["pv_fit"] == {
        "status": "not applied: it is implemented for one channel"
    }
