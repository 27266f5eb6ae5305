"""Tests of the spatial model: the MRF prior and the bias field (:mod:`segment._spatial`), the
grid EM (``SpatialGaussianMixture.fit_image``) and their options in the API, CLI and batch."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from segment import GaussianMixtureEM, SpatialGaussianMixture, _em, _spatial, io, segment_array
from segment.cli import DEFAULT_MRF_BETA, cli
from segment.evaluate import evaluate_labels
from segment.exceptions import SegmentError
from segment.samples import make_head_phantom
from segment.spatial.mrf import MRF_TOL

HEAD_SHAPE = (24, 28, 20)
BRAIN = (3, 4, 5)


# ------------------------------------------------------------------ helpers
def blocks_phantom(shape, noise, seed=0):
    """Piecewise-constant image of three classes (means 100, 200, 300) plus Gaussian noise."""
    grid = np.indices(shape).astype(float)
    centre = np.array(shape, float)[(slice(None),) + (None,) * len(shape)] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(axis=0))
    truth = np.where(radius < min(shape) * 0.22, 3, np.where(radius < min(shape) * 0.4, 2, 1))
    truth[..., : shape[-1] // 5] = 2  # a slab touching the edge
    image = np.array([0.0, 100.0, 200.0, 300.0])[truth]
    image += np.random.default_rng(seed).normal(0.0, noise, shape)
    return image, truth.astype(np.uint8)


def mean_dice(labels, truth, mask=None):
    if mask is not None:
        labels, truth = np.where(mask, labels, 0), np.where(mask, truth, 0)
    return evaluate_labels(labels, truth, ignore_zero=mask is not None)["mean_dice"]


def smooth_log_field(shape, amplitude=0.25):
    """A smooth known log field (linear + quadratic in normalised coordinates)."""
    coords = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    field = 0.6 * coords[0] - 0.4 * coords[1] + 0.5 * coords[0] * coords[1]
    field += 0.3 * (1.5 * coords[-1] ** 2 - 0.5)
    return amplitude * field / np.abs(field).max()


@pytest.fixture(scope="module")
def head():
    """A small noisy head phantom with 20 % non-uniformity and its brain mask."""
    image, truth, affine = make_head_phantom(HEAD_SHAPE, noise=7.0, nonuniformity=20.0, seed=3)
    return image, truth, np.isin(truth, BRAIN)


# ------------------------------------------------------------------ the maths of _spatial
def test_neighbour_kernel_3d_anisotropic():
    kernel = _spatial.neighbour_kernel((1.0, 2.0, 3.0))
    assert kernel.shape == (3, 3, 3)
    assert kernel[1, 1, 1] == 0 and np.count_nonzero(kernel) == 26
    assert kernel[0, 1, 1] == kernel[2, 1, 1] == pytest.approx(1.0)
    assert kernel[1, 0, 1] == pytest.approx(1 / 2.0)
    assert kernel[1, 1, 2] == pytest.approx(1 / 3.0)
    assert kernel[0, 2, 1] == pytest.approx(1 / np.sqrt(5.0))
    assert kernel[2, 0, 0] == pytest.approx(1 / np.sqrt(14.0))
    np.testing.assert_array_equal(kernel, kernel[::-1, ::-1, ::-1])  # symmetric


def test_neighbour_kernel_2d():
    kernel = _spatial.neighbour_kernel((0.5, 1.0))
    assert kernel.shape == (3, 3) and np.count_nonzero(kernel) == 8
    np.testing.assert_allclose(kernel[:, 1], [2.0, 0.0, 2.0])
    np.testing.assert_allclose(kernel[1], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(kernel[0, 0], 1 / np.sqrt(1.25))


def test_neighbour_sums_brute_force(rng):
    resp = rng.random((5, 6, 7, 2))
    kernel = _spatial.neighbour_kernel((1.0, 1.5, 2.0))
    expected = np.zeros_like(resp)
    for i, j, k in np.ndindex(resp.shape[:3]):
        for di, dj, dk in np.ndindex(3, 3, 3):
            a, b, c = i + di - 1, j + dj - 1, k + dk - 1
            if 0 <= a < 5 and 0 <= b < 6 and 0 <= c < 7:
                expected[i, j, k] += kernel[di, dj, dk] * resp[a, b, c]
    sums = _spatial.neighbour_sums(resp, kernel)  # component-major
    np.testing.assert_allclose(np.moveaxis(sums, 0, -1), expected, rtol=1e-12)
    as_float32 = _spatial.neighbour_sums(resp.astype(np.float32), kernel)
    assert as_float32.dtype == np.float32
    np.testing.assert_allclose(np.moveaxis(as_float32, 0, -1), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, spacing, n_features, beta, halo",
    [
        ((7, 9, 8), (1.0, 1.2, 2.0), 1, 0.3, (1, 1)),
        ((6, 5, 7), (1.0, 1.0, 1.0), 2, 0.2, (0, 1)),
        ((9, 11), (0.8, 1.0), 1, 0.5, (1, 0)),
        ((5, 6, 4), (1.0, 1.0, 1.0), 1, 0.0, (0, 0)),
    ],
)
def test_compiled_sweep_matches_the_numpy_reference(rng, shape, spacing, n_features, beta, halo):
    """The compiled sweep is neighbour_sums + the E-step with the MRF log prior, voxel by voxel."""
    n_components = 3
    mask = rng.random(shape) > 0.2
    previous = rng.integers(0, 256, shape + (n_components + 1,)).astype(np.uint8)
    previous[~mask] = 0
    intensities = rng.normal(100.0, 30.0, shape + (n_features,)).astype(np.float32)
    log_bias = rng.normal(0.0, 0.1, shape + (n_features,)).astype(np.float32)
    weights = np.array([0.2, 0.5, 0.3])
    means = rng.normal(100.0, 30.0, (n_components, n_features))
    covariances = np.stack([np.eye(n_features) * v for v in (200.0, 400.0, 900.0)])
    if n_features == 2:
        covariances[:, 0, 1] = covariances[:, 1, 0] = 50.0
    precisions_chol = _em.precision_cholesky(covariances)
    kernel = _spatial.neighbour_kernel(spacing)
    args = (previous, intensities, mask, log_bias, weights, means, precisions_chol, beta, kernel)
    probabilities = _spatial.mean_field_sweep(*args, final=True, halo=halo)
    state = _spatial.mean_field_sweep(*args, halo=halo)

    x = (intensities / np.exp(log_bias, dtype=np.float32)).astype(np.float64)
    sums = _spatial.neighbour_sums(previous[..., :n_components].astype(np.float64), kernel)
    rows = np.zeros(shape, bool)
    rows[halo[0] : shape[0] - halo[1]] = True
    inside = mask & rows
    log_prior = beta / 255 * sums[:, inside] if beta > 0 else None
    expected, _ = _em.e_step(x[inside], weights, means, precisions_chol, log_prior)
    np.testing.assert_allclose(probabilities[inside], expected.T, atol=1e-6)
    assert not probabilities[~inside].any() and not state[~inside].any()
    levels = np.floor(expected.T * 255 + 0.5)
    assert np.abs(state[inside][:, :n_components] - levels).max() <= 1  # float32 input rounding
    change = np.abs(state[inside][:, :n_components].astype(int) - previous[inside][:, :-1])
    np.testing.assert_array_equal(
        state[inside][:, -1], np.minimum((change.sum(axis=1) + 1) // 2, 255)
    )


def test_in_place_sweeps_skip_settled_voxels_and_ignore_the_slabs(head):
    """A voxel whose neighbours did not move would get its previous value again, exactly."""
    from segment import _sweeps

    image, _, mask = head
    fit = GaussianMixtureEM(3).fit(image[mask])
    params = (fit.weights_, fit.means_, fit.precisions_cholesky_)
    kernel = _spatial.neighbour_kernel((1.0, 1.2, 1.5))

    def no_field(shape, offset, reverse=False):
        return np.zeros(shape + (1,), np.float32)

    grids = [
        _sweeps.PosteriorGrid(image[..., None], mask, params, kernel, no_field, 5, 2)
        for _ in range(2)
    ]
    for grid in grids:
        grid.sweep(0.0)
        grid.sweep(0.5)
    for _ in range(4):
        changes = [grid.sweep(0.5, skip_settled=skip) for grid, skip in zip(grids, (False, True))]
        assert changes[0] == changes[1]
        np.testing.assert_array_equal(grids[0].state, grids[1].state)
    settled = (grids[1].state[..., -1] == 0) & mask.T  # the grid is held axes reversed
    assert 0 < settled.sum() < mask.sum()  # some voxels were skipped, some still move
    # the in-place slabs do not change the result: one plane each, or the whole grid
    for rows in (1, 3, len(mask)):
        other = _sweeps.PosteriorGrid(image[..., None], mask, params, kernel, no_field, rows, 2)
        other.sweep(0.0)
        for _ in range(5):
            other.sweep(0.5)
        np.testing.assert_array_equal(other.state, grids[0].state)
        np.testing.assert_array_equal(other.probabilities(0.5), grids[0].probabilities(0.5))


def test_vectorised_exp_of_the_sweep_kernel():
    """The sweep's float32 exponential (numpy twin of ``exp_sweep`` in ``_estep.c``)."""
    from segment import _kernels

    shifted = np.linspace(_kernels.NEGLIGIBLE, 0.0, 100_001).astype(np.float32)
    out = _kernels._exp_sweep(shifted)
    assert out.dtype == np.float32
    expected = np.exp(shifted[1:].astype(np.float64))
    assert np.abs(out[1:] / expected - 1).max() < 5e-7
    assert out[0] == 0.0 and out[-1] == 1.0  # negligible components are 0; the best is 1


