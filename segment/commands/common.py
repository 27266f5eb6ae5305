"""What every command shares: error handling, warnings, progress, parameter types.

Library errors become one-line messages: exit 1 for data errors, 2 for usage errors; a
traceback only with ``--debug``. Heavy imports happen inside the functions, so ``--help`` is
instant.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def handle_errors(func):
    """Turn library errors into click errors (exit 1, one line) unless --debug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ..exceptions import SegmentError

        debug = kwargs.get("debug", False)
        quiet = kwargs.get("quiet", False)
        if debug:  # nibabel's own header reports too (see segment.io.read)
            os.environ["SEGMENT_DEBUG"] = "1"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if quiet else "default")
            if not debug:
                warnings.showwarning = show_warning
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


def show_warning(message, category, filename, lineno, file=None, line=None):
    """One ``warning:`` line for segment's own warnings; third-party ones only with --debug."""
    from ..exceptions import ConvergenceWarning, DataWarning

    own = issubclass(category, ConvergenceWarning | DataWarning) or str(filename).startswith(
        _PACKAGE_DIR
    )
    if not own:
        return
    ProgressLine.end()
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


_PACKAGE_DIR = str(Path(__file__).parents[1])


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
        from .._validation import check_k_range
        from ..exceptions import SegmentError

        try:
            check_k_range(text)
        except SegmentError as error:
            self.fail(str(error), param, ctx)
        return text.lower()


def check_memory_limit(ctx, param, value):
    if value is None:
        return value
    from .._validation import memory_budget
    from ..exceptions import SegmentError

    try:
        memory_budget(value)
    except SegmentError as error:
        raise click.BadParameter(str(error)) from None
    return value


def check_pipeline(ctx, param, value):
    """``-p``: an unknown name or a malformed file is a usage error (exit 2)."""
    if not value:
        return value
    from ..exceptions import SegmentError
    from ..pipelines import load_pipeline

    try:
        load_pipeline(value)
    except (SegmentError, OSError) as error:
        raise click.BadParameter(" ".join(str(error).split())) from None
    return value


class ProgressLine:
    """EM progress rewritten in place on one stderr line; ended before anything else prints."""

    is_open = False

    def __init__(self) -> None:
        self.current = "EM"

    def phase(self, name: str) -> None:
        """A new phase (initialisation, EM, bias field EM, MRF sweep n, writing) starts."""
        self.current = name
        click.echo(f"\r\033[K  {name}", err=True, nl=False)
        ProgressLine.is_open = True

    def __call__(self, iteration: int, log_likelihood: float, change: float) -> None:
        click.echo(
            f"\r\033[K  {self.current} iteration {iteration:4d}  log-likelihood "
            f"{log_likelihood:.6e}  change/voxel {change:.2e}",
            err=True,
            nl=False,
        )
        ProgressLine.is_open = True

    @classmethod
    def end(cls) -> None:
        """Finish the progress line (if one is open) so the next message starts a new line."""
        if cls.is_open:
            cls.is_open = False
            click.echo("", err=True)


def progress_printer(quiet: bool):
    """Print EM progress to stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return ProgressLine()


def check_scheduler_option(ctx, param, value):
    if value is None:
        return value
    from .._scheduler import check_scheduler

    try:
        return check_scheduler(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
