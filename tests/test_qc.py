"""Tests for segment.qc: the QC picture is a valid, reasonably sized PNG."""

from __future__ import annotations

import numpy as np
import pytest

from segment.qc import write_qc


def _phantom(rng, shape):
    """Concentric classes 1..3 with intensities 100/200/300 on a 0 background."""
    grid = np.indices(shape)
    centre = [(s - 1) / 2 for s in shape]
    radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    r_max = min(shape) / 2
    labels = np.select(
        [radius < r_max * 0.3, radius < r_max * 0.6, radius < r_max * 0.9], [3, 2, 1]
    )
    image = np.array([0.0, 100.0, 200.0, 300.0])[labels] + rng.normal(0, 15, size=shape)
    return image.astype(np.float32), labels


PARAMS = dict(
    means=np.array([[100.0], [200.0], [300.0]]),
    covariances=np.full((3, 1, 1), 225.0),
    weights=np.array([0.5, 0.3, 0.2]),
)


def _read_png(path):
    import skimage.io

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return skimage.io.imread(path)


@pytest.mark.parametrize("shape", [(40, 50), (7, 8, 9), (30, 34, 26)])
def test_write_qc_png(tmp_path, rng, shape):
    image, labels = _phantom(rng, shape)
    out = write_qc(tmp_path / "scan_qc.png", image, labels, **PARAMS, title="scan")
    assert out == tmp_path / "scan_qc.png"
    picture = _read_png(out)
    assert picture.ndim == 3 and picture.shape[-1] in (3, 4)
    assert 250 <= picture.shape[0] <= 1500
    assert picture.shape[1] >= 600
    assert picture[..., :3].std() > 10  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["scan_qc.png"]


def test_write_qc_channels_mask_zooms_and_single_slice(tmp_path, rng):
    image, labels = _phantom(rng, (20, 22, 1))
    channels = np.stack([image, -image], axis=-1)
    mask = labels > 0
    means = np.array([[100.0, -100.0], [200.0, -200.0], [300.0, -300.0]])
    covariances = np.tile(np.eye(2) * 225.0, (3, 1, 1))
    out = write_qc(
        tmp_path / "q.png",
        channels,
        labels,
        means=means,
        covariances=covariances,
        weights=PARAMS["weights"],
        mask=mask,
        zooms=(1.0, 1.0, 3.0),
    )
    assert _read_png(out).shape[0] > 200


def test_write_qc_accepts_diagonal_and_no_labels(tmp_path, rng):
    image, labels = _phantom(rng, (7, 8, 9))
    write_qc(
        tmp_path / "a.png",
        image,
        np.zeros_like(labels),
        means=PARAMS["means"],
        covariances=np.full((3, 1), 225.0),
        weights=PARAMS["weights"],
    )
    assert _read_png(tmp_path / "a.png").size > 0


def test_write_qc_is_deterministic(tmp_path, rng):
    image, labels = _phantom(rng, (7, 8, 9))
    a = write_qc(tmp_path / "a.png", image, labels, **PARAMS).read_bytes()
    b = write_qc(tmp_path / "b.png", image, labels, **PARAMS).read_bytes()
    assert a == b


def test_write_qc_bad_shapes(tmp_path, rng):
    image, labels = _phantom(rng, (7, 8, 9))
    with pytest.raises(ValueError, match="does not match labels shape"):
        write_qc(tmp_path / "q.png", image[:, :, :5], labels, **PARAMS)
    with pytest.raises(ValueError, match="disagree on K"):
        write_qc(tmp_path / "q.png", image, labels, **{**PARAMS, "weights": np.ones(2) / 2})
    assert list(tmp_path.iterdir()) == []


def test_write_qc_draws_three_slices_whatever_the_volume(tmp_path, rng):
    """The picture has the same size for a 10^3 and a 100^3 volume: only slices are drawn
    (its cost is measured in the sidecar's ``qc_s`` and the benchmarks, not asserted here)."""
    from PIL import Image

    image, labels = _phantom(rng, (100, 100, 100))
    write_qc(tmp_path / "small.png", image[:10, :10, :10], labels[:10, :10, :10], **PARAMS)
    write_qc(tmp_path / "big.png", image, labels, **PARAMS)
    with Image.open(tmp_path / "small.png") as small, Image.open(tmp_path / "big.png") as big:
        assert small.size == big.size


def test_write_qc_leaves_pyplot_backend_alone(tmp_path, rng):
    import matplotlib

    before = matplotlib.get_backend()
    image, labels = _phantom(rng, (12, 14))
    write_qc(tmp_path / "q.png", image, labels, **PARAMS)
    assert matplotlib.get_backend() == before


def test_outline_overlay_pixels_are_the_legend_colours():
    from segment.qc import _palette, outline_overlay

    labels = np.zeros((12, 14), dtype=np.intp)
    labels[2:10, 2:7] = 1
    labels[2:10, 7:12] = 2
    grey = np.linspace(0.0, 1.0, labels.size).reshape(labels.shape)
    palette = _palette(2)
    rgb = outline_overlay(grey, labels, (0.0, 1.0), palette)
    colours = np.round(palette[:, :3] * 255).astype(np.uint8)
    for k in (1, 2):
        region = labels == k
        coloured = np.all(rgb == colours[k], axis=-1)
        assert coloured[region].any()
        assert not coloured[labels == 0].any()  # label 0 is never painted
        assert not coloured[4:8, 3:5].any() if k == 1 else True  # interior left grey
    # interior pixels show the image, in grey levels
    assert rgb[5, 4, 0] == rgb[5, 4, 1] == rgb[5, 4, 2]


def test_written_png_shows_the_exact_legend_colours_names_and_directions(tmp_path, rng):
    import skimage.io

    from segment.qc import _palette

    labels = np.zeros((20, 22, 18), dtype=np.uint8)
    labels[3:17, 3:19, 3:15] = 1
    labels[7:13, 7:15, 6:12] = 2
    image = labels * 100.0 + rng.normal(0, 5, labels.shape)
    path = write_qc(
        tmp_path / "qc.png", image, labels, means=[[100.0], [200.0]],
        covariances=[[[25.0]], [[25.0]]], weights=[0.5, 0.5], names=["grey", "bright"],
        affine=np.diag([-1.0, 1.0, 1.0, 1.0]),
    )  # fmt: skip
    pixels = skimage.io.imread(path)[..., :3].reshape(-1, 3)
    for colour in np.round(_palette(2)[1:, :3] * 255).astype(np.uint8):
        assert np.all(pixels == colour, axis=1).sum() >= 20


def test_direction_marks_follow_the_affine():
    from segment.qc import _directions

    assert _directions(np.diag([-1.0, 1.0, 1.0, 1.0]), 3) == [("R", "L"), ("P", "A"), ("I", "S")]
    swapped = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    assert _directions(swapped, 3) == [("P", "A"), ("I", "S"), ("L", "R")]
    assert _directions(None, 3)[0] == ("x-", "x+")
