"""Tests of the bias field's maths (:mod:`segment.spatial.bias`) and its guards."""

from __future__ import annotations

import numpy as np
import pytest

from segment import _em, _kernels, segment_array
from segment.exceptions import DataWarning
from segment.samples import make_head_phantom
from segment.spatial import bias

BRAIN = (3, 4, 5)


def _params(means, sds):
    means = np.asarray(means, float)[:, None]
    covariances = (np.asarray(sds, float) ** 2)[:, None, None]
    return np.full(len(means), 1 / len(means)), means, covariances


def test_field_cells_follow_the_smoothness_in_mm():
    assert bias.field_cells((1.0, 1.0, 1.0), 60.0) == (10, 10, 10)
    assert bias.field_cells((2.0, 1.0, 0.5), 60.0) == (5, 10, 20)
    assert bias.field_cells((10.0, 10.0), 6.0) == (1, 1)
    assert bias.coarse_shape((25, 20, 3), (10, 10, 10)) == (3, 2, 2)


@pytest.mark.parametrize("scale", [(1, 1, 1), (2, 3, 1)])
def test_interpolation_is_exact_for_a_linear_field(scale):
    """Linear interpolation of cell-centre values reproduces a linear function inside."""
    cells, coarse_shape = (4, 5, 3), (6, 5, 7)
    centres = [(np.arange(n) + 0.5) * c - 0.5 for n, c in zip(coarse_shape, cells)]
    slope = np.array([0.01, -0.02, 0.005])
    grid = np.meshgrid(*centres, indexing="ij")
    coarse = sum(s * g for s, g in zip(slope, grid))[None]
    shape, offset = (5, 4, 6), (2, 3, 4)
    values = bias.log_bias_block(shape, offset, coarse, cells, scale)[..., 0]
    positions = [(o + np.arange(n)) * s for o, n, s in zip(offset, shape, scale)]
    expected = sum(s * g for s, g in zip(slope, np.meshgrid(*positions, indexing="ij")))
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # the reversed (last axis first) evaluation is the transpose
    reverse = bias.log_bias_block(shape[::-1], offset[::-1], coarse, cells, scale, reverse=True)
    np.testing.assert_allclose(reverse[..., 0], values.T, atol=1e-6)


def _em_block(image, mask, offset, coarse, cells, weights, means, covariances):
    return bias.em_block(image, mask, offset, coarse, cells, (1, 1, 1), weights, means,
                         _em.precision_cholesky(covariances))  # fmt: skip


def test_em_block_does_not_depend_on_the_blocks(rng):
    """Statistics and cell sums over blocks equal those of one block."""
    shape, cells = (13, 11, 9), (4, 3, 5)
    image = rng.normal(100, 10, shape + (1,)).astype(np.float32)
    mask = rng.random(shape) > 0.2
    coarse_shape = bias.coarse_shape(shape, cells)
    coarse = rng.normal(0, 0.05, (1, *coarse_shape))
    params = _params([80, 100, 120], [8, 8, 8])
    whole = bias.combine_em_blocks(
        [_em_block(image, mask, (0, 0, 0), coarse, cells, *params)], coarse_shape
    )
    parts = []
    for start, stop in [(0, 5), (5, 6), (6, 13)]:  # blocks that do not align with the cells
        block = slice(start, stop)
        parts.append(_em_block(image[block], mask[block], (start, 0, 0), coarse, cells, *params))
    combined = bias.combine_em_blocks(parts, coarse_shape)
    np.testing.assert_allclose(combined[1], whole[1], rtol=1e-12)
    for key in ("nk", "log_likelihood", "n_samples"):
        np.testing.assert_allclose(combined[0][key], whole[0][key], rtol=1e-12)
    assert whole[1][2 * 3].sum() == mask.sum()  # the voxel counts
    # the log-likelihood is that of the observed intensities: the field's Jacobian included
    log_b = bias.log_bias_block(shape, (0, 0, 0), coarse, cells)[..., 0][mask].astype(float)
    x = image[..., 0][mask] * np.exp(-log_b)
    _, log_norm = _em.e_step(x[:, None], params[0], params[1],
                             _em.precision_cholesky(params[2]))  # fmt: skip
    assert whole[0]["log_likelihood"] == pytest.approx(log_norm.sum() - log_b.sum(), rel=1e-9)