def test_bias_em_on_a_sub_grid_recovers_the_field(monkeypatch):
    from segment.spatial import field

    image, truth, affine = make_head_phantom((32, 36, 28), noise=2.0, seed=1)
    mask = np.isin(truth, BRAIN)
    log_field = smooth_log_field(image.shape)
    biased = image * np.exp(log_field)
    full = segment_array(biased, mask, n_components=3, bias_field=True, bias_smoothness=15.0)
    assert full.estimator.bias_sampling_ == (1, 1, 1)
    monkeypatch.setattr(field, "BIAS_EM_VOXELS", mask.sum() // 8)
    sampled = segment_array(biased, mask, n_components=3, bias_field=True, bias_smoothness=15.0)
    assert sampled.estimator.bias_sampling_ == (2, 2, 2)
    assert sampled.sidecar()["model"]["bias_field"]["fitted_on_every_nth_voxel"] == [2, 2, 2]
    estimated = np.log(sampled.bias_field[..., 0])
    assert np.corrcoef(log_field[mask], estimated[mask])[0, 1] > 0.95
    np.testing.assert_allclose(sampled.estimator.means_, full.estimator.means_, rtol=0.02)
    # the trace is the sub-grid's log-likelihood scaled to the mask's voxels
    assert sampled.estimator.log_likelihood_ == pytest.approx(
        full.estimator.log_likelihood_, rel=0.01
    )
    assert mean_dice(sampled.labels, truth, mask) > 0.95


def test_mrf_log_prior_normalised(rng):
    sums = rng.random((50, 4)) * 20
    log_prior = _spatial.mrf_log_prior(sums.T, 0.3)
    assert log_prior.shape == (4, 50)
    np.testing.assert_allclose(np.exp(log_prior).sum(axis=0), 1.0, rtol=1e-12)
    # differences between classes are beta times the differences of the neighbour sums
    np.testing.assert_allclose(
        log_prior[1] - log_prior[0], 0.3 * (sums[:, 1] - sums[:, 0]), atol=1e-12
    )
    flat = _spatial.mrf_log_prior(sums.T, 0.0)
    np.testing.assert_allclose(flat, np.log(0.25))


# ------------------------------------------------------------------ what the issue requires
@pytest.mark.parametrize(
    "shape, noise, gain", [((64, 64), 50.0, 0.025), ((24, 28, 20), 75.0, 0.08)]
)
def test_mrf_raises_dice_on_noisy_piecewise_constant(shape, noise, gain):
    image, truth = blocks_phantom(shape, noise)
    plain = segment_array(image, n_components=3)
    mrf = segment_array(image, n_components=3, mrf_beta=DEFAULT_MRF_BETA)
    plain_dice, mrf_dice = mean_dice(plain.labels, truth), mean_dice(mrf.labels, truth)
    assert plain_dice < 0.85  # the noise is heavy ...
    # ... and the spatial prior measurably helps (less in 2-D: 8 neighbours weigh 6.8, 26 weigh 19)
    assert mrf_dice > plain_dice + gain
    assert mrf.estimator.converged_


def test_known_smooth_field_is_recovered():
    image, truth, affine = make_head_phantom((32, 36, 28), noise=2.0, seed=1)
    mask = np.isin(truth, BRAIN)
    log_field = smooth_log_field(image.shape)
    biased = image * np.exp(log_field)
    result = segment_array(biased, mask, n_components=3, bias_field=True, bias_smoothness=15.0)
    estimated = np.log(result.bias_field[..., 0])
    assert result.estimator.bias_status_ == "applied"
    correlation = np.corrcoef(log_field[mask], estimated[mask])[0, 1]
    assert correlation > 0.95
    # the field is normalised over the box, not fitted to the tissue means: the fitted means
    # stay those of the unbiased image up to the field's mean over the mask
    plain = segment_array(image, mask, n_components=3)
    shift = np.exp(np.mean(log_field[mask] - estimated[mask]))
    np.testing.assert_allclose(result.estimator.means_ / shift, plain.estimator.means_, rtol=0.03)
    assert mean_dice(result.labels, truth, mask) > 0.95


def _spatial_fit(image, mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SpatialGaussianMixture(
            3,
            mrf_beta=DEFAULT_MRF_BETA,
            bias_field=True,
            bias_smoothness=20.0,
            max_iter=10,
            **kwargs,
        ).fit_image(image, mask, spacing=(1.0, 1.2, 1.5))


@pytest.fixture(scope="module")
def odd_chunks_fit(head):
    image, _, mask = head
    per_slab = HEAD_SHAPE[1] * HEAD_SHAPE[2]
    return _spatial_fit(image, mask, chunk_size=5 * per_slab, scheduler="synchronous")


def test_chunk_invariance(head, odd_chunks_fit):
    image, _, mask = head
    one_block = _spatial_fit(image, mask, scheduler="synchronous")
    assert one_block.n_iter_ == odd_chunks_fit.n_iter_
    # per-voxel maths is identical; only the order of the chunk sums differs (1e-16 relative),
    # and the responsibilities are stored in float32, so agreement is at float32 level
    np.testing.assert_allclose(one_block.means_, odd_chunks_fit.means_, rtol=1e-9)
    np.testing.assert_allclose(
        one_block.responsibilities_, odd_chunks_fit.responsibilities_, atol=1e-6
    )
    np.testing.assert_allclose(one_block.bias_field_, odd_chunks_fit.bias_field_, rtol=1e-6)
    np.testing.assert_allclose(
        one_block.log_likelihood_trace_, odd_chunks_fit.log_likelihood_trace_, rtol=1e-9
    )


@pytest.mark.parametrize("scheduler", ["threads", "processes", "distributed"])
def test_scheduler_invariance(head, odd_chunks_fit, scheduler):
    image, _, mask = head
    per_slab = HEAD_SHAPE[1] * HEAD_SHAPE[2]
    if scheduler == "distributed":
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster:
            fit = _spatial_fit(
                image, mask, chunk_size=5 * per_slab, scheduler=cluster.scheduler_address
            )
    else:
        fit = _spatial_fit(image, mask, chunk_size=5 * per_slab, scheduler=scheduler, n_workers=2)
    # same chunking, sums combined in a fixed order: the same numbers bit for bit
    np.testing.assert_array_equal(fit.means_, odd_chunks_fit.means_)
    np.testing.assert_array_equal(fit.responsibilities_, odd_chunks_fit.responsibilities_)
    np.testing.assert_array_equal(fit.bias_field_, odd_chunks_fit.bias_field_)


def test_memory_order_of_the_image_changes_nothing(head):
    """NIfTI data are Fortran-ordered, numpy arrays usually C-ordered: the same posterior."""
    image, _, mask = head
    options = dict(n_components=3, mrf_beta=DEFAULT_MRF_BETA, bias_field=True,
                   bias_smoothness=15.0)  # fmt: skip
    c_order = segment_array(np.ascontiguousarray(image), mask, **options)
    f_order = segment_array(np.asfortranarray(image), np.asfortranarray(mask), **options)
    np.testing.assert_array_equal(c_order.labels, f_order.labels)
    np.testing.assert_allclose(c_order.responsibilities, f_order.responsibilities, atol=1e-6)
    np.testing.assert_allclose(c_order.estimator.means_, f_order.estimator.means_, rtol=1e-9)


def test_both_off_is_bit_for_bit_the_plain_mixture(head):
    image, _, mask = head
    plain = GaussianMixtureEM(3).fit(image[mask])
    grid = SpatialGaussianMixture(3, mrf_beta=0.0, bias_field=False).fit_image(image, mask)
    for name in ("means_", "covariances_", "weights_"):
        np.testing.assert_array_equal(getattr(grid, name), getattr(plain, name))
    assert grid.log_likelihood_trace_ == plain.log_likelihood_trace_
    assert grid.bias_field_ is None and grid.fit_path_ == plain.fit_path_
    before = segment_array(image, mask, n_components=3)
    after = segment_array(
        image, mask, n_components=3, mrf_beta=0.0, bias_field=False, bias_smoothness=25.0
    )
    np.testing.assert_array_equal(before.labels, after.labels)
    np.testing.assert_array_equal(before.flat_responsibilities, after.flat_responsibilities)
    np.testing.assert_array_equal(before.labels[mask], plain.predict(image[mask]) + 1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mrf_beta": -0.1}, r"mrf_beta must be a number >= 0, got -0\.1"),
        ({"mrf_beta": float("nan")}, r"mrf_beta must be a number >= 0"),
        ({"bias_smoothness": 0.0}, r"bias_smoothness must be a number > 0, got 0\.0"),
        ({"bias_smoothness": -60.0}, r"bias_smoothness must be a number > 0, got -60"),
        ({"bias_field": "yes"}, r"bias_field must be True or False"),
    ],
)
def test_bad_values_api(options, match):
    image, _ = blocks_phantom((16, 16), 5.0)
    with pytest.raises(SegmentError, match=match):
        segment_array(image, n_components=3, **options)
    with pytest.raises(SegmentError, match=match):
        SpatialGaussianMixture(3, **options).fit_image(image)


def test_fit_refuses_spatial_options_without_grid():
    with pytest.raises(SegmentError, match=r"call SpatialGaussianMixture\(\.\.\.\)\.fit_image"):
        GaussianMixtureEM(2, mrf_beta=0.3).fit(np.arange(100.0))


def write_head(path, shape=HEAD_SHAPE, noise=5.0, nonuniformity=20.0, seed=0):
    image, truth, affine = make_head_phantom(
        shape, noise=noise, nonuniformity=nonuniformity, seed=seed
    )
    nib.save(nib.Nifti1Image(image, affine), path)
    return image, truth, affine


@pytest.mark.parametrize(
    "args, match",
    [
        (["--mrf-beta", "-1"], "--mrf-beta"),
        (["--bias-smoothness", "0"], "--bias-smoothness"),
        (["--bias-smoothness", "-5"], "--bias-smoothness"),
    ],
)
def test_bad_values_cli(tmp_path, args, match):
    write_head(tmp_path / "scan.nii.gz")
    result = CliRunner().invoke(
        cli, ["run", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "out"), *args]
    )
    assert result.exit_code == 2, result.output
    assert match in result.output


