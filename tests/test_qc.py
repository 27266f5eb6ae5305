"""Tests for segment.qc: the QC picture is a valid, reasonably sized PNG."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from segment.qc import render_qc, write_qc


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


def test_write_qc_imports_no_plotting_library(tmp_path):
    """The picture is composed with numpy and the standard library: neither matplotlib nor
    Pillow is imported (importing Pillow alone cost about half of the picture's time)."""
    code = (
        "import sys, numpy as np; from segment.qc import write_qc; "
        "labels = np.indices((12, 14, 10))[0] % 3; "
        f"write_qc({str(tmp_path / 'q.png')!r}, labels * 100.0, labels, means=[[100.0], [200.0]], "
        "covariances=[[[25.0]], [[25.0]]], weights=[0.5, 0.5]); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
        "assert 'PIL' not in sys.modules, 'Pillow imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "q.png").stat().st_size > 0


def test_outline_overlay_pixels_are_the_legend_colours():
    from segment.qc import outline_overlay
    from segment.qc_plot import label_palette

    labels = np.zeros((12, 14), dtype=np.intp)
    labels[2:10, 2:7] = 1
    labels[2:10, 7:12] = 2
    grey = np.linspace(0.0, 1.0, labels.size).reshape(labels.shape)
    palette = label_palette(2)
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

    from segment.qc_plot import label_palette

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
    for colour in np.round(label_palette(2)[1:, :3] * 255).astype(np.uint8):
        assert np.all(pixels == colour, axis=1).sum() >= 20


def test_direction_marks_follow_the_affine():
    from segment.qc import _directions

    assert _directions(np.diag([-1.0, 1.0, 1.0, 1.0]), 3) == [("R", "L"), ("P", "A"), ("I", "S")]
    swapped = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    assert _directions(swapped, 3) == [("P", "A"), ("I", "S"), ("L", "R")]
    assert _directions(None, 3)[0] == ("x-", "x+")


def _two_classes(rng, shape=(20, 22, 18)):
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:17, 3:19, 3:15] = 1
    labels[7:13, 7:15, 6:12] = 2
    image = labels * 100.0 + rng.normal(0, 5, labels.shape)
    fit = dict(means=[[100.0], [200.0]], covariances=[[[25.0]], [[25.0]]], weights=[0.8, 0.2])
    return image, labels, fit


def _crop(picture, box):
    x0, y0, x1, y1 = box
    return picture[y0:y1, x0:x1]


def test_panel_pixels_that_are_not_grey_are_exactly_the_legend_swatches(rng):
    image, labels, fit = _two_classes(rng)
    picture, layout = render_qc(image, labels, **fit, affine=np.eye(4))
    swatches = [tuple(_crop(picture, box)[2, 2]) for box in layout["swatches"]]
    assert len(set(swatches)) == 2
    assert swatches == [tuple(c) for c in np.round(_palette_rgb(2)).astype(int)]
    covered = np.zeros(picture.shape[:2], dtype=bool)
    for marks in layout["marks"]:  # direction letters (yellow, black border) are not overlay
        for _, (x0, y0, x1, y1) in marks:
            covered[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True
    for box in layout["panels"]:
        panel = _crop(picture, box).reshape(-1, 3)
        free = ~_crop(covered, box).ravel()
        coloured = panel[free & ~((panel[:, 0] == panel[:, 1]) & (panel[:, 1] == panel[:, 2]))]
        assert len(coloured) > 0
        assert {tuple(c) for c in coloured} <= set(swatches)
        for swatch in swatches:  # every class of this slice is outlined in its legend colour
            assert np.all(coloured == swatch, axis=1).sum() >= 10


def _palette_rgb(k):
    from segment.qc_plot import label_palette

    return label_palette(k)[1:, :3] * 255


def test_class_names_are_written_in_the_legend(rng):
    image, labels, fit = _two_classes(rng)
    plain, layout = render_qc(image, labels, **fit)
    named, named_layout = render_qc(image, labels, **fit, names=["grey matter", "white matter"])
    legend = layout["legend"]
    assert named_layout["swatches"] == layout["swatches"]
    assert not np.array_equal(_crop(plain, legend), _crop(named, named_layout["legend"]))
    for box in layout["panels"]:  # only the legend changes
        assert np.array_equal(_crop(plain, box), _crop(named, box))


def test_orientation_letters_follow_the_affine(rng):
    image, labels, fit = _two_classes(rng)
    las, las_layout = render_qc(image, labels, **fit, affine=np.diag([-1.0, 1.0, 1.0, 1.0]))
    ras, ras_layout = render_qc(image, labels, **fit, affine=np.eye(4))
    # the z panel (axial): x runs left to right, y bottom to top
    assert [m for m, _ in ras_layout["marks"][2]] == ["L", "R", "P", "A"]
    assert [m for m, _ in las_layout["marks"][2]] == ["R", "L", "P", "A"]
    assert [m for m, _ in ras_layout["marks"][0]] == ["P", "A", "I", "S"]
    for letter, box in ras_layout["marks"][2]:
        drawn = _crop(ras, box).astype(int)
        yellow = (drawn[..., 0] > 200) & (drawn[..., 1] > 200) & (drawn[..., 2] < 80)
        assert yellow.sum() >= 3, letter
        if letter in "LR":  # L and R swap places when the x axis flips
            assert not np.array_equal(drawn, _crop(las, box))
    picture, layout = render_qc(image, labels, **fit)  # no affine: voxel axes
    assert [m for m, _ in layout["marks"][2]] == ["x-", "x+", "y-", "y+"]


def test_log_histogram_shows_a_small_class(rng):
    labels = np.ones((30, 30, 30), dtype=np.uint8)
    labels[:3, :3] = 2  # 1 % of the voxels
    image = np.where(labels == 1, 100.0, 300.0) + rng.normal(0, 5, labels.shape)
    fit = dict(means=[[100.0], [300.0]], covariances=[[[25.0]], [[25.0]]], weights=[0.99, 0.01])
    linear, layout = render_qc(image, labels, **fit)
    log, log_layout = render_qc(image, labels, **fit, log_histogram=True)
    assert layout["plot"] == log_layout["plot"]
    bars = [np.all(_crop(p, layout["plot"]) == 190, axis=-1).sum() for p in (linear, log)]
    assert bars[1] > 2 * bars[0]  # the small class's bars are tall on a log axis
    for box in layout["panels"]:
        assert np.array_equal(_crop(linear, box), _crop(log, box))


def test_two_dimensional_image_has_one_panel_without_direction_letters(rng):
    image, labels = _phantom(rng, (40, 50))
    picture, layout = render_qc(image, labels, **PARAMS, names=["a", "b", "c"])
    assert len(layout["panels"]) == 1
    assert layout["marks"] == [[]]
    x0, y0, x1, y1 = layout["panels"][0]
    assert (x1 - x0) / (y1 - y0) == pytest.approx(50 / 40, rel=0.02)  # square pixels
    assert len(layout["swatches"]) == 3
    assert picture.dtype == np.uint8 and picture.shape[-1] == 3


def test_render_is_deterministic_and_matches_the_file(tmp_path, rng):
    from PIL import Image

    image, labels, fit = _two_classes(rng)
    a, _ = render_qc(image, labels, **fit, log_histogram=True, title="t")
    b, _ = render_qc(image, labels, **fit, log_histogram=True, title="t")
    assert np.array_equal(a, b)
    path = write_qc(tmp_path / "q.png", image, labels, **fit, log_histogram=True, title="t")
    with Image.open(path) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), a)


