"""The ``segment`` command line: thin click adapters over :mod:`segment.api`.

Heavy imports (dask, nibabel, matplotlib) happen inside the commands so ``--help`` is instant.
Library errors become one-line messages: exit 1 for data errors, 2 for usage errors; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from pathlib import Path

import click

from . import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="segment")
def cli() -> None:
    """Segment medical scans into tissues with a Gaussian mixture fitted by EM.

    \b
    Quick start:
      segment run sample_scans/head_t1.nii.gz -o out/
      segment evaluate out/head_t1_dseg.nii.gz sample_scans/head_t1_labels.nii.gz
    """


# ------------------------------------------------------------------------------ helpers
def _handle_errors(func):
    """Turn library errors into click errors (exit 1, one line) unless --debug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .exceptions import SegmentError

        debug = kwargs.get("debug", False)
        quiet = kwargs.get("quiet", False)
        if debug:  # nibabel's own header reports too (see segment.io._nibabel_quiet)
            os.environ["SEGMENT_DEBUG"] = "1"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if quiet else "default")
            if not debug:
                warnings.showwarning = _show_warning
            try:
                return func(*args, **kwargs)
            except click.ClickException:
                raise
            except SegmentError as error:
                if debug:
                    raise
                raise click.ClickException(str(error)) from None
            except KeyboardInterrupt:  # 128 + SIGINT, as shells report an interrupted command
                click.echo("Interrupted: no output was left half-written.", err=True)
                raise click.exceptions.Exit(130) from None
            except OSError as error:
                if debug:
                    raise
                raise click.ClickException(_os_error_message(error)) from None
            except Exception as error:  # noqa: BLE001 - the one place that hides tracebacks
                if debug:
                    raise
                raise click.ClickException(
                    f"unexpected {type(error).__name__}: {error} (rerun with --debug for the "
                    "traceback and report it)"
                ) from None

    return wrapper


def _os_error_message(error: OSError) -> str:
    """``<file>: <reason>`` for an OSError, on one line, whatever fields it carries."""
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    names = [str(name) for name in (error.filename, error.filename2) if name]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """One ``warning:`` line for segment's own warnings; third-party ones only with --debug."""
    from .exceptions import ConvergenceWarning, DataWarning

    own = issubclass(category, ConvergenceWarning | DataWarning) or str(filename).startswith(
        _PACKAGE_DIR
    )
    if not own:
        return
    _ProgressLine.end()
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


_PACKAGE_DIR = str(Path(__file__).parent)


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf`` (exit 2)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class NComponents(click.ParamType):
    """``-k``: an integer 1..255, or (``segment run``) ``auto`` / ``auto:A-B``, K chosen by BIC."""

    name = "K|auto|auto:A-B"

    def __init__(self, allow_auto: bool):
        self.allow_auto = allow_auto
        if not allow_auto:
            self.name = "integer range"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        else:
            text = str(value).strip()
        if text.lstrip("+-").isdigit():
            return click.IntRange(1, 255).convert(text, param, ctx)
        if not self.allow_auto:
            self.fail(f"{value!r} is not a valid integer range (1 to 255).", param, ctx)
        from ._validation import check_k_range
        from .exceptions import SegmentError

        try:
            check_k_range(text)
        except SegmentError as error:
            self.fail(str(error), param, ctx)
        return text.lower()


def _check_memory_limit(ctx, param, value):
    if value is None:
        return value
    from .api import _memory_budget
    from .exceptions import SegmentError

    try:
        _memory_budget(value)
    except SegmentError as error:
        raise click.BadParameter(str(error)) from None
    return value


def _check_pipeline(ctx, param, value):
    """``-p``: an unknown name or a malformed file is a usage error (exit 2)."""
    if not value:
        return value
    from .exceptions import SegmentError
    from .pipelines import load_pipeline

    try:
        load_pipeline(value)
    except (SegmentError, OSError) as error:
        raise click.BadParameter(" ".join(str(error).split())) from None
    return value


