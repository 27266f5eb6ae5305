"""The run options, declared once: name, type, default, help, valid range, layer, effect.

Everything else is derived from :data:`OPTIONS`:

- the click options of ``segment run``, ``batch`` and ``bids`` (:mod:`segment.commands.options`);
- the checks of a pipeline TOML's ``[model]`` and ``[outputs]`` tables (:mod:`segment.pipelines`);
- the estimator's constructor arguments (:func:`estimator_kwargs`, used by
  :func:`segment.api.make_estimator`);
- the sidecar's record of how a run was made (:func:`run_record`);
- the batch resume key (:func:`resume_key`): the options that change results.

Adding an option is one :class:`Option` entry here plus its implementation (the estimator
parameter it sets, or the code that reads it).

Kept free of heavy imports (no numpy, no click) so that ``segment --help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Option",
    "OPTIONS",
    "DEFAULT_OPTIONS",
    "EXECUTION_OPTIONS",
    "DEFAULT_SETTINGS",
    "LAYERS",
    "estimator_kwargs",
    "run_record",
    "resume_key",
]

#: Who consumes an option: the model fitted, where the work runs, or what is written.
LAYERS = ("model", "execution", "output")


@dataclass(frozen=True)
class Option:
    """One run option.

    Attributes
    ----------
    name : str
        The Python keyword (:func:`segment.segment_array`) and pipeline TOML key.
    kind : {"int", "float", "bool", "str", "k"}
        Value type; ``"k"`` is ``n_components``: an integer or ``"auto"`` / ``"auto:A-B"``.
    default : object
        Value when nobody sets it (``None``: decided at run time, see ``help``).
    help : str
        The command line's help text.
    layer : {"model", "execution", "output"}
        Who consumes it (:data:`LAYERS`).
    changes_results : bool
        Whether another value gives other labels or probabilities: such options form the
        batch resume key and the sidecar's ``options`` record.
    low, high : float, optional
        Valid range (inclusive; ``low_open`` makes the lower bound exclusive).
    flags : tuple of str
        click declarations, e.g. ``("-k", "--n-components")`` or ``("--pve/--no-pve",)``;
        empty: not a command-line option.
    dest : str, optional
        click parameter name when it differs from ``name`` (``no_probseg`` for ``probseg``:
        the flag is the negation).
    section : {"model", "outputs", "top"} or None
        Where a pipeline TOML sets it (``None``: not in pipelines).
    estimator_param : str, optional
        The :class:`segment.GaussianMixtureEM` parameter it sets.
    metavar : str, optional
    show_default : bool
    batch_help : str, optional
        Help text for ``segment batch`` / ``bids`` when it differs.
    choices : tuple of str, optional
        The values a ``"str"`` option takes (a click ``Choice``).
    """

    name: str
    kind: str
    default: Any
    help: str
    layer: str
    changes_results: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    flags: tuple[str, ...] = ()
    dest: str | None = None
    section: str | None = "model"
    estimator_param: str | None = None
    metavar: str | None = None
    show_default: bool = True
    batch_help: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def param(self) -> str:
        """The click parameter's name."""
        return self.dest or self.name

    @property
    def inverted(self) -> bool:
        """The click flag says the opposite of the option (``--no-probseg``)."""
        return self.dest is not None and self.dest == f"no_{self.name}"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid (type and range), as a pipeline TOML gives it."""
        if value is None:
            return self.default is None and self.section is None
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            if self.choices is not None:
                return value in self.choices
            return isinstance(value, str) and value.strip() != ""
        if self.kind == "k" and isinstance(value, str):
            from ._validation import check_k_range  # numpy: only when a range is given
            from .exceptions import SegmentError

            try:
                return check_k_range(value) is not None
            except SegmentError:
                return False
        integer = isinstance(value, int) and not isinstance(value, bool)
        number = integer or (isinstance(value, float) and math.isfinite(value))
        if not (integer if self.kind in ("int", "k") else number):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def expected(self) -> str:
        """What :meth:`accepts` wants, for error messages."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            if self.choices is not None:
                return " or ".join(repr(c) for c in self.choices)
            return "a non-empty string"
        what = "an integer" if self.kind in ("int", "k") else "a number"
        low, high = (f"{b:g}" if isinstance(b, float) else str(b) for b in (self.low, self.high))
        if self.low is not None and self.high is not None:
            what = f"{what} between {low} and {high}"
        elif self.low is not None:
            what = f"{what} {'>' if self.low_open else '>='} {low}"
        if self.kind == "k":
            what += ", 'auto' or 'auto:A-B' (K chosen by BIC, e.g. auto:2-8)"
        return what


_MASK_HELP = (
    "Voxels to model: a mask file on the same grid, 'auto' (everything but the background: "
    "the whole head of a whole-head scan, the brain of a skull-stripped one) or 'none' (all)."
)
_BATCH_MASK_HELP = (
    "Voxels to model: 'none' (all), 'auto' (everything but the background: the whole "
    "head, or the brain of a skull-stripped scan), one mask file for every scan, or a "
    "template giving each scan its own mask: "
    "{stem} is the scan's name without extension, {rel} its folder relative to INPUT_DIR, "
    "e.g. '{stem}_brainmask.nii.gz' (next to each scan) or '/data/masks/{rel}/{stem}_mask.nii'. "
    "With --bids, 'bids' takes each scan's derivatives/*/sub-*/[ses-*/]anat/*_desc-brain_mask "
    "file. Files used as masks are not segmented."
)

