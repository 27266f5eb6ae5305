"""Tests for segment.pipelines and the `--pipeline` / `segment pipelines` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segment.cli import cli
from segment.exceptions import InputError
from segment.pipelines import (
    DEFAULT_SETTINGS,
    class_names,
    list_pipelines,
    load_pipeline,
    preset_dirs,
    resolve_options,
)

PRESETS = ("microscopy-2class", "t1-brain-3class", "t1-head-6class")


@pytest.fixture
def two_phase_png(make_image, rng):
    image = np.full((23, 29), 60.0)
    image[:, 14:] = 190.0
    image += rng.normal(0, 6, image.shape)
    return make_image(np.clip(image, 0, 255).astype(np.uint8), "cells.png")


def write_pipeline(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ presets
def test_presets_are_listed_with_descriptions():
    presets = {p.name: p for p in list_pipelines()}
    assert set(PRESETS) <= set(presets)
    assert presets["t1-head-6class"].options["n_components"] == 6
    assert presets["t1-head-6class"].mask == "none"
    assert presets["t1-brain-3class"].options["n_components"] == 3
    assert presets["t1-brain-3class"].mask == "auto"
    assert presets["microscopy-2class"].options["n_components"] == 2
    assert presets["microscopy-2class"].outputs["qc"] is True
    for pipeline in presets.values():
        assert pipeline.description and "\n" not in pipeline.description
        assert len(pipeline.sha256) == 64
        assert len(pipeline.labels) == pipeline.options["n_components"]


def test_presets_come_from_the_repository_folder():
    assert preset_dirs()[0] == Path(__file__).resolve().parents[1] / "pipelines"


def test_cli_lists_pipelines():
    result = CliRunner().invoke(cli, ["pipelines"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in PRESETS:
        assert name in lines
    assert "six classes" in lines["t1-head-6class"]


def test_cli_shows_one_pipeline():
    result = CliRunner().invoke(cli, ["pipelines", "t1-brain-3class"])
    assert result.exit_code == 0, result.output
    assert "n_components = 3" in result.stdout
    assert "skull" in result.stdout  # the honest caveat about the auto mask


def test_load_by_path_and_relative_mask(tmp_path):
    path = write_pipeline(tmp_path, 'description = "x"\nmask = "masks/brain.nii.gz"\n')
    pipeline = load_pipeline(str(path))
    assert pipeline.name == "custom"
    assert pipeline.mask == str((tmp_path / "masks" / "brain.nii.gz").resolve())
    assert pipeline.record()["sha256"] == pipeline.sha256


@pytest.mark.parametrize("mask", ["{stem}_brainmask.nii.gz", "/masks/{rel}/{stem}.nii", "bids"])
def test_mask_templates_and_bids_are_kept_for_each_scan(tmp_path, mask):
    """Not made into a path next to the pipeline file: segment batch resolves them per scan."""
    path = write_pipeline(tmp_path, f'description = "x"\nmask = "{mask}"\n')
    assert load_pipeline(str(path)).mask == mask


# ------------------------------------------------------------------------------ precedence
def test_resolve_options_precedence():
    pipeline = load_pipeline("t1-brain-3class")
    settings, sources = resolve_options(pipeline, {"n_components": 4, "qc": False})
    assert settings["n_components"] == 4 and sources["n_components"] == "command line"
    assert settings["mask"] == "auto" and sources["mask"] == "pipeline"
    assert settings["qc"] is False and sources["qc"] == "command line"
    assert settings["variance_floor"] is None and sources["variance_floor"] == "default"
    assert resolve_options(None)[0] == DEFAULT_SETTINGS


def test_class_names_fall_back_when_k_is_overridden():
    pipeline = load_pipeline("t1-brain-3class")
    assert class_names(pipeline, 3) == ["csf", "grey matter", "white matter"]
    assert class_names(pipeline, 4) == ["class1", "class2", "class3", "class4"]


def test_run_with_pipeline_and_override(tmp_path, two_phase_png):
    preset = write_pipeline(
        tmp_path,
        'description = "two classes, no extras"\n[model]\nn_components = 2\nseed = 3\n'
        "[outputs]\nprobseg = false\nqc = false\n",
    )
    out = tmp_path / "out"
    args = ["run", str(two_phase_png), "-o", str(out), "--pipeline", str(preset), "-q"]
    result = CliRunner().invoke(cli, [*args, "--qc", "--max-iter", "50"])
    assert result.exit_code == 0, result.output
    assert (out / "cells_qc.png").exists()  # --qc overrides the preset
    assert not (out / "cells_probseg.tif").exists()  # the preset's probseg = false
    record = json.loads((out / "cells_segment.json").read_text())
    assert record["pipeline"]["name"] == "custom"
    assert record["pipeline"]["sha256"] == load_pipeline(preset).sha256
    final, sources = record["final_options"], record["option_sources"]
    assert final["n_components"] == 2 and sources["n_components"] == "pipeline"
    assert final["seed"] == 3 and final["max_iter"] == 50
    assert sources["max_iter"] == "command line" and sources["qc"] == "command line"
    assert record["model"]["n_components"] == 2 and record["model"]["max_iter"] == 50


def test_run_command_line_k_overrides_preset(tmp_path, two_phase_png):
    out = tmp_path / "out"
    args = ["run", str(two_phase_png), "-o", str(out), "-p", "microscopy-2class", "-k", "3"]
    result = CliRunner().invoke(cli, [*args, "-q", "--no-qc", "--no-probseg"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "cells_segment.json").read_text())
    assert record["model"]["n_components"] == 3
    assert record["pipeline"]["name"] == "microscopy-2class"


# ------------------------------------------------------------------------------ invalid files
INVALID = [
    ("description = 'x'\n[model\n", r"custom\.toml: not a valid TOML file"),
    ("[model]\nn_components = 3\n", r"key 'description': missing; expected a one-line string"),
    ('description = """two\nlines"""\n', r"key 'description': expected a one-line string"),
    ("description = 3\n", r"key 'description': expected a one-line string, got 3"),
    ('description = "x"\n[modle]\nk = 1\n', r"unknown section 'modle'; expected one of"),
    ('description = "x"\nname = "y"\n', r"unknown key 'name'; expected one of"),
    ('description = "x"\n[model]\nk = 3\n', r"unknown key 'model\.k'; expected one of bias_field"),
    (
        'description = "x"\n[model]\nn_components = "six"\n',
        r"key 'model\.n_components': expected an integer between 1 and 255, 'auto' or "
        r"'auto:A-B' .*, got 'six'",
    ),
    (
        'description = "x"\n[model]\nn_components = 0\n',
        r"key 'model\.n_components': expected an integer between 1 and 255, 'auto' or "
        r"'auto:A-B' .*, got 0",
    ),
    (
        'description = "x"\n[model]\nmax_iter = true\n',
        r"key 'model\.max_iter': expected an integer >= 1, got True",
    ),
    (
        'description = "x"\n[model]\nseed = 1.5\n',
        r"key 'model\.seed': expected an integer between 0 and 4294967295, got 1\.5",
    ),
    ('description = "x"\n[model]\ntol = -1\n', r"key 'model\.tol': expected a number >= 0, got -1"),
    (
        'description = "x"\n[model]\nvariance_floor = 0\n',
        r"key 'model\.variance_floor': expected a number > 0, got 0",
    ),
    (
        'description = "x"\n[model]\nchunk_size = 0\n',
        r"key 'model\.chunk_size': expected an integer between 1 and 2147483647, got 0",
    ),
    ('description = "x"\nmodel = 3\n', r"key 'model': expected a \[model\] table, got 3"),
    (
        'description = "x"\n[outputs]\nqc = "yes"\n',
        r"key 'outputs\.qc': expected true or false, got 'yes'",
    ),
    ('description = "x"\n[outputs]\nprobmap = true\n', r"unknown key 'outputs\.probmap'"),
    ('description = "x"\nmask = 1\n', r"key 'mask': expected 'auto', 'none', 'bids', the path"),
    (
        'description = "x"\nlabels = ["a", "b"]\n[model]\nn_components = 3\n',
        r"key 'labels': expected 3 names \(model\.n_components\), got 2",
    ),
    ('description = "x"\nlabels = "csf"\n', r"key 'labels': expected a list of class names"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_pipeline_file(tmp_path, text, message):
    path = write_pipeline(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        load_pipeline(path)
    assert info.value.path == path.resolve()


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.toml: pipeline file not found"):
        load_pipeline(tmp_path / "nope.toml")


def test_unknown_pipeline_name():
    with pytest.raises(InputError, match=r"no such pipeline; built-in pipelines: .*t1-head-6class"):
        load_pipeline("t1-head-7class")


def test_not_utf8(tmp_path):
    path = tmp_path / "custom.toml"
    path.write_bytes(b'description = "\xff"\n')
    with pytest.raises(InputError, match="not a valid TOML file"):
        load_pipeline(path)


@pytest.mark.parametrize("command", ["run", "batch"])
def test_invalid_pipeline_fails_before_any_scan(tmp_path, two_phase_png, command):
    bad = write_pipeline(tmp_path, 'description = "x"\n[model]\nn_components = "six"\n')
    out = tmp_path / "never"
    target = str(two_phase_png) if command == "run" else str(two_phase_png.parent)
    result = CliRunner().invoke(cli, [command, target, "-o", str(out), "--pipeline", str(bad)])
    assert result.exit_code == 2  # a malformed pipeline file is a usage error
    assert f"{bad.resolve()}: key 'model.n_components': expected an integer" in result.output
    assert not out.exists()