class _ProgressLine:
    """EM progress rewritten in place on one stderr line; ended before anything else prints."""

    is_open = False

    def __init__(self) -> None:
        self.current = "EM"

    def phase(self, name: str) -> None:
        """A new phase (initialisation, EM, bias field EM, MRF sweep n, writing) starts."""
        self.current = name
        click.echo(f"\r\033[K  {name}", err=True, nl=False)
        _ProgressLine.is_open = True

    def __call__(self, iteration: int, log_likelihood: float, change: float) -> None:
        click.echo(
            f"\r\033[K  {self.current} iteration {iteration:4d}  log-likelihood "
            f"{log_likelihood:.6e}  change/voxel {change:.2e}",
            err=True,
            nl=False,
        )
        _ProgressLine.is_open = True

    @classmethod
    def end(cls) -> None:
        """Finish the progress line (if one is open) so the next message starts a new line."""
        if cls.is_open:
            cls.is_open = False
            click.echo("", err=True)


def _progress_printer(quiet: bool):
    """Print EM progress to stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return _ProgressLine()


def _check_scheduler(ctx, param, value):
    if value is None:
        return value
    from ._scheduler import check_scheduler

    try:
        return check_scheduler(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


_MASK_HELP = ("Voxels to model: a mask file on the same grid, 'auto' (everything but the "
              "background: the whole head of a whole-head scan, the brain of a skull-stripped one) "
              "or 'none' (all).")  # fmt: skip
_BATCH_MASK_HELP = (
    "Voxels to model: 'none' (all), 'auto' (everything but the background: the whole "
    "head, or the brain of a skull-stripped scan), one mask file for every scan, or a "
    "template giving each scan its own mask: "
    "{stem} is the scan's name without extension, {rel} its folder relative to INPUT_DIR, "
    "e.g. '{stem}_brainmask.nii.gz' (next to each scan) or '/data/masks/{rel}/{stem}_mask.nii'. "
    "With --bids, 'bids' takes each scan's derivatives/*/sub-*/[ses-*/]anat/*_desc-brain_mask "
    "file. Files used as masks are not segmented."
)


def model_options(func=None, *, batch: bool = False):
    """Options shared by ``run`` and ``batch`` (``batch=True``: the batch's --mask help)."""
    if func is None:
        return functools.partial(model_options, batch=batch)
    options = [
        click.option("-p", "--pipeline", default=None, metavar="NAME|FILE",
                     callback=_check_pipeline,
                     help="Preset of options (see `segment pipelines`); options given on the "
                          "command line override it."),
        click.option("-k", "--n-components", type=NComponents(allow_auto=not batch), default=6,
                     show_default=True,
                     help="Number of tissue classes K." if batch else
                          "Number of tissue classes K, or 'auto' (K = 2..8) / 'auto:A-B': fit "
                          "each K and keep the lowest BIC (the curve goes in the sidecar)."),
        click.option("--mask", "mask", default="none", show_default=True,
                     metavar="PATH|TEMPLATE|auto|none|bids" if batch else "PATH|auto|none",
                     help=_BATCH_MASK_HELP if batch else _MASK_HELP),
        click.option("--max-iter", type=click.IntRange(min=1), default=300, show_default=True,
                     help="Maximum EM iterations."),
        click.option("--tol", type=FiniteFloat(min=0), default=1e-4, show_default=True,
                     help="Stop when the log-likelihood changes less than this per voxel."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                     help="Seed of the k-means initialisation."),
        click.option("--variance-floor", type=FiniteFloat(min=0, min_open=True),
                     default=None, help="Smallest variance (intensity^2) [default: 1e-3 x the "
                                        "data variance]."),
        click.option("--chunk-size", type=click.IntRange(1, 2**31 - 1), default=None,
                     help="Voxels per chunk [default: 262144]."),
        click.option("--scheduler", default=None, callback=_check_scheduler,
                     metavar="threads|processes|synchronous|tcp://HOST:PORT",
                     help="Dask scheduler [default: threads]."),
        click.option("--workers", type=click.IntRange(1, 4096), default=None,
                     help="Threads/processes for the local schedulers [default: all cores]."),
        click.option("--mrf/--no-mrf", "mrf", default=False,
                     help="Spatial Potts (MRF) prior over the 26 neighbours, strength "
                          f"{DEFAULT_MRF_BETA} unless --mrf-beta is given [default: off]."),
        click.option("--mrf-beta", type=FiniteFloat(min=0), default=None, metavar="B",
                     help="MRF strength beta (0 = off), in FSL FAST's units; implies --mrf."),
        click.option("--bias-field/--no-bias-field", "bias_field", default=False,
                     help="Estimate a smooth multiplicative bias field inside the EM "
                          "[default: off]."),
        click.option("--bias-smoothness", type=FiniteFloat(min=0, min_open=True),
                     default=40.0, show_default=True, metavar="MM",
                     help="Bias field smoothness as a length in mm (smaller: faster variations)."),
        click.option("--pve/--no-pve", "pve", default=False,
                     help="Also write partial-volume fractions, <stem>_pve (one volume per "
                          "class, in [0,1], summing to 1 in the mask), from a mixed-voxel model "
                          "of classes adjacent in intensity; volumes in the sidecar then come "
                          "from them. Needs -k 2 or more [default: off]."),
        click.option("--write-corrected", is_flag=True,
                     help="With --bias-field, also write <stem>_corrected (scan / bias field)."),
        click.option("--no-probseg/--probseg", "no_probseg", default=False,
                     help="Do not write the probability maps [default: write them]."),
        click.option("--no-qc/--qc", "no_qc", default=False,
                     help="Do not write the QC picture [default: write it]."),
        click.option("--qc-histogram", type=click.Choice(["linear", "log"]), default="linear",
                     show_default=True,
                     help="Counts axis of the QC histogram (log: small classes stay visible)."),
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


#: Settings a pipeline can set -> the click parameter that overrides it.
_SETTING_PARAMS = {"n_components": "n_components", "max_iter": "max_iter", "tol": "tol",
                   "variance_floor": "variance_floor", "seed": "seed", "chunk_size": "chunk_size",
                   "mask": "mask", "probseg": "no_probseg", "qc": "no_qc",
                   "qc_histogram": "qc_histogram",
                   "bias_field": "bias_field", "bias_smoothness": "bias_smoothness",
                   "pve": "pve"}  # fmt: skip
#: MRF strength that --mrf turns on; chosen on the phantoms (see README, "Spatial prior").
DEFAULT_MRF_BETA = 0.2


def _apply_pipeline(kwargs: dict):
    """Resolve defaults < ``--pipeline`` < options typed on the command line, in ``kwargs``.

    Updates the option values in ``kwargs``; returns the pipeline (or None) and what the JSON
    sidecar records: the pipeline (name, path, sha256), the final options and their sources.
    """
    from click.core import ParameterSource

    from .pipelines import load_pipeline, resolve_options

    ctx = click.get_current_context()
    pipeline = load_pipeline(kwargs["pipeline"]) if kwargs.get("pipeline") else None
    given = {}
    for key, param in _SETTING_PARAMS.items():
        if ctx.get_parameter_source(param) not in (ParameterSource.DEFAULT, None):
            given[key] = not kwargs[param] if param.startswith("no_") else kwargs[param]
    if ctx.get_parameter_source("mrf_beta") not in (ParameterSource.DEFAULT, None):
        given["mrf_beta"] = kwargs["mrf_beta"]
    elif ctx.get_parameter_source("mrf") not in (ParameterSource.DEFAULT, None):
        given["mrf_beta"] = DEFAULT_MRF_BETA if kwargs["mrf"] else 0.0
    settings, sources = resolve_options(pipeline, given)
    for key, param in _SETTING_PARAMS.items():
        kwargs[param] = not settings[key] if param.startswith("no_") else settings[key]
    kwargs["mrf_beta"] = settings["mrf_beta"]
    if (
        settings["pve"]
        and isinstance(settings["n_components"], int)
        and (settings["n_components"] < 2)
    ):
        where = "--pve" if sources["pve"] == "command line" else f"pipeline {pipeline.name}: pve"
        raise click.UsageError(
            f"{where} needs at least 2 classes to mix, got -k {settings['n_components']}; "
            "raise -k or leave out --pve"
        )
    return pipeline, {
        "pipeline": pipeline.record() if pipeline else None,
        "final_options": settings,
        "option_sources": sources,
    }


def _check_model_options(kwargs: dict, extra: dict) -> None:
    """Model option values out of range (from the command line or a pipeline): exit 2."""
    from .api import make_estimator
    from .exceptions import SegmentError

    try:
        make_estimator(_model_kwargs(kwargs))
    except SegmentError as error:
        from_pipeline = "pipeline" in extra["option_sources"].values()
        where = " (command line or pipeline)" if from_pipeline else ""
        raise click.UsageError(f"invalid option value{where}: {error}") from None


def _model_kwargs(kwargs: dict) -> dict:
    names = ("n_components", "max_iter", "tol", "seed", "variance_floor", "chunk_size",
             "scheduler", "workers", "mrf_beta", "bias_field", "bias_smoothness",
             "pve")  # fmt: skip
    return {name: kwargs[name] for name in names}


# ------------------------------------------------------------------------------ commands
@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1, required=True,  # unreadable: load_scan's exit-1 message
                type=click.Path(path_type=Path, readable=False))  # fmt: skip
@click.option("-o", "--out-dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (created if needed).")  # fmt: skip
@click.option("--memory-limit", default=None, metavar="SIZE", callback=_check_memory_limit,
              help="Memory to aim for, e.g. 1.5GB [default: 3GB]: above a third of it the "
                   "probability maps are streamed slab by slab instead of kept; --mrf and "
                   "--bias-field refuse scans whose estimated need exceeds it.")  # fmt: skip
@model_options
@_handle_errors
def run(inputs: tuple[Path, ...], out_dir: Path, **kwargs) -> None:
    """Segment one scan: INPUT, or several co-registered channels of one scan.

    Writes OUT_DIR/<stem>_dseg.nii.gz (labels 1..K by ascending mean, 0 outside the mask),
    <stem>_probseg.nii.gz (K probability volumes), <stem>_qc.png and <stem>_segment.json.
    2-D images give <stem>_dseg.png and a K-page <stem>_probseg.tif. With --pve, also
    <stem>_pve.nii.gz (<stem>_pve.tif in 2-D): the partial-volume fraction of each class.

    \b
    Examples:
      segment run sample_scans/head_t1.nii.gz -o out/
      segment run t1.nii.gz t2.nii.gz -o out/ -k 3 --mask auto
      segment run slice.png -o out/ -k 3 --no-probseg
      segment run big.nii -o out/ --scheduler tcp://10.0.0.5:8786
    """
    from .api import segment_file

    start = time.perf_counter()
    pipeline, extra = _apply_pipeline(kwargs)
    _check_model_options(kwargs, extra)
    if "{" in kwargs["mask"] or "}" in kwargs["mask"]:
        from .batch import MaskSpec
        from .exceptions import SegmentError

        try:
            MaskSpec.parse(kwargs["mask"])
        except SegmentError as error:
            raise click.BadParameter(str(error), param_hint="'--mask'") from None
    callback = _progress_printer(kwargs["quiet"])
    try:
        result = segment_file(
            list(inputs), out_dir, mask=None if kwargs["mask"] == "none" else kwargs["mask"],
            overwrite=kwargs["overwrite"], probseg=not kwargs["no_probseg"],
            qc=not kwargs["no_qc"], callback=callback, corrected=kwargs["write_corrected"],
            qc_histogram=kwargs["qc_histogram"],
            memory_limit=kwargs["memory_limit"], compresslevel=kwargs["compression_level"],
            command_line=["segment", *sys.argv[1:]], extra=extra, **_model_kwargs(kwargs),
            class_names=list(pipeline.labels) if pipeline else None,
        )  # fmt: skip
    finally:
        _ProgressLine.end()  # also before an error message
    estimator = result.estimator
    if not kwargs["quiet"]:
        chosen = (
            f" (BIC over {result.model_selection['tried'][0]}.."
            f"{result.model_selection['tried'][-1]})"
            if result.model_selection
            else ""
        )
        click.echo(
            f"{inputs[0]}: K={estimator.n_components}{chosen}, {estimator.n_iter_} "
            f"iteration{'s' if estimator.n_iter_ != 1 else ''}, "
            f"{'converged' if estimator.converged_ else 'NOT converged'}, log-likelihood/voxel "
            f"{estimator.log_likelihood_ / estimator.n_samples_:.4f}, "
            f"{time.perf_counter() - start:.1f} s",
            err=True,
        )
    for path in result.written:
        click.echo(str(path))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("predicted", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path), required=False)
