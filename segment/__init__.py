"""segment: tissue segmentation of medical scans with a Gaussian mixture fitted by EM.

The estimator and the file API are imported lazily (on first attribute access) so that
``segment --help`` does not pay for importing Dask.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .exceptions import (  # noqa: E402
    ConvergenceWarning,
    DataWarning,
    InputError,
    NotFittedError,
    PerformanceWarning,
    SegmentError,
)

__all__ = [
    "GaussianMixtureEM",
    "SpatialGaussianMixture",
    "segment_file",
    "segment_array",
    "SegmentationResult",
    "SegmentError",
    "InputError",
    "NotFittedError",
    "ConvergenceWarning",
    "DataWarning",
    "PerformanceWarning",
    "__version__",
]

# Public name -> submodule that defines it (imported on first use).
_LAZY = {
    "GaussianMixtureEM": "mixture",
    "SpatialGaussianMixture": "spatial.model",
    "segment_file": "api",
    "segment_array": "api",
    "SegmentationResult": "api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