@pytest.mark.skipif(_kernels.compiled is None, reason="compiled kernels off")
@pytest.mark.parametrize("shape, scale", [((13, 11, 9), (1, 1, 1)), ((7, 5, 6), (2, 3, 1))])
def test_compiled_em_block_equals_its_numpy_reference(rng, monkeypatch, shape, scale):
    """The one-channel loop (bias_estep_1d) gives the numpy statistics and cell sums (the
    same operations: equal to the bit where numpy's exp and log are libm's)."""
    cells = (4, 3, 5)
    image = rng.normal(100, 15, shape + (1,)).astype(np.float32)
    image[0, 0, :3, 0] = [0.0, -1.0, 5.0]  # intensities that are not usable for the field
    mask = rng.random(shape) > 0.3
    grid = tuple(n * s for n, s in zip(shape, scale))
    coarse = rng.normal(0, 0.05, (1, *bias.coarse_shape(grid, cells)))
    weights, means, covariances = _params([80, 100, 120], [8, 9, 10])
    args = (image, mask, (1, 0, 2), coarse, cells, scale, weights, means,
            _em.precision_cholesky(covariances))  # fmt: skip
    compiled = bias.em_block(*args)
    monkeypatch.setattr(_kernels, "compiled", None)
    reference = bias.em_block(*args)
    assert compiled[1][0] == reference[1][0]
    np.testing.assert_allclose(compiled[1][1], reference[1][1], rtol=1e-12, atol=1e-12)
    for key in ("nk", "sum_centered", "scatter", "log_likelihood", "n_samples"):
        np.testing.assert_allclose(compiled[0][key], reference[0][key], rtol=1e-12)


def test_smoothed_field_recovers_a_constant_offset_and_has_zero_mean(rng):
    """Pure classes with every voxel 10 % too bright on one side: the field follows."""
    shape = (40, 12, 12)
    log_true = np.where(np.arange(40) < 20, 0.0, np.log(1.1))[:, None, None] * np.ones(shape)
    classes = rng.integers(0, 2, shape)
    means = np.array([100.0, 200.0])
    image = (means[classes] * np.exp(log_true))[..., None]
    weights, m, covariances = _params(means, [5, 5])
    cells = (2, 2, 2)
    coarse_shape = bias.coarse_shape(shape, cells)
    zero = np.zeros((1, *coarse_shape))
    _, sums = bias.combine_em_blocks(
        [_em_block(image, np.ones(shape, bool), (0, 0, 0), zero, cells, weights, m, covariances)],
        coarse_shape,
    )
    residuals = bias.residual_sums(sums, m, covariances)
    field = bias.smooth_log_field(residuals, 1, (1.0, 1.0, 1.0), prior=0.0)
    assert (field[0] * residuals[2]).sum() == pytest.approx(0.0, abs=1e-9)
    step = field[0][15:, :, :].mean() - field[0][:5, :, :].mean()
    assert step == pytest.approx(np.log(1.1), rel=0.05)
    # the prior shrinks the field towards 1 where the data are weak
    weak = bias.smooth_log_field(residuals, 1, (1.0, 1.0, 1.0), prior=1e6)
    assert np.abs(weak).max() < 1e-3


def test_field_weights_cap_the_cleanest_classes():
    """``tissue_cv = 0`` gives ``snr^2``; a positive one caps it below ``1 / cv^2``, in order."""
    _, means, covariances = _params([30.0, 100.0, 200.0], [20.0, 10.0, 2.0])
    snr2 = bias.signal_to_noise(means, covariances)
    np.testing.assert_array_equal(bias.field_weights(means, covariances), snr2)
    capped = bias.field_weights(means, covariances, 0.1)[:, 0]
    assert capped[0] == 0.0  # snr 1.5 < MIN_SNR: still no vote
    assert 0 < capped[1] < capped[2] < 100.0
    np.testing.assert_allclose(capped[1:], 1 / (1 / snr2[1:, 0] + 0.01))
    # the clean class outvotes the other 100 to 1 with snr^2, about 2 to 1 capped
    assert snr2[2, 0] / snr2[1, 0] == pytest.approx(100.0)
    assert capped[2] / capped[1] < 2.1