@click.option("--reference-fractions", type=click.Path(path_type=Path), default=None,
              metavar="FILE",
              help="A reference fraction map (4-D, one volume per class in label order): "
                   "PREDICTED is then a fraction map (<stem>_pve, or a _probseg read as "
                   "fractions); prints fraction MAE and volume error per class.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--ignore-zero", is_flag=True,
              help="Leave out voxels labelled 0 in either map (e.g. outside a mask).")  # fmt: skip
@click.option(
    "--mask",
    "mask",
    type=click.Path(path_type=Path),
    default=None,
    metavar="MASK",
    help="Score only the voxels inside this mask (same grid; non-zero = inside).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_handle_errors
def evaluate(predicted: Path, reference: Path | None, reference_fractions: Path | None,
             as_json: bool, ignore_zero: bool, mask: Path | None, debug: bool):  # fmt: skip
    """Compare a label map PREDICTED with a ground truth REFERENCE.

    Labels are matched to reference classes by the optimal one-to-one assignment (Hungarian);
    prints Dice, Jaccard, volumes in mL and the confusion matrix. With --reference-fractions,
    compares partial-volume fraction maps instead.

    \b
    Examples:
      segment evaluate out/head_t1_dseg.nii.gz sample_scans/head_t1_labels.nii.gz
      segment evaluate out/scan_pve.nii.gz --reference-fractions truth_fractions.nii.gz
    """
    import json

    from .evaluate import (
        evaluate_files,
        evaluate_fraction_files,
        format_fraction_table,
        format_table,
    )

    if (reference is None) == (reference_fractions is None):
        raise click.UsageError(
            "give either a REFERENCE label map or --reference-fractions FILE (not both)"
        )
    if reference_fractions is not None:
        result = evaluate_fraction_files(predicted, reference_fractions)
        click.echo(json.dumps(result, indent=2) if as_json else format_fraction_table(result))
        return
    result = evaluate_files(predicted, reference, ignore_zero=ignore_zero, mask_path=mask)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False),
                default="sample_scans")  # fmt: skip