#: Every run option, in the order of ``segment run --help``.
OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("n_components", "k", 6, "Number of tissue classes K, or 'auto' (K = 2..8) / "
               "'auto:A-B': fit each K and keep the lowest BIC (the curve goes in the sidecar).",
               "model", True, 1, 255, flags=("-k", "--n-components"),
               estimator_param="n_components"),
        Option("mask", "str", "none", _MASK_HELP, "model", True, flags=("--mask",),
               section="top", metavar="PATH|auto|none", batch_help=_BATCH_MASK_HELP),
        Option("max_iter", "int", 300, "Maximum EM iterations.", "model", True, 1,
               flags=("--max-iter",), estimator_param="max_iter"),
        Option("tol", "float", 1e-4, "Stop when the log-likelihood changes less than this per "
               "voxel.", "model", True, 0, flags=("--tol",), estimator_param="tol"),
        Option("seed", "int", 0, "Seed of the k-means initialisation.", "model", True, 0,
               2**32 - 1, flags=("--seed",), estimator_param="random_state"),
        Option("variance_floor", "float", None, "Smallest variance (intensity^2) [default: 1e-3 "
               "x the data variance].", "model", True, 0, low_open=True,
               flags=("--variance-floor",), estimator_param="variance_floor",
               show_default=False),
        Option("chunk_size", "int", None, "Voxels per chunk [default: 262144].", "execution",
               False, 1, 2**31 - 1, flags=("--chunk-size",), estimator_param="chunk_size",
               show_default=False),
        Option("scheduler", "str", None, "Dask scheduler [default: threads].", "execution",
               False, flags=("--scheduler",), section=None, estimator_param="scheduler",
               metavar="threads|processes|synchronous|tcp://HOST:PORT", show_default=False),
        Option("workers", "int", None, "Threads/processes for the local schedulers [default: "
               "all cores].", "execution", False, 1, 4096, flags=("--workers",), section=None,
               estimator_param="n_workers", show_default=False),
        Option("mrf_beta", "float", 0.0, "MRF strength beta (0 = off), in FSL FAST's units; "
               "implies --mrf.", "model", True, 0, flags=("--mrf-beta",),
               estimator_param="mrf_beta", metavar="B", show_default=False),
        Option("bias_field", "bool", False, "Estimate a smooth multiplicative bias field inside "
               "the EM [default: off].", "model", True, flags=("--bias-field/--no-bias-field",),
               estimator_param="bias_field", show_default=False),
        Option("bias_smoothness", "float", 40.0, "Bias field smoothness as a length in mm "
               "(smaller: faster variations).", "model", True, 0, low_open=True,
               flags=("--bias-smoothness",), estimator_param="bias_smoothness", metavar="MM"),
        Option("pv_fit", "bool", False, "Fit each class's Gaussian under a partial-volume "
               "model (mixed voxels between classes adjacent in intensity), so that labels "
               "follow the largest tissue fraction [default: off; on in the MRI presets].",
               "model", True, flags=("--pv-fit/--no-pv-fit",), estimator_param="pv_fit",
               show_default=False),
        Option("pve", "bool", False, "Also write partial-volume fractions, <stem>_pve (one "
               "volume per class, in [0,1], summing to 1 in the mask), from a mixed-voxel model "
               "of classes adjacent in intensity; volumes in the sidecar then come from them. "
               "Needs -k 2 or more [default: off].", "model", True, flags=("--pve/--no-pve",),
               show_default=False),
        Option("probseg", "bool", True, "Do not write the probability maps [default: write "
               "them].", "output", False, flags=("--no-probseg/--probseg",), dest="no_probseg",
               section="outputs", show_default=False),
        Option("qc", "bool", True, "Do not write the QC picture [default: write it].", "output",
               False, flags=("--no-qc/--qc",), dest="no_qc", section="outputs",
               show_default=False),
        Option("qc_histogram", "str", "linear", "Counts axis of the QC histogram (log: small "
               "classes stay visible).", "output", False, flags=("--qc-histogram",),
               section="outputs", choices=("linear", "log")),
    )
}  # fmt: skip

#: Options of :func:`segment.segment_array` and their defaults (model and execution layers).
DEFAULT_OPTIONS: dict[str, Any] = {
    name: option.default
    for name, option in OPTIONS.items()
    if option.layer != "output" and option.section != "top"
}

#: Options that say where the work runs, not what is fitted (not part of a pipeline).
EXECUTION_OPTIONS = tuple(n for n, o in OPTIONS.items() if o.layer == "execution" and not o.section)

#: Final settings when neither a pipeline nor the command line says otherwise.
DEFAULT_SETTINGS: dict[str, Any] = {n: o.default for n, o in OPTIONS.items() if o.section}


def estimator_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """:class:`segment.GaussianMixtureEM` keyword arguments from run options (defaults filled)."""
    merged = {**DEFAULT_OPTIONS, **options}
    return {o.estimator_param: merged[n] for n, o in OPTIONS.items() if o.estimator_param}


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars to Python, everything else as it is."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def run_record(options: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's ``options``: every :data:`DEFAULT_OPTIONS` key, defaults filled.

    Keys outside the table are kept after them (a caller's extra settings).
    """
    merged = {**DEFAULT_OPTIONS, **options}
    return {name: _plain(merged[name]) for name in [*DEFAULT_OPTIONS, *options] if name in merged}


def resume_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The result-changing settings, defaults filled: what a batch compares to resume.

    Settings missing from ``settings`` (e.g. an option added after a sidecar was written) take
    their default, so older sidecars still match when the new option is at its default.
    """
    merged = {**DEFAULT_SETTINGS, **settings}
    return {n: _plain(merged[n]) for n, o in OPTIONS.items() if o.changes_results and n in merged}
