"""The ``segment`` command line: thin click adapters over :mod:`segment.api`.

Heavy imports (dask, nibabel, matplotlib) happen inside the commands so ``--help`` is instant.
Library errors become one-line messages: exit 1 for data errors, 2 for usage errors; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import functools
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
            except KeyboardInterrupt:
                raise click.Abort() from None
            except OSError as error:
                if debug:
                    raise
                raise click.ClickException(f"{error.filename or ''}: {error.strerror}") from None
            except Exception as error:  # noqa: BLE001 - the one place that hides tracebacks
                if debug:
                    raise
                raise click.ClickException(
                    f"unexpected {type(error).__name__}: {error} (rerun with --debug for the "
                    "traceback and report it)"
                ) from None

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def _progress_printer(quiet: bool):
    """Print EM progress to stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        return None

    def callback(iteration: int, log_likelihood: float, change: float) -> None:
        click.echo(
            f"\r  EM iteration {iteration:4d}  log-likelihood {log_likelihood:.6e}  "
            f"change/voxel {change:.2e}",
            err=True,
            nl=False,
        )

    return callback


def _check_scheduler(ctx, param, value):
    if value is None:
        return value
    from ._scheduler import check_scheduler

    try:
        return check_scheduler(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def model_options(func):
    """Options shared by ``run`` and ``batch``."""
    options = [
        click.option("-k", "--n-components", type=click.IntRange(1, 255), default=6,
                     show_default=True, help="Number of tissue classes K."),
        click.option("--mask", "mask", default="none", show_default=True, metavar="PATH|auto|none",
                     help="Voxels to model: a mask file on the same grid, 'auto' (Otsu "
                          "foreground, largest component, holes filled) or 'none' (all)."),
        click.option("--max-iter", type=click.IntRange(min=1), default=300, show_default=True,
                     help="Maximum EM iterations."),
        click.option("--tol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
                     help="Stop when the log-likelihood changes less than this per voxel."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the k-means initialisation."),
        click.option("--variance-floor", type=click.FloatRange(min=0, min_open=True),
                     default=None, help="Smallest variance (intensity^2) [default: 1e-3 x the "
                                        "data variance]."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                     help="Voxels per chunk [default: 262144]."),
        click.option("--scheduler", default=None, callback=_check_scheduler,
                     metavar="threads|processes|synchronous|tcp://HOST:PORT",
                     help="Dask scheduler [default: threads]."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Threads/processes for the local schedulers [default: all cores]."),
        click.option("--no-probseg", is_flag=True, help="Do not write the probability maps."),
        click.option("--no-qc", is_flag=True, help="Do not write the QC picture."),
        click.option("--overwrite", is_flag=True, help="Replace existing outputs."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or warnings on stderr."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _model_kwargs(kwargs: dict) -> dict:
    names = ("n_components", "max_iter", "tol", "seed", "variance_floor", "chunk_size",
             "scheduler", "workers")  # fmt: skip
    return {name: kwargs[name] for name in names}


# ------------------------------------------------------------------------------ commands
@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1, required=True,
                type=click.Path(path_type=Path, dir_okay=True))  # fmt: skip
@click.option("-o", "--out-dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (created if needed).")  # fmt: skip
@model_options
@_handle_errors
def run(inputs: tuple[Path, ...], out_dir: Path, **kwargs) -> None:
    """Segment one scan: INPUT, or several co-registered channels of one scan.

    Writes OUT_DIR/<stem>_dseg.nii.gz (labels 1..K by ascending mean, 0 outside the mask),
    <stem>_probseg.nii.gz (K probability volumes), <stem>_qc.png and <stem>_segment.json.
    2-D images give <stem>_dseg.png and a K-page <stem>_probseg.tif.

    \b
    Examples:
      segment run sample_scans/head_t1.nii.gz -o out/
      segment run t1.nii.gz t2.nii.gz -o out/ -k 3 --mask auto
      segment run slice.png -o out/ -k 3 --no-probseg
      segment run big.nii -o out/ --scheduler tcp://10.0.0.5:8786
    """
    from .api import segment_file

    start = time.perf_counter()
    callback = _progress_printer(kwargs["quiet"])
    result = segment_file(
        list(inputs), out_dir, mask=None if kwargs["mask"] == "none" else kwargs["mask"],
        overwrite=kwargs["overwrite"], probseg=not kwargs["no_probseg"], qc=not kwargs["no_qc"],
        callback=callback, command_line=["segment", *sys.argv[1:]], **_model_kwargs(kwargs),
    )  # fmt: skip
    if callback is not None:
        click.echo("", err=True)
    estimator = result.estimator
    if not kwargs["quiet"]:
        click.echo(
            f"{inputs[0]}: K={estimator.n_components}, {estimator.n_iter_} iterations, "
            f"{'converged' if estimator.converged_ else 'NOT converged'}, log-likelihood/voxel "
            f"{estimator.log_likelihood_ / estimator.n_samples_:.4f}, "
            f"{time.perf_counter() - start:.1f} s",
            err=True,
        )
    for path in result.written:
        click.echo(str(path))


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("predicted", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--ignore-zero", is_flag=True,
              help="Leave out voxels labelled 0 in either map (e.g. outside a mask).")  # fmt: skip
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_handle_errors
def evaluate(predicted: Path, reference: Path, as_json: bool, ignore_zero: bool, debug: bool):
    """Compare a label map PREDICTED with a ground truth REFERENCE.

    Labels are matched to reference classes by the optimal one-to-one assignment (Hungarian);
    prints Dice, Jaccard, volumes in mL and the confusion matrix.

    \b
    Example:
      segment evaluate out/head_t1_dseg.nii.gz sample_scans/head_t1_labels.nii.gz
    """
    import json

    from .evaluate import evaluate_files, format_table

    result = evaluate_files(predicted, reference, ignore_zero=ignore_zero)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``segment`` console script."""
    cli.main(args=argv, prog_name="segment")