@click.option(
    "--noise",
    type=click.FloatRange(min=0),
    default=None,
    help="Rician noise, % of the brightest tissue (BrainWeb: 0,1,3,5,7,9).",
)
@click.option(
    "--nonuniformity",
    type=click.FloatRange(min=0),
    default=None,
    help="Intensity non-uniformity in % (BrainWeb: 0, 20, 40).",
)
@click.option(
    "--shape",
    type=click.IntRange(min=8),
    nargs=3,
    default=None,
    help="Volume shape in voxels, e.g. --shape 181 217 181.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_handle_errors
def samples(out_dir: Path, noise, nonuniformity, shape, seed, overwrite, debug) -> None:
    """Generate phantom scans with ground truth into OUT_DIR [default: sample_scans].

    Without options, writes the set shipped in sample_scans/. With --noise, --nonuniformity
    or --shape, writes one head phantom and its labels.
    """
    from .samples import generate

    written = generate(
        out_dir,
        noise=noise,
        nonuniformity=nonuniformity,
        shape=tuple(shape) if shape else None,
        seed=seed,
        overwrite=overwrite,
    )
    for path in written:
        click.echo(str(path))


def _batch_progress(quiet: bool):
    """``on_result`` callback: a one-line bar on a terminal, else one log line per scan."""
    if quiet:
        return None
    start, tty, ran = time.perf_counter(), sys.stderr.isatty(), []

    def on_result(row: dict, done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        failed = on_result.failed = on_result.failed + (row["status"] == "failed")
        if row["status"] != "skipped":
            ran.append(elapsed)
        detail = f": {row['error']}" if row["error"] else (
            f" (K={row['K']}, {row['iterations']} iterations, {row['seconds']:.1f} s)"
            if row["status"] == "ok" else "")  # fmt: skip
        if not tty:
            click.echo(f"[{done}/{total}] {row['input']}: {row['status']}{detail}", err=True)
            return
        if row["status"] == "failed":
            click.echo(f"\r\033[K{row['input']}: failed{detail}", err=True)
        eta = elapsed / len(ran) * (total - done) if ran and done < total else 0.0
        bar = "#" * (30 * done // total) + "-" * (30 - 30 * done // total)
        click.echo(f"\r\033[K[{bar}] {done}/{total} scans, {failed} failed, "
                   f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}", err=True,
                   nl=done == total)  # fmt: skip

    on_result.failed = 0
    return on_result


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}"


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("input_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Output folder; input sub-folders are mirrored in it. Required unless "
    "--bids (then INPUT_DIR, outputs in derivatives/segment/).",
)
@click.option(
    "--pattern",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Scans to take, e.g. '*T1w.nii.gz' (repeatable; matched on the file name, "
    "or the relative path if it has a /) [default: all NIfTI and 2-D images].",
)
@click.option("-r", "--recursive", is_flag=True, help="Look in sub-folders too.")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 4096),
    default=None,
    help="Scans at once on this machine [default: CPU count].",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Skip scans whose outputs are complete and made with the same options.",
)
@click.option("--bids", is_flag=True, help="INPUT_DIR is a BIDS dataset: write a BIDS derivative.")
@click.option("--subject", "subjects", multiple=True, help="BIDS: only this subject (repeatable).")
@click.option("--session", "sessions", multiple=True, help="BIDS: only this session (repeatable).")
@click.option(
    "--suffix",
    "suffixes",
    multiple=True,
    help="BIDS: only this suffix, e.g. T1w (repeatable) [default: all anat NIfTI].",
)
@click.option("--memory-limit", default=None, metavar="SIZE", callback=_check_memory_limit,
              help="Memory to aim for per scan, as for `segment run` [default: 3GB].")  # fmt: skip
