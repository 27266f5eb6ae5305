"""The pure functions of the realistic benchmark (benchmarks/phantoms.py, realistic.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import phantoms  # noqa: E402
import realistic  # noqa: E402


def test_block_mean_averages_blocks_and_drops_odd_slices():
    a = np.arange(7 * 8 * 9, dtype=np.float32).reshape(7, 8, 9)
    out = phantoms.block_mean(a, 2)
    assert out.shape == (3, 4, 4)
    assert out[1, 2, 3] == pytest.approx(a[2:4, 4:6, 6:8].mean())


def test_crisp_to_fractions_counts_eighths_summing_to_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 8, 10))
    f = phantoms.crisp_to_fractions(labels)
    assert f.shape == (3, 3, 4, 5)
    np.testing.assert_allclose(f.sum(axis=0), 1.0)
    assert f[2, 1, 2, 3] == pytest.approx((labels[2:4, 4:6, 6:8] == 2).mean())


def test_upsample2_linear_interpolates_quarter_positions():
    a = np.array([0.0, 4.0, 8.0])
    out = phantoms._upsample2_linear(a, 0)
    np.testing.assert_allclose(out, [0.0, 1.0, 3.0, 5.0, 7.0, 8.0])


@pytest.mark.parametrize("make", [phantoms.smooth_random_field, phantoms.coil_field])
@pytest.mark.parametrize("p2p", [0.2, 0.4])
def test_fields_have_the_asked_range_and_unit_geometric_mean(make, p2p):
    shape = (30, 34, 26)
    mask = np.zeros(shape, bool)
    mask[5:25, 6:28, 4:22] = True
    field = make(shape, (2.0, 2.0, 2.0), p2p, 3, mask)
    inside = field[mask]
    assert inside.max() / inside.min() - 1 == pytest.approx(p2p, rel=1e-4)
    assert np.exp(np.log(inside).mean()) == pytest.approx(1.0, rel=1e-5)


def test_smooth_random_field_is_not_a_low_order_polynomial():
    # a 180 mm head at 2 mm: the bias-field model's cubic leaves most of the field unexplained
    shape = (90, 90, 90)
    field = np.log(phantoms.smooth_random_field(shape, (2.0, 2.0, 2.0), 0.4, 0))
    x, y, z = (c.ravel() / 90.0 for c in np.indices(shape))
    powers = [(i, j, k) for i in range(4) for j in range(4) for k in range(4) if i + j + k <= 3]
    basis = np.stack([x**i * y**j * z**k for i, j, k in powers], axis=1)
    coef, *_ = np.linalg.lstsq(basis, field.ravel(), rcond=None)
    residual = field.ravel() - basis @ coef
    assert residual.std() > 0.3 * field.std()


def test_add_noise_has_the_asked_sd():
    image = np.ones((40, 40, 40), np.float32)
    noisy = phantoms.add_noise(image, 5.0, 1.0, seed=0)
    assert (noisy - image).std() == pytest.approx(0.05, rel=0.02)
    assert np.array_equal(noisy, phantoms.add_noise(image, 5.0, 1.0, seed=0))


def test_dice_per_class_and_fraction_metrics():
    truth = np.array([1, 1, 2, 2, 3, 3])
    labels = np.array([1, 2, 2, 2, 3, 1])
    assert realistic.dice_per_class(labels, truth) == pytest.approx([0.5, 0.8, 2 / 3])
    true = np.array([[1.0, 0.0], [0.5, 0.5]])
    est = np.array([[0.8, 0.2], [0.5, 0.5]])
    mae, vol = realistic.fraction_metrics(est, true)
    assert mae == pytest.approx([0.1, 0.1])
    assert vol == pytest.approx([-100 * 0.2 / 1.5, 100 * 0.2 / 0.5])


def test_case_names_parse():
    assert realistic._parse_case("pv-n3-f20") == ("pv", 3.0, 20.0)
    assert realistic._parse_case("t1-f40") == ("t1", 0.0, 40.0)
    assert realistic._parse_case("t1") == ("t1", 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown case"):
        realistic._parse_case("brainweb")
