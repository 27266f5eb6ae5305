"""Tests of the kernel layer (:mod:`segment._kernels`): the compiled C loops against their numpy
twins, the fallback when the C extension is missing, and that every module imports."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segment
from segment import PerformanceWarning, _em, _kernels, _spatial, segment_array

SAMPLE_HEAD = Path(__file__).resolve().parents[1] / "sample_scans" / "head_t1.nii.gz"

needs_compiled = pytest.mark.skipif(
    _kernels.compiled is None, reason=f"compiled kernels off: {_kernels.why_not_compiled}"
)


def test_every_module_imports():
    """Every module of the installed package imports (its imports are declared dependencies)."""
    names = [info.name for info in pkgutil.walk_packages(segment.__path__, "segment.")]
    assert {"segment._kernels", "segment.cli", "segment.qc", "segment.io"} <= set(names)
    for name in names:
        if name != "segment.__main__":  # that one runs the command line when imported
            importlib.import_module(name)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_kernels, "compiled", None)
    monkeypatch.setattr(_kernels, "why_not_compiled", "a test")
    monkeypatch.setattr(_kernels, "_notified", False)
    with pytest.warns(PerformanceWarning, match="compiled kernels are off .a test.: running on"):
        _kernels.notify_if_slow()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _kernels.notify_if_slow()  # the second time: silent


def test_disable_variable_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(_kernels.DISABLE_VARIABLE, "1")
    assert _kernels._load() == (None, "SEGMENT_NO_COMPILED is set")
    monkeypatch.setenv(_kernels.DISABLE_VARIABLE, "0")
    module, why = _kernels._load()  # "0" does not turn them off: loaded if built
    assert (module is None) == (importlib.util.find_spec("segment._estep") is None)


@needs_compiled
def test_compiled_constants_match_the_python_side():
    assert _kernels.compiled.SWEEP_NEGLIGIBLE == _kernels.NEGLIGIBLE


def sweep_inputs(rng, shape, n_features, n_components=3):
    mask = rng.random(shape) > 0.25
    previous = rng.integers(0, 256, shape + (n_components + 1,)).astype(np.uint8)
    previous[: shape[0] // 2, ..., -1] = 0  # voxels whose neighbours did not move
    previous[~mask] = 0
    intensities = rng.normal(100.0, 30.0, shape + (n_features,)).astype(np.float32)
    log_bias = rng.normal(0.0, 0.1, shape + (n_features,)).astype(np.float32)
    weights = rng.dirichlet(np.ones(n_components))
    means = rng.normal(100.0, 30.0, (n_components, n_features))
    covariances = np.stack([np.eye(n_features) * v for v in (200.0, 400.0, 900.0)])
    if n_features > 1:
        covariances[:, 0, 1] = covariances[:, 1, 0] = 50.0
    params = (weights, means, _em.precision_cholesky(covariances))
    return previous, intensities, mask, log_bias, params


@needs_compiled
@pytest.mark.parametrize(
    "shape, n_features, beta, halo",
    [((7, 9, 8), 1, 0.3, (1, 1)), ((6, 5, 7), 2, 0.2, (0, 1)), ((9, 11), 1, 0.5, (1, 0)),
     ((5, 6, 4), 3, 0.0, (0, 0))],
)  # fmt: skip
def test_compiled_sweep_equals_its_numpy_twin(rng, monkeypatch, shape, n_features, beta, halo):
    """All modes of the C sweep against the numpy twin: the same numbers to the bit."""
    previous, intensities, mask, log_bias, params = sweep_inputs(rng, shape, n_features)
    kernel = _spatial.neighbour_kernel((1.0, 1.3, 2.0)[: len(shape)])
    n_computed = shape[0] - halo[0] - halo[1]

    def run():
        args = (previous, intensities, mask, log_bias, *params, beta, kernel)
        state = _spatial.mean_field_sweep(*args, halo=halo)
        settled = _spatial.mean_field_sweep(*args, halo=halo, skip_settled=True)
        final = _spatial.mean_field_sweep(*args, final=True, halo=halo)
        # into strided views of larger arrays, as PosteriorGrid writes them
        big = np.zeros(shape[::-1] + (3,), np.float32)
        reversed_maps = big[..., ::-1][..., ::-1]
        labels = np.zeros(shape[::-1] + (2,), np.uint8)[..., 0]
        sums = _spatial.mean_field_final(
            previous, intensities, mask, log_bias, params, beta, kernel, halo=halo,
            probabilities=reversed_maps, labels=labels,
        )  # fmt: skip
        by_component = np.zeros((3, n_computed) + shape[1:], np.float32)
        component_labels = np.zeros((n_computed,) + shape[1:], np.uint8)
        rows = (1, shape[1] - 1)
        computed = (slice(halo[0], shape[0] - halo[1]), slice(*rows))
        component_sums = _spatial.mean_field_final(
            previous, intensities[computed], mask, log_bias[computed], params, beta, kernel,
            halo=halo, rows=rows, probabilities=by_component, labels=component_labels,
        )  # fmt: skip
        return (state, settled, final, big, labels, sums, by_component, component_labels,
                component_sums)  # fmt: skip

    compiled = run()
    monkeypatch.setattr(_kernels, "compiled", None)
    twin = run()
    for name, a, b in zip("state settled final maps labels sums by_component".split(), compiled,
                          twin):  # fmt: skip
        if name.endswith("sums"):
            np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    state, settled, final, maps, labels = compiled[:5]
    inside = mask.copy()
    inside[: halo[0]] = False
    inside[shape[0] - halo[1] :] = False
    assert final[inside].sum(axis=-1) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(np.moveaxis(maps, -1, 0).T.reshape(final.shape), final)
    np.testing.assert_array_equal(labels.T.reshape(mask.shape), np.where(
        inside, final.argmax(axis=-1) + 1, 0))  # fmt: skip
    if beta > 0:  # skip_settled kept the state of voxels whose neighbours did not move
        assert (settled != state).any()


@needs_compiled
def test_compiled_sweep_refuses_wrong_buffers(rng):
    previous, intensities, mask, log_bias, params = sweep_inputs(rng, (4, 5, 6), 1)
    weights, means, precisions_chol = params
    offsets, offset_weights = np.zeros((1, 3), np.int64), np.ones(1)
    state = np.zeros((4, 5, 6, 4), np.uint8)
    none_f, none_u = np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1), np.uint8)

    def call(**changes):
        args = dict(
            previous=previous, corrected=intensities, mask=mask, offsets=offsets,
            offset_weights=offset_weights, means=means, precisions_chol=precisions_chol,
            log_norm=np.zeros(3), log_weights=np.log(weights), prior_scale=0.1, i0=0, i1=4,
            j0=0, j1=5, mode=0, skip_settled=0, state_out=state, final_out=none_f,
            labels_out=none_u, counts=np.zeros(3),
        )  # fmt: skip
        args.update(changes)
        _kernels.compiled.mean_field_rows(*args.values())

    call()  # the right buffers
    assert state.any()
    with pytest.raises(TypeError, match="previous"):
        call(previous=previous.astype(np.int16))
    with pytest.raises(TypeError, match="corrected"):
        call(corrected=intensities.astype(np.float64))
    with pytest.raises(ValueError, match="corrected needs"):
        call(i1=3)
    with pytest.raises(ValueError, match="0 <= i0"):
        call(i1=5, corrected=np.zeros((5, 5, 6, 1), np.float32))
    with pytest.raises(ValueError, match="state_out"):
        call(state_out=np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="final_out"):
        call(mode=1, final_out=np.zeros((4, 5, 6, 2), np.float32))
    with pytest.raises(ValueError, match="mode"):
        call(mode=7)
    with pytest.raises(TypeError, match="state_out"):
        call(state_out=np.zeros((4, 5, 6, 4), np.uint8)[::-1].copy().view(np.int8))


def interpolation_inputs(rng, coarse_shape, shape, n_features):
    """Random coarse values and random taps (lower cell, weights) per axis."""
    coarse = rng.normal(0.0, 0.3, coarse_shape + (n_features,))
    lows = [rng.integers(0, c - 1, n) for c, n in zip(coarse_shape, shape)]
    t = [rng.random(n) for n in shape]
    weights = [np.stack([1.0 - ti, ti], axis=1) for ti in t]
    return coarse, lows, weights


@needs_compiled
@pytest.mark.parametrize(
    "coarse_shape, shape, n_features",
    [((2, 3, 5), (7, 1, 9), 1), ((4, 2, 3), (3, 5, 11), 2), ((3, 6), (13, 5), 1),
     ((5, 4), (1, 7), 3), ((2, 2, 2), (1, 1, 1), 1)],
)  # fmt: skip
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_interpolation_equals_its_numpy_twin(
    rng, monkeypatch, coarse_shape, shape, n_features, reverse
):
    coarse, lows, weights = interpolation_inputs(rng, coarse_shape, shape, n_features)
    compiled = _kernels.interpolate_field(coarse, lows, weights, reverse)
    monkeypatch.setattr(_kernels, "compiled", None)
    twin = _kernels.interpolate_field(coarse, lows, weights, reverse)
    assert compiled.dtype == twin.dtype == np.float32
    assert compiled.shape == twin.shape == (shape[::-1] if reverse else shape) + (n_features,)
    np.testing.assert_allclose(compiled, twin, rtol=1e-6, atol=1e-7)


@needs_compiled
def test_compiled_interpolation_refuses_wrong_buffers(rng):
    coarse, lows, weights = interpolation_inputs(rng, (3, 4, 5), (2, 3, 4), 1)
    out = np.zeros((2, 3, 4, 1), np.float32)

    def call(**changes):
        args = dict(coarse=coarse, low0=lows[0], w0=weights[0], low1=lows[1], w1=weights[1],
                    low2=lows[2], w2=weights[2], out=out, reverse=False)  # fmt: skip
        args.update(changes)
        _kernels.compiled.interpolate_field(*args.values())

    call()  # the right buffers
    assert out.any()
    with pytest.raises(ValueError, match="low_a must be"):
        call(low1=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="out needs"):
        call(reverse=True)
    with pytest.raises(ValueError, match="w_a needs"):
        call(w2=weights[2][:3])
    with pytest.raises(TypeError, match="out"):
        call(out=out.astype(np.float64))


def table_inputs(rng, n_classes, n_points, n_voxels):
    """A random table of 2 K - 1 log-likelihoods and K - 1 shares, intensities beyond it."""
    n_rows = 3 * n_classes - 2
    values = np.empty((n_rows, n_points))
    values[: 2 * n_classes - 1] = rng.normal(-5.0, 20.0, (2 * n_classes - 1, n_points))
    values[2 * n_classes - 1 :] = rng.random((n_classes - 1, n_points))
    slopes = np.diff(values, axis=1, append=values[:, -1:])
    x = rng.uniform(-0.3, 1.3, n_voxels)  # the grid covers [0, 1]: some are clipped
    posterior = rng.dirichlet(np.ones(n_classes), n_voxels)
    posterior[: n_voxels // 7] = np.eye(n_classes)[rng.integers(0, n_classes, n_voxels // 7)]
    return x, values, slopes, posterior


@needs_compiled
@pytest.mark.parametrize(
    "n_classes, n_points, n_voxels", [(3, 4096, 1001), (2, 17, 300), (5, 2, 257), (4, 1, 9)]
)
@pytest.mark.parametrize("prior", [None, np.float32, np.float64])
def test_compiled_table_fractions_equal_their_numpy_twin(
    rng, monkeypatch, n_classes, n_points, n_voxels, prior
):
    x, values, slopes, posterior = table_inputs(rng, n_classes, n_points, n_voxels)
    posterior = None if prior is None else posterior.astype(prior)
    step = 1.0 / max(n_points - 1, 1)
    args = (x, values, slopes, 0.0, step, posterior, 0.05, n_classes)
    compiled = _kernels.table_fractions(*args)
    monkeypatch.setattr(_kernels, "compiled", None)
    twin = _kernels.table_fractions(*args)
    assert compiled.dtype == twin.dtype == np.float32
    assert compiled.shape == twin.shape == (n_voxels, n_classes)
    np.testing.assert_allclose(compiled, twin, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(compiled.sum(1), 1.0, atol=1e-6)


@needs_compiled
def test_compiled_table_fractions_refuse_wrong_buffers(rng):
    x, values, slopes, posterior = table_inputs(rng, 3, 16, 20)
    out = np.zeros((20, 3), np.float32)

    def call(**changes):
        args = dict(x=x, values=values, slopes=slopes, x0=0.0, step=0.1,
                    posterior=posterior.astype(np.float32), floor=0.05, out=out)  # fmt: skip
        args.update(changes)
        _kernels.compiled.table_fractions(*args.values())

    call()  # the right buffers
    assert out.any()
    with pytest.raises(ValueError, match="3 K - 2 rows"):
        call(values=values[:-1].copy())
    with pytest.raises(ValueError, match="posterior needs"):
        call(posterior=posterior[:5].astype(np.float32))
    with pytest.raises(ValueError, match="step"):
        call(step=0.0)
    with pytest.raises(TypeError, match="x"):
        call(x=x.astype(np.float32))


def pve_em_inputs(rng, n_classes, n_steps, n_bins):
    """A histogram of a mixture of classes and their mixels, and a start near it."""
    centres = np.sort(rng.uniform(0.2, 1.0, n_classes))
    values = np.concatenate([rng.normal(c, 0.04, 2000) for c in centres] + [
        rng.uniform(centres[k], centres[k + 1], 500) for k in range(n_classes - 1)])  # fmt: skip
    counts, edges = np.histogram(values, bins=n_bins)
    x = 0.5 * (edges[:-1] + edges[1:])
    mu = centres + rng.normal(0.0, 0.01, n_classes)
    var = np.full(n_classes, 0.003)
    weights = np.full(2 * n_classes - 1, 1.0 / (2 * n_classes - 1))
    f = (np.arange(n_steps) + 0.5) / n_steps
    return x, counts.astype(np.float64), f, mu, var, weights


@needs_compiled
@pytest.mark.parametrize("n_classes, n_steps, n_bins", [(3, 20, 256), (2, 1, 31), (4, 7, 97)])
@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_compiled_pve_em_equals_its_numpy_twin(rng, monkeypatch, n_classes, n_steps, n_bins, tol):
    args = (*pve_em_inputs(rng, n_classes, n_steps, n_bins), 1e-6, 40, tol)
    mu, var, weights, trace = _kernels.pve_em_1d(*args)
    monkeypatch.setattr(_kernels, "compiled", None)
    twin_mu, twin_var, twin_weights, twin_trace = _kernels.pve_em_1d(*args)
    assert len(trace) == len(twin_trace) <= 40
    assert (len(trace) < 40) == (tol > 0)
    np.testing.assert_allclose(trace, twin_trace, rtol=1e-12)
    np.testing.assert_allclose(mu, twin_mu, rtol=1e-11)
    np.testing.assert_allclose(var, twin_var, rtol=1e-10)
    np.testing.assert_allclose(weights, twin_weights, rtol=1e-10, atol=1e-15)


@needs_compiled
def test_compiled_pve_em_keeps_a_class_of_weight_zero_at_zero(rng, monkeypatch):
    x, w, f, mu, var, weights = pve_em_inputs(rng, 3, 5, 64)
    weights[3] = 0.0  # the mixel of classes 1 and 2
    fitted = _kernels.pve_em_1d(x, w, f, mu, var, weights, 1e-6, 10, 0.0)
    assert fitted[2][3] == 0.0 and np.isfinite(fitted[3]).all()
    monkeypatch.setattr(_kernels, "compiled", None)
    twin = _kernels.pve_em_1d(x, w, f, mu, var, weights, 1e-6, 10, 0.0)  # no divide warning
    np.testing.assert_allclose(fitted[0], twin[0], rtol=1e-11)


@needs_compiled
def test_compiled_pve_em_refuses_wrong_buffers(rng):
    x, w, f, mu, var, weights = pve_em_inputs(rng, 3, 5, 20)

    def call(**changes):
        args = dict(x=x, w=w, f=f, mu=mu.copy(), var=var.copy(), weight=weights.copy(),
                    floor=1e-6, max_iter=5, tol=0.0, trace=np.zeros(5))  # fmt: skip
        args.update(changes)
        return _kernels.compiled.pve_em_1d(*args.values())

    assert call() == 5
    with pytest.raises(ValueError, match="2 K - 1 weights"):
        call(weight=weights[:-1].copy())
    with pytest.raises(ValueError, match="trace needs"):
        call(trace=np.zeros(4))
    with pytest.raises(TypeError, match="mu"):
        call(mu=mu.astype(np.float32))


@needs_compiled
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_twin(rng, dtype, monkeypatch):
    x = rng.normal(1000.0, 50.0, 10_001).astype(dtype)
    compiled = _kernels.moments_1d(x)
    monkeypatch.setattr(_kernels, "compiled", None)
    np.testing.assert_allclose(_kernels.moments_1d(x), compiled, rtol=1e-12)
    x[5] = np.nan
    assert np.isnan(_kernels.moments_1d(x)[:2]).all()


# ------------------------------------------------------------------ the fallback end to end
@pytest.fixture(scope="module")
def sample_head():
    return np.asarray(nib.load(SAMPLE_HEAD).dataobj, dtype=np.float32)


def segment_both_ways(image, options):
    """The segmentation with the compiled kernels and with the numpy twins only."""
    compiled = segment_array(image, n_components=3, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_kernels, "compiled", None)
        patch.setattr(_kernels, "_notified", True)  # the notice has its own test
        twin = segment_array(image, n_components=3, **options)
    return compiled, twin


CASES = {"plain": {}, "mrf": {"mrf_beta": 0.2}, "bias-field": {"bias_field": True}}


def assert_same_segmentation(compiled, twin):
    np.testing.assert_array_equal(compiled.labels, twin.labels)
    np.testing.assert_allclose(compiled.responsibilities, twin.responsibilities, atol=1e-5)
    np.testing.assert_allclose(compiled.estimator.means_, twin.estimator.means_, rtol=1e-9)
    assert compiled.estimator.n_iter_ == twin.estimator.n_iter_


@needs_compiled
@pytest.mark.parametrize("case", CASES)
def test_fallback_segments_a_head_like_the_compiled_kernels(sample_head, case):
    """The sample head at half resolution: the same labels with or without the C kernels."""
    compiled, twin = segment_both_ways(sample_head[::2, ::2, ::2], CASES[case])
    assert_same_segmentation(compiled, twin)


@pytest.mark.slow
@needs_compiled
@pytest.mark.parametrize("case", CASES)
def test_fallback_segments_the_sample_head_like_the_compiled_kernels(sample_head, case):
    compiled, twin = segment_both_ways(sample_head, CASES[case])
    assert_same_segmentation(compiled, twin)