# ------------------------------------------------------------------ the objective in the trace
def _log_gaussian_mixture(x, weights, means, covariances):
    """sum_k pi_k N(x | mu_k, Sigma_k) in the log domain for (n, D) x, directly."""
    terms = []
    for w, mu, cov in zip(weights, means, covariances):
        diff = x - mu
        maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
        _, logdet = np.linalg.slogdet(2 * np.pi * cov)
        terms.append(np.log(w) - 0.5 * (maha + logdet))
    return np.logaddexp.reduce(np.stack(terms), axis=0)


def test_objective_with_bias_only_is_the_observed_log_likelihood(head):
    image, _, mask = head
    fit = SpatialGaussianMixture(3, bias_field=True, bias_smoothness=20.0).fit_image(image, mask)
    assert fit.converged_ and "log-likelihood of the observed intensities" in fit.objective_
    b = fit.bias_field_[mask].astype(np.float64)
    y = image[mask].astype(np.float64)[:, None]
    direct = _log_gaussian_mixture(y / b, fit.weights_, fit.means_, fit.covariances_)
    direct = float(np.sum(direct - np.log(b[:, 0])))
    assert fit.log_likelihood_trace_[-1] == pytest.approx(direct, rel=1e-6)
    trace = np.array([fit.initial_log_likelihood_] + fit.log_likelihood_trace_)
    # the bias update is a weighted least-squares step, not an exact M-step: the trace rises
    # overall and is monotone up to tiny dips
    assert trace[-1] > trace[0]
    assert np.diff(trace).min() > -1e-3 * fit.n_samples_