@model_options(batch=True)
@_handle_errors
def batch(input_dir: Path, out_dir: Path | None, **kwargs) -> None:
    """Segment every scan in INPUT_DIR, several at once, locally or on a Dask cluster.

    Writes the outputs of `segment run` for each scan and OUT_DIR/batch_summary.tsv (one row
    per scan: status ok/failed/skipped, error, K, iterations, log-likelihood, seconds). A
    failing scan does not stop the others; the exit code is 1 if any failed. Re-running
    finishes an interrupted batch. --scheduler tcp://HOST:8786 runs the scans on a running
    dask.distributed cluster (`dask scheduler`, then `dask worker tcp://HOST:8786` on each
    machine; all must see the files at the same paths); 'synchronous' runs one scan at a
    time in this process. --workers gives each scan's EM that many threads.

    \b
    Examples:
      segment batch scans/ -o out/ --recursive --jobs 4
      segment batch scans/ -o out/ --pipeline t1-brain-3class --pattern '*T1w.nii.gz'
      segment batch scans/ -o out/ -k 3 --mask '{stem}_brainmask.nii.gz'
      segment batch bids/ --bids --suffix T1w --pipeline t1-head-6class
      segment batch bids/ --bids --suffix T1w --pipeline t1-brain-3class --mask bids
      segment batch scans/ -o out/ --scheduler tcp://10.0.0.5:8786
    """
    from .batch import MaskSpec
    from .exceptions import SegmentError

    if out_dir is None and not kwargs["bids"]:
        raise click.UsageError("Missing option '-o' / '--out-dir' (required unless --bids).")
    if not kwargs["bids"] and (kwargs["subjects"] or kwargs["sessions"] or kwargs["suffixes"]):
        raise click.UsageError("--subject, --session and --suffix need --bids.")
    pipeline, extra = _apply_pipeline(kwargs)
    _check_model_options(kwargs, extra)
    try:
        MaskSpec.parse(kwargs["mask"], bids=kwargs["bids"])
    except SegmentError as error:
        where = "'--mask'" if extra["option_sources"]["mask"] == "command line" else (
            f"the mask of pipeline {pipeline.name}")  # fmt: skip
        raise click.BadParameter(str(error), param_hint=where) from None
    _run_batch(input_dir, out_dir, kwargs, pipeline, extra)


