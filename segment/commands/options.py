"""The run options on the command line, generated from :data:`segment._options.OPTIONS`.

:func:`model_options` adds one click option per table entry (plus ``--pipeline``, ``--mrf`` and
the flags that are not run options); :func:`apply_pipeline` resolves defaults < pipeline <
command line into the final settings that the sidecar records.
"""

from __future__ import annotations

import functools

import click

from .._options import DEFAULT_OPTIONS, OPTIONS, Option
from .common import FiniteFloat, NComponents, check_pipeline, check_scheduler_option

#: MRF strength that --mrf turns on; chosen on the phantoms (see README, "Spatial prior").
DEFAULT_MRF_BETA = 0.2


def _click_type(option: Option):
    """The click type of a table entry (its range)."""
    if option.kind == "k":
        return NComponents(allow_auto=True)
    if option.kind == "int":
        return click.IntRange(option.low, option.high)
    if option.kind == "float":
        return FiniteFloat(min=option.low, max=option.high, min_open=option.low_open)
    if option.choices is not None:
        return click.Choice(option.choices)
    return None


#: Extra checks of string options, by name.
_CALLBACKS = {"scheduler": check_scheduler_option}


def table_option(option: Option, *, batch: bool = False):
    """The click decorator of one :class:`~segment._options.Option`."""
    metavar = option.metavar
    if batch and option.name == "mask":
        metavar = "PATH|TEMPLATE|auto|none|bids"
    default = (not option.default) if option.inverted else option.default
    return click.option(
        *option.flags,
        option.param,
        type=None if option.kind == "bool" else _click_type(option),
        default=default,
        show_default=option.show_default,
        metavar=metavar,
        callback=_CALLBACKS.get(option.name),
        help=(option.batch_help if batch and option.batch_help else option.help),
    )


def model_options(func=None, *, batch: bool = False):
    """Options of ``run``, ``batch`` and ``bids`` (``batch=True``: the batch's --mask help)."""
    if func is None:
        return functools.partial(model_options, batch=batch)
    table = {name: table_option(option, batch=batch) for name, option in OPTIONS.items()}
    options = [
        click.option("-p", "--pipeline", default=None, metavar="NAME|FILE",
                     callback=check_pipeline,
                     help="Preset of options (see `segment pipelines`); options given on the "
                          "command line override it."),
        *(table[name] for name in ("n_components", "mask", "max_iter", "tol", "seed",
                                   "variance_floor", "chunk_size", "scheduler", "workers")),
        click.option("--mrf/--no-mrf", "mrf", default=False,
                     help="Spatial Potts (MRF) prior over the 26 neighbours, strength "
                          f"{DEFAULT_MRF_BETA} unless --mrf-beta is given [default: off]."),
        *(table[name] for name in ("mrf_beta", "bias_field", "bias_smoothness", "pv_fit",
                                   "pve")),
        click.option("--write-corrected", is_flag=True,
                     help="With --bias-field, also write <stem>_corrected (scan / bias field)."),
        *(table[name] for name in ("probseg", "qc", "qc_histogram")),
        click.option("--compression-level", type=click.IntRange(0, 9), default=1,
                     show_default=True, metavar="0-9",
                     help="gzip level of the .nii.gz outputs: 1 is fastest; 6 (gzip's default) "
                          "writes probability maps about 3x slower into files about 10 % "
                          "smaller; 0 stores them uncompressed inside the gzip file."),
        click.option("--overwrite", is_flag=True, help="Replace existing outputs."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or warnings on stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


#: Settings a pipeline can set -> the click parameter that overrides it (``--mrf-beta`` is
#: resolved with ``--mrf``, below).
_SETTING_PARAMS = {n: o.param for n, o in OPTIONS.items() if o.section and n != "mrf_beta"}


def apply_pipeline(kwargs: dict):
    """Resolve defaults < ``--pipeline`` < options typed on the command line, in ``kwargs``.

    Updates the option values in ``kwargs``; returns the pipeline (or None) and what the JSON
    sidecar records: the pipeline (name, path, sha256), the final options and their sources.
    """
    from click.core import ParameterSource

    from ..pipelines import load_pipeline, resolve_options

    ctx = click.get_current_context()
    pipeline = load_pipeline(kwargs["pipeline"]) if kwargs.get("pipeline") else None
    given = {}
    for key, param in _SETTING_PARAMS.items():
        if ctx.get_parameter_source(param) not in (ParameterSource.DEFAULT, None):
            given[key] = not kwargs[param] if OPTIONS[key].inverted else kwargs[param]
    if ctx.get_parameter_source("mrf_beta") not in (ParameterSource.DEFAULT, None):
        given["mrf_beta"] = kwargs["mrf_beta"]
    elif ctx.get_parameter_source("mrf") not in (ParameterSource.DEFAULT, None):
        given["mrf_beta"] = DEFAULT_MRF_BETA if kwargs["mrf"] else 0.0
    settings, sources = resolve_options(pipeline, given)
    for key, param in _SETTING_PARAMS.items():
        kwargs[param] = not settings[key] if OPTIONS[key].inverted else settings[key]
    kwargs["mrf_beta"] = settings["mrf_beta"]
    for name in ("pv_fit", "pve"):
        if (
            settings[name]
            and isinstance(settings["n_components"], int)
            and (settings["n_components"] < 2)
        ):
            flag = "--" + name.replace("_", "-")
            where = flag if sources[name] == "command line" else f"pipeline {pipeline.name}: {name}"
            raise click.UsageError(
                f"{where} needs at least 2 classes to mix, got -k {settings['n_components']}; "
                f"raise -k or leave out {flag}"
            )
    return pipeline, {
        "pipeline": pipeline.record() if pipeline else None,
        "final_options": settings,
        "option_sources": sources,
    }


def check_model_options(kwargs: dict, extra: dict) -> None:
    """Model option values out of range (from the command line or a pipeline): exit 2."""
    from ..api import make_estimator
    from ..exceptions import SegmentError

    try:
        make_estimator(model_kwargs(kwargs))
    except SegmentError as error:
        from_pipeline = "pipeline" in extra["option_sources"].values()
        where = " (command line or pipeline)" if from_pipeline else ""
        raise click.UsageError(f"invalid option value{where}: {error}") from None


def model_kwargs(kwargs: dict) -> dict:
    """The keyword options of :func:`segment.segment_file` from the parsed command line."""
    return {name: kwargs[OPTIONS[name].param] for name in DEFAULT_OPTIONS}
