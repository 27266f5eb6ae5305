"""The ``segment`` command line: the click group; each command is in :mod:`segment.commands`.

Heavy imports (dask, nibabel, scipy) happen inside the commands so ``--help`` is instant.
Library errors become one-line messages: exit 1 for data errors, 2 for usage errors; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import click

from . import __version__
from .commands.batch import batch, bids
from .commands.common import CONTEXT_SETTINGS
from .commands.options import DEFAULT_MRF_BETA
from .commands.run import run
from .commands.tools import evaluate, pipelines_command, samples

__all__ = ["cli", "main", "DEFAULT_MRF_BETA"]


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="segment")
def cli() -> None:
    """Segment medical scans into tissues with a Gaussian mixture fitted by EM.

    \b
    Quick start:
      segment run sample_scans/head_t1.nii.gz -o out/
      segment evaluate out/head_t1_dseg.nii.gz sample_scans/head_t1_labels.nii.gz
    """


cli.add_command(run)
cli.add_command(batch)
cli.add_command(bids)
cli.add_command(evaluate)
cli.add_command(samples)
cli.add_command(pipelines_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``segment`` console script."""
    cli.main(args=argv, prog_name="segment")
