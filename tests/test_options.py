"""The option table (segment._options.OPTIONS) and everything derived from it agree."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from segment._options import (
    DEFAULT_OPTIONS,
    DEFAULT_SETTINGS,
    LAYERS,
    OPTIONS,
    estimator_kwargs,
    resume_key,
    run_record,
)
from segment.api import make_estimator
from segment.cli import cli
from segment.exceptions import InputError
from segment.pipelines import MODEL_KEYS, OUTPUT_KEYS, load_pipeline

#: A valid value other than the default for each option (the table's ranges allow it).
OTHER = {"n_components": 3, "mask": "auto", "max_iter": 40, "tol": 1e-3, "seed": 7,
         "variance_floor": 2.5, "chunk_size": 1000, "scheduler": "synchronous", "workers": 1,
         "mrf_beta": 0.3, "bias_field": True, "bias_smoothness": 30.0, "pv_fit": True, "pve": True,
         "probseg": False, "qc": False, "qc_histogram": "log"}  # fmt: skip


def params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in cli.commands[command].params}


def test_the_table_is_well_formed():
    assert set(OTHER) == set(OPTIONS)
    for name, option in OPTIONS.items():
        assert option.layer in LAYERS and option.kind in ("int", "float", "bool", "str", "k")
        assert option.help and option.flags, name
        assert option.accepts(OTHER[name]), name
        if option.default is not None:
            assert option.accepts(option.default), name


@pytest.mark.parametrize("command", ["run", "batch", "bids"])
def test_every_option_is_a_click_option_with_the_table_default(command):
    found = params(command)
    for name, option in OPTIONS.items():
        param = found[option.param]
        assert set(option.flags[0].split("/")) <= set(param.opts) | set(param.secondary_opts)
        default = (not option.default) if option.inverted else option.default
        assert param.default == default, name
        help_text = option.batch_help if command != "run" and option.batch_help else option.help
        assert param.help == help_text, name


@pytest.mark.parametrize(
    ("name", "bad"),
    [("n_components", "0"), ("n_components", "auto:4-4"), ("max_iter", "0"), ("tol", "-1"),
     ("seed", "-1"), ("variance_floor", "0"), ("chunk_size", "0"), ("workers", "0"),
     ("mrf_beta", "-0.1"), ("bias_smoothness", "0"), ("scheduler", "fast"),
     ("qc_histogram", "cubic")],
)  # fmt: skip
def test_the_cli_refuses_what_the_table_refuses(name, bad, tmp_path):
    option = OPTIONS[name]
    if name != "scheduler":  # a name the scheduler module checks, not a type
        assert not option.accepts(int(bad) if bad.lstrip("-").isdigit() else float(bad)
                                  if name in ("tol", "mrf_beta") else bad)  # fmt: skip
    flag = option.flags[-1].split("/")[0]
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path),
                                      flag, bad])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert flag in result.output


def test_every_pipeline_option_is_accepted_in_a_toml_and_reaches_the_settings(tmp_path):
    in_pipelines = {n for n, o in OPTIONS.items() if o.section}
    assert set(MODEL_KEYS) | set(OUTPUT_KEYS) | {"mask"} == in_pipelines
    assert set(DEFAULT_SETTINGS) == in_pipelines
    model = "".join(f"{n} = {json.dumps(OTHER[n])}\n" for n in MODEL_KEYS)
    outputs = "".join(f"{n} = {json.dumps(OTHER[n])}\n" for n in OUTPUT_KEYS)
    path = tmp_path / "all.toml"
    path.write_text(
        f'description = "every key"\nmask = "auto"\n[model]\n{model}[outputs]\n{outputs}'
    )
    assert load_pipeline(path).settings() == {n: OTHER[n] for n in in_pipelines}


@pytest.mark.parametrize("section", ["model", "outputs"])
def test_an_unknown_toml_key_is_refused(tmp_path, section):
    path = tmp_path / "bad.toml"
    path.write_text(f'description = "x"\n[{section}]\nn_compnents = 3\n')
    with pytest.raises(InputError, match=f"unknown key '{section}.n_compnents'; expected one of"):
        load_pipeline(path)


@pytest.mark.parametrize("name", sorted(n for n, o in OPTIONS.items() if o.section == "model"))
def test_a_bad_toml_value_is_refused_with_the_table_s_words(tmp_path, name):
    path = tmp_path / "bad.toml"
    path.write_text(f'description = "x"\n[model]\n{name} = "many"\n')
    with pytest.raises(InputError, match=f"key 'model.{name}': expected "):
        load_pipeline(path)


def test_the_estimator_gets_every_estimator_parameter():
    options = {n: OTHER[n] for n in DEFAULT_OPTIONS}
    estimator = make_estimator(options)
    for name, option in OPTIONS.items():
        if option.estimator_param:
            assert getattr(estimator, option.estimator_param) == OTHER[name], name
    assert set(estimator_kwargs({})) == {o.estimator_param for o in OPTIONS.values()
                                         if o.estimator_param}  # fmt: skip


def test_resume_key_holds_the_result_changing_options_only():
    key = resume_key({"n_components": 3, "qc": False, "chunk_size": 10})
    changing = [n for n, o in OPTIONS.items() if o.changes_results and o.section]
    assert list(key) == changing
    assert key["n_components"] == 3 and key["pve"] is False  # a default filled in
    assert "qc" not in key and "chunk_size" not in key and "scheduler" not in key
    assert resume_key({"chunk_size": 10}) == resume_key({"chunk_size": 20})
    assert resume_key({"mrf_beta": 0.1}) != resume_key({})


def test_run_record_fills_defaults():
    record = run_record({"n_components": 3})
    assert list(record) == list(DEFAULT_OPTIONS) and record["n_components"] == 3
    assert record["max_iter"] == OPTIONS["max_iter"].default


def test_a_run_s_sidecar_records_every_option(make_nifti, tissues, tmp_path):
    scan = make_nifti(tissues)
    out = tmp_path / "out"
    given = {"n_components": 3, "max_iter": 40, "tol": 1e-3, "seed": 7, "variance_floor": 2.5,
             "chunk_size": 1000, "mrf_beta": 0.3, "bias_smoothness": 30.0}  # fmt: skip
    args = ["run", str(scan), "-o", str(out), "-q", "--no-qc", "--scheduler", "synchronous",
            "--workers", "1"]  # fmt: skip
    for name, value in given.items():
        args += [OPTIONS[name].flags[-1], str(value)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scan_segment.json").read_text())
    assert set(record["options"]) == set(DEFAULT_OPTIONS)
    assert set(record["final_options"]) == set(DEFAULT_SETTINGS)
    for name, value in given.items():
        assert record["options"][name] == value == record["final_options"][name], name
        assert record["option_sources"][name] == "command line"
    assert record["options"]["scheduler"] == "synchronous" and record["options"]["workers"] == 1
    assert record["final_options"]["qc"] is False and record["option_sources"]["tol"] != "default"
    assert record["option_sources"]["pve"] == "default"
