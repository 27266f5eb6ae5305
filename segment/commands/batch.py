"""``segment batch`` (a folder or ``--bids``) and ``segment bids`` (the BIDS-App form)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .common import CONTEXT_SETTINGS, check_memory_limit, handle_errors
from .options import apply_pipeline, check_model_options, model_options

#: ``--memory-limit`` of ``batch`` and ``bids`` (``run`` has its own help text).
_memory_limit_option = click.option(
    "--memory-limit", default=None, metavar="SIZE", callback=check_memory_limit,
    help="Memory to aim for per scan, as for `segment run` [default: 3GB].",
)  # fmt: skip


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


@click.command(context_settings=CONTEXT_SETTINGS)
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
@_memory_limit_option
@model_options(batch=True)
@handle_errors
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
    from ..exceptions import SegmentError
    from ..scan_masks import MaskSpec

    if out_dir is None and not kwargs["bids"]:
        raise click.UsageError("Missing option '-o' / '--out-dir' (required unless --bids).")
    if not kwargs["bids"] and (kwargs["subjects"] or kwargs["sessions"] or kwargs["suffixes"]):
        raise click.UsageError("--subject, --session and --suffix need --bids.")
    pipeline, extra = apply_pipeline(kwargs)
    check_model_options(kwargs, extra)
    _refuse_write_corrected(kwargs)
    try:
        MaskSpec.parse(kwargs["mask"], bids=kwargs["bids"])
    except SegmentError as error:
        where = "'--mask'" if extra["option_sources"]["mask"] == "command line" else (
            f"the mask of pipeline {pipeline.name}")  # fmt: skip
        raise click.BadParameter(str(error), param_hint=where) from None
    _run_batch(input_dir, out_dir, kwargs, pipeline, extra)


def _refuse_write_corrected(kwargs) -> None:
    # not written by batch yet: refused rather than silently ignored
    if kwargs.get("write_corrected"):
        raise click.UsageError(
            "--write-corrected is only written by `segment run` for now; run it on the scans "
            "whose corrected image you need"
        )


def _run_batch(input_dir, out_dir, kwargs, pipeline, extra, **where) -> None:
    """Run the batch of ``batch`` or ``bids``, report, exit 1 if a scan failed."""
    from ..batch import run_batch

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


@click.command("bids", context_settings=CONTEXT_SETTINGS)
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
@_memory_limit_option
@model_options(batch=True)
@handle_errors
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
    from ..discovery import check_bids_app
    from ..exceptions import SegmentError
    from ..scan_masks import MaskSpec

    if more_labels and not kwargs["subjects"]:
        raise click.UsageError(f"Got unexpected extra arguments ({' '.join(more_labels)}).")
    kwargs["subjects"] = (*kwargs["subjects"], *more_labels)
    try:
        check_bids_app(bids_dir, output_dir, kwargs["subjects"])
    except SegmentError as error:  # one line, exit 2 (a usage error), nothing written
        raise _BadBidsInput(str(error)) from None
    pipeline, extra = apply_pipeline(kwargs)
    check_model_options(kwargs, extra)
    _refuse_write_corrected(kwargs)
    try:
        MaskSpec.parse(kwargs["mask"], bids=True)
    except SegmentError as error:
        raise click.BadParameter(str(error), param_hint="'--mask'") from None
    _run_batch(bids_dir, None, kwargs, pipeline, extra, derivative_dir=output_dir)