def _nifti(rng, path):
    import nibabel as nib

    image, labels, _ = _two_classes(rng)
    nib.Nifti1Image(image.astype(np.float32), np.eye(4)).to_filename(path)
    return path


def _cli(*args):
    from click.testing import CliRunner

    from segment.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_qc_histogram_option_in_run_batch_and_pipelines(tmp_path, rng):
    import json

    scans = tmp_path / "scans"
    scans.mkdir()
    scan = _nifti(rng, scans / "scan.nii.gz")
    pictures = {}
    for axis in ("linear", "log"):
        result = _cli("run", scan, "-o", tmp_path / axis, "-k", "2", "--qc-histogram", axis, "-q")
        assert result.exit_code == 0, result.output
        pictures[axis] = (tmp_path / axis / "scan_qc.png").read_bytes()
        sidecar = json.loads((tmp_path / axis / "scan_segment.json").read_text())
        assert sidecar["final_options"]["qc_histogram"] == axis
    assert pictures["linear"] != pictures["log"]

    batch = ("batch", scans, "-o", tmp_path / "batch", "-k", "2", "--qc-histogram", "log")
    result = _cli(*batch, "--scheduler", "synchronous")  # in this process: no cluster to start
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch" / "scan_qc.png").read_bytes() == pictures["log"]

    pipeline = tmp_path / "log.toml"
    pipeline.write_text('description = "log QC"\n[model]\nn_components = 2\n'
                        '[outputs]\nqc_histogram = "log"\n')  # fmt: skip
    result = _cli("run", scan, "-o", tmp_path / "piped", "-p", pipeline, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "piped" / "scan_qc.png").read_bytes() == pictures["log"]

    pipeline.write_text(pipeline.read_text().replace('"log"', '"logarithmic"'))
    result = _cli("run", scan, "-o", tmp_path / "bad", "-p", pipeline, "-q")
    assert result.exit_code == 2 and "qc_histogram" in result.output
    assert not (tmp_path / "bad").exists()
    result = _cli("run", scan, "-o", tmp_path / "bad", "--qc-histogram", "cubic")
    assert result.exit_code == 2 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_integer_scans_use_value_counts_with_numpys_results(rng, dtype):
    from segment.qc_plot import percentiles, value_counts

    values = (rng.integers(0, 200, 10_001) - (0 if dtype == np.uint8 else 60)).astype(dtype)
    counts = value_counts(values)
    qs = [0.1, 1.0, 50.0, 99.0, 99.9]
    np.testing.assert_allclose(percentiles(counts, qs), np.percentile(values, qs))
    lo, hi = np.percentile(values, [0.1, 99.9])
    weighted = np.histogram(counts[0], 100, range=(lo, hi), weights=counts[1])[0]
    np.testing.assert_array_equal(weighted, np.histogram(values, 100, range=(lo, hi))[0])
    assert value_counts(values.astype(np.float32)) is None


