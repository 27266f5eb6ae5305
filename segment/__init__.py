"""segment: tissue segmentation of medical scans with a Gaussian mixture fitted by EM."""

__version__ = "0.1.0"

from .exceptions import ConvergenceWarning, DataWarning, InputError, SegmentError  # noqa: E402
from .mixture import GaussianMixtureEM  # noqa: E402

__all__ = [
    "GaussianMixtureEM",
    "SegmentError",
    "InputError",
    "ConvergenceWarning",
    "DataWarning",
    "__version__",
]