def test_mrf_posterior_is_the_documented_mean_field_fixed_point(head):
    image, truth, mask = head
    fit = SpatialGaussianMixture(
        3, mrf_beta=DEFAULT_MRF_BETA, bias_field=True, bias_smoothness=20.0
    ).fit_image(image, mask)
    assert fit.converged_ and "log-likelihood of the observed intensities" in fit.objective_
    assert "MRF prior shapes the posterior" in fit.objective_
    # the class parameters are the mixture's: the trace is its log-likelihood under the field
    b = fit.bias_field_[mask].astype(np.float64)
    x = image[mask].astype(np.float64)[:, None] / b
    direct = _log_gaussian_mixture(x, fit.weights_, fit.means_, fit.covariances_)
    assert fit.log_likelihood_trace_[-1] == pytest.approx(
        float(np.sum(direct - np.log(b[:, 0]))), rel=1e-6
    )
    # one more sweep from the returned posterior q moves it by less than the stopping tolerance:
    # q_ik ~ exp(beta sum_j w_ij q_jk) N(x_i | k)
    q = np.zeros(mask.shape + (3,))
    q[mask] = fit.responsibilities_
    sums = _spatial.neighbour_sums(q, _spatial.neighbour_kernel((1.0, 1.0, 1.0)))
    log_prior = _spatial.mrf_log_prior(sums[:, mask], DEFAULT_MRF_BETA).T  # (n, K)
    terms = [
        _log_gaussian_mixture(x, [1.0], fit.means_[k : k + 1], fit.covariances_[k : k + 1])
        for k in range(3)
    ]
    log_q = np.stack(terms, axis=1) + log_prior
    again = np.exp(log_q - np.logaddexp.reduce(log_q, axis=1, keepdims=True))
    change = 0.5 * np.abs(again - fit.responsibilities_).sum(axis=1).mean()
    assert 0 < fit.mrf_change_ < MRF_TOL and fit.n_mrf_sweeps_ >= 2
    assert change < MRF_TOL
    # the MRF does not touch the class parameters directly: they stay near the bias-only fit's
    # (the field differs a little, being weighted by the MRF posterior)
    bias_only = SpatialGaussianMixture(3, bias_field=True, bias_smoothness=20.0).fit_image(
        image, mask
    )
    np.testing.assert_allclose(fit.means_, bias_only.means_, rtol=0.01)
    np.testing.assert_allclose(fit.weights_, bias_only.weights_, rtol=0.05)
    assert mean_dice(_labels_on_grid(fit, mask), truth, mask) >= mean_dice(
        _labels_on_grid(bias_only, mask), truth, mask
    )