def _run_batch(input_dir, out_dir, kwargs, pipeline, extra, **where) -> None:
    """Run the batch of ``batch`` or ``bids``, report, exit 1 if a scan failed."""
    from .batch import run_batch

    result = run_batch(
        input_dir, out_dir, patterns=kwargs.get("patterns", ()),
        recursive=kwargs.get("recursive", False), bids=kwargs.get("bids", True),
        subjects=kwargs["subjects"], sessions=kwargs["sessions"],
        suffixes=kwargs["suffixes"], pipeline=pipeline, settings=extra["final_options"],
        sources=extra["option_sources"], jobs=kwargs["jobs"], scheduler=kwargs["scheduler"],
        workers=kwargs["workers"], resume=kwargs["resume"], overwrite=kwargs["overwrite"],
        on_result=_batch_progress(kwargs["quiet"]), command_line=["segment", *sys.argv[1:]],
        memory_limit=kwargs["memory_limit"], compresslevel=kwargs["compression_level"], **where,
    )  # fmt: skip
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("ok", "skipped", "failed")}
    if not kwargs["quiet"]:
        click.echo(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; see {result.summary}",
                   err=True)  # fmt: skip
    click.echo(str(result.summary))
    if counts["failed"]:
        raise SystemExit(1)


class _BadBidsInput(click.ClickException):
    """Arguments of ``segment bids`` that name no usable dataset: one line, exit 2."""

    exit_code = 2


