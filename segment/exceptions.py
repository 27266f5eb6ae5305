"""Exceptions and warnings raised by :mod:`segment`.

The library raises these typed errors; the command-line interface turns them into one-line
messages and exit codes (1 for data errors, 2 for usage errors).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SegmentError", "InputError", "NotFittedError", "ConvergenceWarning", "DataWarning",
    "PerformanceWarning",
]  # fmt: skip


class SegmentError(ValueError):
    """A problem with the data or the parameters that the user can fix."""


class InputError(SegmentError):
    """A problem with one input file; the message names the file.

    Parameters
    ----------
    path : str or Path
        The offending file.
    message : str
        What is wrong and, where possible, how to fix it.
    """

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class NotFittedError(SegmentError, AttributeError):
    """An estimator was used before ``fit``.

    A ``ValueError`` and an ``AttributeError``, like scikit-learn's ``NotFittedError``, so the
    checks that catch either (``check_is_fitted``, ``hasattr``) see it.
    """


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the log-likelihood converged."""


class DataWarning(UserWarning):
    """Something about the data was changed or left out (non-finite voxels, RGB, re-seeding)."""


class PerformanceWarning(UserWarning):
    """The compiled kernels are off (not built, or ``SEGMENT_NO_COMPILED=1``): the same results
    on numpy, several times slower."""