def test_mrf_only_keeps_the_plain_parameters(head):
    image, _, mask = head
    plain = GaussianMixtureEM(3).fit(image[mask])
    mrf = SpatialGaussianMixture(3, mrf_beta=DEFAULT_MRF_BETA).fit_image(image, mask)
    for name in ("means_", "covariances_", "weights_"):
        np.testing.assert_array_equal(getattr(mrf, name), getattr(plain, name))
    assert mrf.log_likelihood_trace_ == plain.log_likelihood_trace_
    assert mrf.n_mrf_sweeps_ >= 1
    # but the posterior differs from the mixture's responsibilities
    assert np.abs(mrf.responsibilities_ - plain.predict_proba(image[mask])).max() > 0.1


def _labels_on_grid(fit, mask):
    labels = np.zeros(mask.shape, int)
    labels[mask] = fit.responsibilities_.argmax(axis=1) + 1
    return labels


# ------------------------------------------------------------------ 2-D, multichannel, CLI, batch
def test_2d_with_both_on():
    image, truth = blocks_phantom((64, 64), 50.0, seed=2)
    log_field = smooth_log_field(image.shape, 0.2)
    result = segment_array(
        image * np.exp(log_field),
        n_components=3,
        spacing=(0.5, 0.5),
        mrf_beta=DEFAULT_MRF_BETA,
        bias_field=True,
        bias_smoothness=10.0,
    )
    assert result.bias_field.shape == (64, 64, 1)
    plain = segment_array(image * np.exp(log_field), n_components=3)
    assert mean_dice(result.labels, truth) > max(0.75, mean_dice(plain.labels, truth) + 0.05)