def test_capped_weights_keep_a_clean_class_anatomy_out_of_the_field():
    """A clean class 5 % brighter on one side (anatomy) and a true 10 % step on the other
    axis: both weightings find the step; the capped one copies much less of the anatomy."""
    shape, cells = (32, 32, 6), (2, 2, 2)
    x, y = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    classes = ((x + y) % 2)[..., None] * np.ones(shape, int)  # interleaved, every cell has both
    log_true = np.where(x >= 16, np.log(1.1), 0.0)[..., None]
    anatomy = np.where((classes == 1) & (y[..., None] >= 16), np.log(1.05), 0.0)
    means = np.array([100.0, 200.0])
    image = (means[classes] * np.exp(log_true + anatomy))[..., None]
    weights, m, covariances = _params(means, [10.0, 4.0])  # snr^2 100 and 2,500
    coarse_shape = bias.coarse_shape(shape, cells)
    zero = np.zeros((1, *coarse_shape))
    _, sums = bias.combine_em_blocks(
        [_em_block(image, np.ones(shape, bool), (0, 0, 0), zero, cells, weights, m, covariances)],
        coarse_shape,
    )

    def components(tissue_cv):
        residuals = bias.residual_sums(sums, m, covariances, tissue_cv)
        field = bias.smooth_log_field(residuals, 1, (1.0, 1.0, 1.0), prior=0.0)[0]
        step = field[10:, :, :].mean() - field[:6, :, :].mean()  # along x: the true field
        copied = field[:, 10:, :].mean() - field[:, :6, :].mean()  # along y: the anatomy
        return step, copied

    step_snr, copied_snr = components(0.0)
    step_cap, copied_cap = components(bias.TISSUE_CV)
    assert step_snr == pytest.approx(np.log(1.1), rel=0.1)
    assert step_cap == pytest.approx(np.log(1.1), rel=0.1)
    assert copied_snr > 0.8 * np.log(1.05)  # snr^2 weights: the field is the clean class's
    assert copied_cap < 0.75 * copied_snr


def test_class_agreement_separates_a_field_from_anatomy(rng):
    shape, cells = (48, 48, 8), (4, 4, 4)
    coords = np.indices(shape)[0] / shape[0]
    classes = rng.integers(0, 2, shape)
    means = np.array([100.0, 200.0])
    weights, m, covariances = _params(means, [4, 4])
    coarse = bias.coarse_shape(shape, cells)
    sigma = (1.0, 1.0, 1.0)

    def agreement(image):
        zero = np.zeros((1, *coarse))
        block = _em_block(image[..., None], np.ones(shape, bool), (0, 0, 0), zero, cells,
                          weights, m, covariances)  # fmt: skip
        _, sums = bias.combine_em_blocks([block], coarse)
        per_class = bias.class_sums(sums, m)
        return bias.class_agreement(per_class, sums[4], np.array([625.0, 2500.0]), sigma)

    noise = rng.normal(1, 0.02, shape)
    field = np.exp(0.2 * coords)  # multiplies both classes
    r, pair = agreement(means[classes] * field * noise)
    assert pair == (0, 1) and r > 0.9
    # each class brighter in its own region (anatomy): the two patterns are unrelated
    other = np.indices(shape)[1] / shape[1]
    anatomy = np.where(classes == 1, 1 + 0.1 * np.sin(2 * np.pi * coords),
                       1 + 0.1 * np.sin(2 * np.pi * other))  # fmt: skip
    r, _ = agreement(means[classes] * anatomy * noise)
    assert abs(r) < 0.2


def test_a_uniform_image_keeps_the_plain_result():
    """No non-uniformity: the field is not applied and the result is the plain mixture's."""
    image, truth, _ = make_head_phantom((40, 44, 36), noise=3.0, seed=2)
    mask = np.isin(truth, BRAIN)
    plain = segment_array(image, mask, n_components=3)
    with pytest.warns(DataWarning, match="bias field not applied"):
        fitted = segment_array(image, mask, n_components=3, bias_field=True)
    assert fitted.estimator.bias_status_.startswith("not applied")
    np.testing.assert_array_equal(fitted.labels, plain.labels)
    np.testing.assert_allclose(fitted.estimator.means_, plain.estimator.means_, rtol=1e-9)
    assert np.all(fitted.bias_field == 1.0)
    model = fitted.sidecar()["model"]
    record = model["bias_field"]
    assert record["status"].startswith("not applied") and record["range"] == [1.0, 1.0]
    assert any("bias field not applied" in w for w in model["warnings"])
    assert "warnings" in plain.sidecar()["model"] and not plain.sidecar()["model"]["warnings"]
