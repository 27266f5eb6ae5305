"""Default values of the model options, shared by the API, the CLI and the pipelines.

Kept free of heavy imports so that ``segment --help`` and ``segment pipelines`` stay fast.
"""

from __future__ import annotations

from typing import Any

#: Model options and their defaults (names as in :func:`segment.segment_array`).
DEFAULT_OPTIONS: dict[str, Any] = {
    "n_components": 6,
    "max_iter": 300,
    "tol": 1e-4,
    "variance_floor": None,
    "seed": 0,
    "chunk_size": None,
    "scheduler": None,
    "workers": None,
    "mrf_beta": 0.0,
    "bias_field": False,
    "bias_smoothness": 40.0,
    "pve": False,
}

#: Options that say where the work runs, not what is fitted (not part of a pipeline).
EXECUTION_OPTIONS = ("scheduler", "workers")