def test_multichannel_with_both_on():
    i, j, k = np.indices((24, 28, 20))
    wave = 2 * np.sin(j / 4.0) + 2 * np.cos(k / 5.0)
    truth = (1 + (i + wave > 8) + (i - wave > 16)).astype(np.uint8)  # three wavy bands
    noise = np.random.default_rng(5).normal(0, 30.0, (2,) + truth.shape)
    image = np.array([0.0, 100.0, 200.0, 300.0])[truth] + noise[0]
    second = np.array([0.0, 300.0, 100.0, 200.0])[truth] + noise[1]  # another contrast
    field = np.exp(smooth_log_field(truth.shape, 0.15))
    result = segment_array(
        [image * field, second * field],
        n_components=3,
        mrf_beta=DEFAULT_MRF_BETA,
        bias_field=True,
        bias_smoothness=15.0,
    )
    assert result.bias_field.shape == truth.shape + (2,)
    assert result.estimator.means_.shape == (3, 2)
    assert mean_dice(result.labels, truth) > 0.99
    truth_field = smooth_log_field(truth.shape, 0.15).ravel()
    correlations = [
        np.corrcoef(np.log(result.bias_field[..., channel]).ravel(), truth_field)[0, 1]
        for channel in range(2)
    ]
    # SNR 3-10 on a 24 x 28 x 20 grid, where a 15 mm smoothing spans most of the image: the
    # first channel's field is recovered well, the second's (classes in another intensity
    # order) only roughly (0.55 measured; see the notes of the bias-field change)
    assert correlations[0] > 0.9 and correlations[1] > 0.5


def test_cli_run_writes_bias_field_and_corrected(tmp_path):
    image, _, affine = write_head(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(tmp_path / "scan.nii.gz"),
            "-o",
            str(out),
            "-k",
            "6",
            "--mrf",
            "--bias-field",
            "--write-corrected",
            "--max-iter",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("scan_biasfield.nii.gz", "scan_corrected.nii.gz"):
        written = nib.load(out / name)
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, affine)
    field = np.asarray(nib.load(out / "scan_biasfield.nii.gz").dataobj)
    corrected = np.asarray(nib.load(out / "scan_corrected.nii.gz").dataobj)
    np.testing.assert_allclose(corrected * field, image, rtol=1e-4, atol=1e-2)
    sidecar = json.loads((out / "scan_segment.json").read_text())
    model = _find_key(sidecar, "bias_field", dict)
    assert model["mrf_beta"] == DEFAULT_MRF_BETA
    assert model["mrf_sweeps"] >= 1 and 0 <= model["mrf_last_change"] < MRF_TOL
    assert "MRF prior shapes the posterior" in model["objective"]
    assert model["bias_field"]["status"] == "applied"
    low, high = model["bias_field"]["range"]
    assert low <= 1.0 <= high


def _find_key(record, key, kind=object):
    """The (nested) dict of a JSON record holding ``key`` with a value of type ``kind``."""
    if isinstance(record, dict):
        if isinstance(record.get(key), kind):
            return record
        for value in record.values():
            found = _find_key(value, key, kind)
            if found is not None:
                return found
    return None


def test_batch_with_spatial_pipeline(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in (0, 1):
        write_head(scans / f"head{seed}.nii.gz", seed=seed)
    preset = tmp_path / "spatial.toml"
    preset.write_text(
        'description = "both on"\nmask = "none"\n[model]\nn_components = 6\n'
        "max_iter = 60\nmrf_beta = 0.3\nbias_field = true\n"
        "bias_smoothness = 40.0\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "batch",
            str(scans),
            "-o",
            str(out),
            "--pipeline",
            str(preset),
            "--scheduler",
            "synchronous",
        ],
    )
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        assert (out / f"head{seed}_biasfield.nii.gz").exists()
        sidecar = json.loads((out / f"head{seed}_segment.json").read_text())
        model = _find_key(sidecar, "bias_field", dict)
        assert model["mrf_beta"] == 0.3 and model["bias_field"]["smoothness_mm"] == 40.0