def test_every_label_colour_is_distinct_and_not_grey():
    from segment.qc_plot import label_palette

    colours = np.round(label_palette(10)[1:, :3] * 255).astype(int)
    assert len({tuple(c) for c in colours}) == 10
    assert not any(c[0] == c[1] == c[2] for c in colours)  # greys are the slices' levels


@pytest.mark.parametrize("shape", [(7, 5), (6, 9, 3)])
def test_png_writer_decodes_to_the_same_pixels(rng, shape):
    """Palette and RGB PNGs from the standard-library writer read back (with Pillow, in the
    test only) as exactly the array written, and the same array gives the same bytes."""
    from PIL import Image

    from segment._png import png_bytes

    palette = rng.integers(0, 256, (200, 3)).astype(np.uint8)
    pixels = rng.integers(0, 200 if len(shape) == 2 else 256, shape).astype(np.uint8)
    data = png_bytes(pixels, palette if len(shape) == 2 else None)
    assert data == png_bytes(pixels, palette if len(shape) == 2 else None)
    with Image.open(io.BytesIO(data)) as png:
        assert png.mode == ("P" if len(shape) == 2 else "RGB")
        decoded = np.asarray(png.convert("RGB"))
    assert np.array_equal(decoded, palette[pixels] if len(shape) == 2 else pixels)


def test_embedded_font_is_pillows_bitmap_default_font():
    """Every printable ASCII glyph is the one Pillow's bitmap default font draws."""
    from PIL import Image, ImageDraw, ImageFont

    from segment._font import GLYPH_H, GLYPH_W, draw_text, text_mask

    font = ImageFont.load_default_imagefont()
    for code in range(32, 127):
        drawn = Image.new("L", (GLYPH_W + 4, GLYPH_H), 0)
        ImageDraw.Draw(drawn).text((0, 0), chr(code), fill=255, font=font)
        expected = np.asarray(drawn) > 0
        assert not expected[:, GLYPH_W:].any()
        assert np.array_equal(text_mask(chr(code)), expected[:, :GLYPH_W]), chr(code)
    canvas = np.full((20, 20, 3), 128, dtype=np.uint8)
    draw_text(canvas, 5, 4, "R", (255, 255, 0), (0, 0, 0))
    glyph = text_mask("R")
    assert np.all(canvas[4:15, 5:11][glyph] == (255, 255, 0))  # exact colour, no blending
    padded = np.pad(glyph, 1)
    border = np.zeros_like(padded)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            border |= np.roll(padded, (dy, dx), axis=(0, 1))
    around = canvas[3:16, 4:12]
    assert np.all(around[border & ~padded] == 0)  # a 1-pixel black border
    assert np.all(around[~border] == 128)  # nothing else touched
