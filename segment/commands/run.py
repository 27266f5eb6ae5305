"""``segment run``: one scan, or several co-registered channels of one scan."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .common import (
    CONTEXT_SETTINGS,
    ProgressLine,
    check_memory_limit,
    handle_errors,
    progress_printer,
)
from .options import apply_pipeline, check_model_options, model_kwargs, model_options


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1, required=True,  # unreadable: load_scan's exit-1 message
                type=click.Path(path_type=Path, readable=False))  # fmt: skip
@click.option("-o", "--out-dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (created if needed).")  # fmt: skip
@click.option("--memory-limit", default=None, metavar="SIZE", callback=check_memory_limit,
              help="Memory to aim for, e.g. 1.5GB [default: 3GB]: above a third of it the "
                   "probability maps are streamed slab by slab instead of kept; --mrf and "
                   "--bias-field refuse scans whose estimated need exceeds it.")  # fmt: skip
@model_options
@handle_errors
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
    from ..api import segment_file

    start = time.perf_counter()
    pipeline, extra = apply_pipeline(kwargs)
    check_model_options(kwargs, extra)
    if "{" in kwargs["mask"] or "}" in kwargs["mask"]:
        from ..exceptions import SegmentError
        from ..scan_masks import MaskSpec

        try:
            MaskSpec.parse(kwargs["mask"])
        except SegmentError as error:
            raise click.BadParameter(str(error), param_hint="'--mask'") from None
    callback = progress_printer(kwargs["quiet"])
    try:
        result = segment_file(
            list(inputs), out_dir, mask=None if kwargs["mask"] == "none" else kwargs["mask"],
            overwrite=kwargs["overwrite"], probseg=not kwargs["no_probseg"],
            qc=not kwargs["no_qc"], callback=callback, corrected=kwargs["write_corrected"],
            qc_histogram=kwargs["qc_histogram"],
            memory_limit=kwargs["memory_limit"], compresslevel=kwargs["compression_level"],
            command_line=["segment", *sys.argv[1:]], extra=extra, **model_kwargs(kwargs),
            class_names=list(pipeline.labels) if pipeline else None,
        )  # fmt: skip
    finally:
        ProgressLine.end()  # also before an error message
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