def test_spatial_path_refuses_to_exceed_the_memory_limit(tmp_path):
    image, _, _ = write_head(tmp_path / "scan.nii.gz")
    with pytest.raises(SegmentError, match=r"keep the posterior on the image grid: about .* GB"):
        segment_array(image, n_components=3, mrf_beta=0.2, memory_limit="100kB")
    # the plain mixture streams its outputs instead, so the same limit is fine for it
    assert segment_array(image, n_components=3, memory_limit="100kB").labels.shape == image.shape
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["run", str(tmp_path / "scan.nii.gz"), "-o", str(out), "-k", "3", "--bias-field",
         "--memory-limit", "100kB"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"{tmp_path / 'scan.nii.gz'}: the MRF prior and bias field" in result.output
    assert "raise --memory-limit" in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_spatial_maps_are_streamed_over_a_third_of_the_memory_limit(head, tmp_path, monkeypatch):
    """Maps too big for the limit are recomputed slab by slab: the same labels and files."""
    from segment.spatial.model import bounding_box

    monkeypatch.setattr(io, "SLAB_BYTES", 4096)  # one-plane writer slabs, several groups

    image, _, mask = head
    options = dict(n_components=3, mrf_beta=0.2, bias_field=True, bias_smoothness=20.0)
    kept = segment_array(image, mask, **options)
    box = int(np.prod([s.stop - s.start for s in bounding_box(mask)]))
    streamed = segment_array(image, mask, memory_limit=box * 3 * 4 * 3 - 1, **options)
    assert kept.flat_responsibilities is not None and streamed.flat_responsibilities is None
    np.testing.assert_array_equal(streamed.labels, kept.labels)
    np.testing.assert_allclose(streamed.responsibilities, kept.responsibilities, atol=1e-6)
    np.testing.assert_allclose(streamed.soft_counts, kept.soft_counts, rtol=1e-6)
    np.testing.assert_array_equal(streamed.estimator.means_, kept.estimator.means_)
    reference = nib.Nifti1Image(image.astype(np.float32), np.eye(4))
    nib.save(reference, tmp_path / "scan.nii.gz")
    for name, result in (("kept", kept), ("streamed", streamed)):
        result.reference = io.load_scan(tmp_path / "scan.nii.gz")
        result.save(tmp_path / name, qc=False)
    maps = [
        nib.load(tmp_path / name / "segment_probseg.nii.gz").get_fdata()
        for name in ("kept", "streamed")
    ]
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-6)
    # the bias field is written slab by slab: the same values as the in-memory field
    for name in ("kept", "streamed"):
        written = nib.load(tmp_path / name / "segment_biasfield.nii.gz")
        assert written.shape == image.shape
        np.testing.assert_allclose(written.get_fdata(), kept.bias_field[..., 0], rtol=1e-6)
        assert written.header["cal_max"] == pytest.approx(kept.bias_field.max(), rel=1e-6)


def test_streamed_labels_come_from_the_written_maps(head, tmp_path, monkeypatch):
    """Saved before its labels are read, a streamed posterior takes them from the maps' sweep."""
    from segment import _sweeps

    monkeypatch.setattr(io, "SLAB_BYTES", 4096)
    image, _, mask = head
    options = dict(n_components=3, mrf_beta=0.2, bias_field=True, bias_smoothness=20.0)
    kept = segment_array(image, mask, **options)
    streamed = segment_array(image, mask, memory_limit=image.size * 3 * 4, **options)
    assert streamed.flat_responsibilities is None and streamed._labels_pending()
    label_sweeps = []
    monkeypatch.setattr(_sweeps.PosteriorGrid, "labels", lambda *a: label_sweeps.append(a))
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    for name, result in (("kept", kept), ("streamed", streamed)):
        result.reference = io.load_scan(tmp_path / "scan.nii.gz")
        result.save(tmp_path / name, qc=False)
    assert not label_sweeps and not streamed._labels_pending()
    np.testing.assert_array_equal(streamed.labels, kept.labels)
    np.testing.assert_allclose(streamed.soft_counts, kept.soft_counts, rtol=1e-6)
    for suffix in ("dseg", "probseg"):
        kept_file, streamed_file = (
            nib.load(tmp_path / name / f"segment_{suffix}.nii.gz").get_fdata()
            for name in ("kept", "streamed")
        )
        np.testing.assert_allclose(streamed_file, kept_file, atol=1e-6)
    records = [
        json.loads((tmp_path / name / "segment.json").read_text()) for name in ("kept", "streamed")
    ]
    for streamed_label, kept_label in zip(records[1]["labels"], records[0]["labels"]):
        assert streamed_label.pop("name") == kept_label.pop("name")
        assert streamed_label == pytest.approx(kept_label, rel=1e-6, abs=1e-3)