@cli.command("bids", context_settings=CONTEXT_SETTINGS)
@click.argument("bids_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("analysis_level", type=click.Choice(["participant"]))
@click.argument("more_labels", nargs=-1, metavar="")
@click.option("--participant-label", "--participant_label", "subjects", multiple=True,
              metavar="LABEL [LABEL...]",
              help="Subjects to do, with or without 'sub-' [default: all].")  # fmt: skip
@click.option("--session", "sessions", multiple=True, help="Only this session (repeatable).")
@click.option("--suffix", "suffixes", multiple=True, default=("T1w",), show_default=True,
              help="Scans of this suffix (repeatable).")  # fmt: skip
@click.option("-j", "--jobs", type=click.IntRange(1, 4096), default=None,
              help="Scans at once on this machine [default: CPU count].")  # fmt: skip
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Skip scans whose outputs are complete and made with the same options.",
)
@click.option("--memory-limit", default=None, metavar="SIZE", callback=_check_memory_limit,
              help="Memory to aim for per scan, as for `segment run` [default: 3GB].")  # fmt: skip
@model_options(batch=True)
@_handle_errors
def bids(bids_dir: Path, output_dir: Path, analysis_level: str, more_labels, **kwargs) -> None:
    """Segment a BIDS dataset as a BIDS App: BIDS_DIR OUTPUT_DIR participant.

    Writes a BIDS derivative dataset in OUTPUT_DIR itself (dataset_description.json with
    DatasetLinks to BIDS_DIR, dseg.tsv, .bidsignore, sub-*/[ses-*/]anat/*_dseg.nii.gz ...), as
    `segment batch BIDS_DIR --bids` writes in BIDS_DIR/derivatives/segment. Options as for
    `segment batch`; --participant-label takes the labels that follow it.

    \b
    Examples:
      segment bids /data/raw /data/raw/derivatives/segment participant
      segment bids /data/raw /scratch/seg participant --participant-label 01 02 -k 3
    """
    from .batch import MaskSpec, check_bids_app
    from .exceptions import SegmentError

    if more_labels and not kwargs["subjects"]:
        raise click.UsageError(f"Got unexpected extra arguments ({' '.join(more_labels)}).")
    kwargs["subjects"] = (*kwargs["subjects"], *more_labels)
    try:
        check_bids_app(bids_dir, output_dir, kwargs["subjects"])
    except SegmentError as error:  # one line, exit 2 (a usage error), nothing written
        raise _BadBidsInput(str(error)) from None
    pipeline, extra = _apply_pipeline(kwargs)
    _check_model_options(kwargs, extra)
    try:
        MaskSpec.parse(kwargs["mask"], bids=True)
    except SegmentError as error:
        raise click.BadParameter(str(error), param_hint="'--mask'") from None
    _run_batch(bids_dir, None, kwargs, pipeline, extra, derivative_dir=output_dir)


@cli.command("pipelines", context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, metavar="[NAME|FILE]")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_handle_errors
def pipelines_command(name: str | None, debug: bool) -> None:
    """List the pipeline presets, or check and print one (NAME or a .toml FILE).

    Use a preset with `segment run/batch --pipeline NAME`; options given on the command line
    override it. Copy a preset's file to make your own.
    """
    from .pipelines import list_pipelines, load_pipeline

    if name is not None:
        pipeline = load_pipeline(name)
        click.echo(f"# {pipeline.path}")
        click.echo(pipeline.path.read_text(encoding="utf-8"), nl=False)
        return
    presets = list_pipelines()
    width = max((len(p.name) for p in presets), default=0)
    for pipeline in presets:
        click.echo(f"{pipeline.name:<{width}}  {pipeline.description}")
    if presets:
        click.echo(f"\n(from {presets[0].path.parent}; `segment pipelines NAME` shows one)",
                   err=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``segment`` console script."""
    cli.main(args=argv, prog_name="segment")
