"""``segment evaluate``, ``segment samples`` and ``segment pipelines``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import CONTEXT_SETTINGS, handle_errors


@click.command(context_settings=CONTEXT_SETTINGS)
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
@handle_errors
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

    from ..evaluate import evaluate_files, format_table
    from ..evaluate_fractions import evaluate_fraction_files, format_fraction_table

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


@click.command(context_settings=CONTEXT_SETTINGS)
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
@handle_errors
def samples(out_dir: Path, noise, nonuniformity, shape, seed, overwrite, debug) -> None:
    """Generate phantom scans with ground truth into OUT_DIR [default: sample_scans].

    Without options, writes the set shipped in sample_scans/. With --noise, --nonuniformity
    or --shape, writes one head phantom and its labels.
    """
    from ..samples import generate

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


@click.command("pipelines", context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, metavar="[NAME|FILE]")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def pipelines_command(name: str | None, debug: bool) -> None:
    """List the pipeline presets, or check and print one (NAME or a .toml FILE).

    Use a preset with `segment run/batch --pipeline NAME`; options given on the command line
    override it. Copy a preset's file to make your own.
    """
    from ..pipelines import list_pipelines, load_pipeline

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