def test_streamed_spatial_maps_of_a_2d_image():
    rng = np.random.default_rng(0)
    image = np.where(np.add.outer(np.arange(80), np.arange(70)) > 70, 200.0, 100.0)
    image[:20] += 50
    image += rng.normal(0, 40, image.shape)
    options = dict(n_components=3, mrf_beta=0.3, bias_field=True)
    kept = segment_array(image, **options)
    streamed = segment_array(image, memory_limit=image.size * 3 * 4 * 3 - 1, **options)
    assert streamed.flat_responsibilities is None
    np.testing.assert_array_equal(streamed.labels, kept.labels)
    np.testing.assert_allclose(streamed.responsibilities, kept.responsibilities, atol=1e-6)


def test_batch_memory_limit_applies_per_scan(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_head(scans / "a.nii.gz")
    out = tmp_path / "out"
    args = ["batch", str(scans), "-o", str(out), "-k", "3", "--mrf", "-q"]
    args += ["--scheduler", "synchronous"]  # scans in this process: no cluster to start
    refused = CliRunner().invoke(cli, [*args, "--memory-limit", "100kB"])
    assert refused.exit_code == 1
    summary = (out / "batch_summary.tsv").read_text()
    assert "failed" in summary and "raise --memory-limit" in summary
    done = CliRunner().invoke(cli, [*args, "--memory-limit", "2GB"])
    assert done.exit_code == 0, done.output
    assert (out / "a_dseg.nii.gz").exists()
    bad = CliRunner().invoke(cli, [*args, "--memory-limit", "lots"])
    assert bad.exit_code == 2 and "memory_limit must be a positive size" in bad.output


# ------------------------------------------------------------------ the spatial model's class
def test_spatial_model_and_the_compatible_estimator_agree(head):
    """SpatialGaussianMixture is what api builds; GaussianMixtureEM.fit_image delegates to it
    and shows the same fitted attributes, bias field and slab iterators."""
    from segment import SpatialGaussianMixture
    from segment.api import make_estimator

    image, _, mask = head
    options = dict(mrf_beta=0.3, bias_field=True, bias_smoothness=20.0)
    model = SpatialGaussianMixture(3, **options).fit_image(image, mask)
    with pytest.warns(DeprecationWarning, match=r"SpatialGaussianMixture\(\.\.\.\)\.fit_image"):
        compat = GaussianMixtureEM(3, **options).fit_image(image, mask)
    assert isinstance(compat.spatial_model_, SpatialGaussianMixture)
    np.testing.assert_array_equal(compat.responsibilities_, model.responsibilities_)
    np.testing.assert_array_equal(compat.means_, model.means_)
    assert compat.bias_status_ == model.bias_status_ and compat.warnings_ == model.warnings_
    assert compat.n_mrf_sweeps_ == model.n_mrf_sweeps_ >= 1
    assert compat.bias_field_shape_ == model.bias_field_shape_ == image.shape + (1,)
    np.testing.assert_array_equal(compat.bias_field_, model.bias_field_)
    starts = [start for start, _ in compat.bias_field_slabs(step=5)]
    assert starts == list(range(0, image.shape[0], 5))
    # a later plain fit forgets the image model
    compat.set_params(mrf_beta=0.0, bias_field=False).fit(image[mask][:, None])
    assert compat.bias_field_ is None and not hasattr(compat, "spatial_model_")

    assert type(make_estimator({"n_components": 3})) is GaussianMixtureEM
    spatial = make_estimator({"n_components": 3, "mrf_beta": 0.2})
    assert type(spatial) is SpatialGaussianMixture and spatial.mrf_beta == 0.2
    with pytest.raises(SegmentError, match="fit_image"):
        SpatialGaussianMixture(2, mrf_beta=0.2).fit(image[mask])


def test_a_rejected_bias_field_leaves_the_plain_mixture():
    """A uniform image: the classes do not agree on a field, which is not applied; the plain
    mixture's parameters stand, the field is 1 and a DataWarning is recorded in warnings_."""
    from segment import SpatialGaussianMixture
    from segment.exceptions import DataWarning

    image, _ = blocks_phantom((20, 22, 18), noise=8.0)
    plain = SpatialGaussianMixture(3).fit_image(image)
    with pytest.warns(DataWarning, match="bias field not applied"):
        fit = SpatialGaussianMixture(3, bias_field=True, bias_smoothness=8.0).fit_image(image)
    assert fit.bias_status_.startswith("not applied: classes")
    assert any("bias field not applied" in w for w in fit.warnings_)
    np.testing.assert_array_equal(fit.means_, plain.means_)
    labels = plain.predict(image.reshape(-1, 1))
    np.testing.assert_array_equal(fit.responsibilities_.argmax(1), labels)
    assert np.all(fit.bias_field_ == 1.0)
