"""Segment arrays and files: the library calls behind ``segment run`` and ``segment batch``."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _validation, masking, naming
from ._options import DEFAULT_OPTIONS, estimator_kwargs, run_record
from ._validation import (
    check_compresslevel,
    check_mask_spec,
    check_out_dir_creatable,
    check_outputs_free,
    memory_budget,
)
from .exceptions import ConvergenceWarning, DataWarning, InputError, SegmentError
from .mixture import GaussianMixtureEM
from .result import SegmentationResult, bias_output_paths, ensure_out_dir  # noqa: F401
from .scan_masks import MaskSpec
from .spatial.model import SpatialGaussianMixture, bounding_box

__all__ = ["segment_array", "segment_file", "SegmentationResult", "DEFAULT_OPTIONS"]


def make_estimator(options: dict[str, Any], callback: Callable | None = None) -> GaussianMixtureEM:
    """A :class:`GaussianMixtureEM` (a :class:`SpatialGaussianMixture` with --mrf or
    --bias-field) from the run options (:data:`segment._options.OPTIONS`).

    Each option with an ``estimator_param`` sets that parameter (``seed`` -> ``random_state``,
    ``workers`` -> ``n_workers``...); ``n_components="auto"`` is checked with its smallest K.
    """
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise SegmentError(
            f"unknown option(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_OPTIONS)}"
        )
    merged = {**DEFAULT_OPTIONS, **options}
    k_values = _validation.check_k_range(merged["n_components"])
    if k_values is not None:  # n_components="auto": each K is checked like the smallest
        merged["n_components"] = k_values[0]
    from .partial_volume import check_pve

    check_pve(merged["pve"], merged["n_components"])
    kwargs = estimator_kwargs(merged)
    estimator = GaussianMixtureEM(kwargs.pop("n_components"), callback=callback, **kwargs)
    estimator.validate_parameters()
    if estimator.uses_grid:  # the image model: grid, MRF prior, bias field, memory budget
        estimator = SpatialGaussianMixture(**estimator.get_params(deep=False))
    return estimator


def _as_channels(array: Any, channel_axis: int | None) -> list[np.ndarray]:
    if isinstance(array, (list, tuple)):
        channels = [np.asarray(a) for a in array]
    elif channel_axis is None:
        channels = [np.asarray(array)]
    else:
        channels = list(np.moveaxis(np.asarray(array), channel_axis, 0))
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise SegmentError(f"all channels must have the same shape, got {sorted(shapes)}")
    if channels[0].ndim < 2 or sum(n > 1 for n in channels[0].shape) < 2:
        raise SegmentError(
            f"segment_array needs a 2-D or 3-D image, got shape {channels[0].shape}; "
            "for a flat list of intensities use GaussianMixtureEM directly"
        )
    return channels


def segment_array(
    array: Any,
    mask: np.ndarray | None = None,
    *,
    channel_axis: int | None = None,
    spacing: Sequence[float] | None = None,
    callback: Callable | None = None,
    memory_limit: int | str | None = None,
    **options: Any,
) -> SegmentationResult:
    """Segment an image array into ``n_components`` tissue classes.

    Parameters
    ----------
    array : 2-D or 3-D array, or a list of such arrays (co-registered channels)
        Intensities. Non-finite voxels are left out and labelled 0.
    mask : bool array of the image's shape, optional
        Voxels to model (default: all).
    channel_axis : int, optional
        Axis of ``array`` that holds channels, if any.
    spacing : sequence of float, optional
        Voxel size in mm per axis (default 1 mm); used by the MRF prior and the bias field.
    callback : callable, optional
        ``callback(iteration, log_likelihood, change)`` after each EM iteration.
    memory_limit : int or str, optional
        Memory to aim for, in bytes or as ``"1.5GB"`` (default 3 GB). When the voxels x K
        probabilities would take more than a third of it, they are not kept: the probability
        maps are recomputed when written, in one pass over slabs of all K maps (no whole map
        in memory; see :meth:`SegmentationResult.responsibility_volumes`).
    **options
        ``n_components`` (6), ``max_iter`` (300), ``tol`` (1e-4), ``variance_floor``
        (1e-3 x data variance), ``seed`` (0), ``chunk_size``, ``scheduler``, ``workers``,
        ``mrf_beta`` (0: off; the MRI presets use 0.2), ``bias_field`` (False) and
        ``bias_smoothness`` (40 mm). See :class:`segment.GaussianMixtureEM`.

    Returns
    -------
    SegmentationResult

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((20, 30)); image[:, 15:] = 100
    >>> image += np.random.default_rng(0).normal(0, 5, image.shape)
    >>> result = segment_array(image, n_components=2)
    >>> np.unique(result.labels[:, :15]), np.unique(result.labels[:, 15:])
    (array([1], dtype=uint8), array([2], dtype=uint8))
    """
    if options.get("pve"):  # fractions are computed from the channels when read: a private copy
        array, channel_axis = [np.array(c) for c in _as_channels(array, channel_axis)], None
    return _segment_array(
        array, mask, channel_axis=channel_axis, spacing=spacing, callback=callback,
        memory_limit=memory_limit, **options,
    )  # fmt: skip


def _segment_array(
    array, mask, *, channel_axis=None, spacing=None, callback=None, memory_limit=None, **options
):
    """:func:`segment_array` on channels that nobody else changes (files read by the package)."""
    if _validation.check_k_range(options.get("n_components", 6)) is not None:
        return _segment_array_auto(
            array, mask, channel_axis=channel_axis, spacing=spacing, callback=callback,
            memory_limit=memory_limit, **options,
        )  # fmt: skip
    estimator = make_estimator(options, callback)
    memory_budget(memory_limit)
    channels = _as_channels(array, channel_axis)
    valid, n_nonfinite = masking.valid_voxels(channels, mask)
    if n_nonfinite:
        warnings.warn(
            f"{n_nonfinite} non-finite voxels (NaN or inf) were left out and labelled 0",
            DataWarning,
            stacklevel=2,
        )
    if not valid.any():
        raise SegmentError("no voxel to fit: every voxel in the mask is NaN or inf")
    start = time.perf_counter()
    if estimator.uses_grid:  # the spatial model needs the image grid, not a flat vector
        _check_spatial_memory(valid, estimator.n_components, channels, memory_limit)
        estimator.set_params(posterior_memory_limit=memory_budget(memory_limit))
        stacked = channels[0][..., None] if len(channels) == 1 else np.stack(channels, -1)
        estimator.fit_image(stacked, valid, spacing=spacing, channel_axis=-1)
        del stacked
        X, responsibilities = None, estimator.responsibilities_
        timings = {"fit_s": time.perf_counter() - start}
        if responsibilities is None:
            # streamed: the labels are computed on first use, or while save() writes the maps
            result = SegmentationResult(
                labels=None, flat_responsibilities=None, channels=[], estimator=estimator,
                mask=valid, n_nonfinite=n_nonfinite, options=run_record(options),
                timings=timings, mask_spec="array" if mask is not None else "none",
            )  # fmt: skip
            return _with_fractions(result, channels, options.get("pve", False))
        labels = (np.argmax(responsibilities, axis=1) + 1).astype(np.uint8)
    else:
        X = masking.flatten(channels[0] if len(channels) == 1 else np.stack(channels, -1), valid)
        timings = {"flatten_s": time.perf_counter() - start}
        start = time.perf_counter()
        estimator.fit(X)
        timings["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if X.shape[0] * (estimator.n_components + 1) * 4 <= memory_budget(memory_limit) / 3:
            labels, responsibilities = estimator.predict_with_proba(X)
        else:  # too big to keep: labels now, probability maps recomputed slab by slab
            labels, responsibilities = estimator.predict_labels(X), None
        timings["predict_s"] = time.perf_counter() - start
    result = SegmentationResult(
        labels=masking.unflatten(labels, valid),
        flat_responsibilities=responsibilities,
        channels=channels if responsibilities is None else None,
        estimator=estimator,
        mask=valid,
        n_nonfinite=n_nonfinite,
        options=run_record(options),
        timings=timings,
        mask_spec="array" if mask is not None else "none",
    )
    return _with_fractions(result, channels, options.get("pve", False))


def select_n_components(X: Any, k_values: Sequence[int], **options: Any) -> dict[str, Any]:
    """Choose K by BIC: fit the plain mixture for each K in ``k_values`` and take the lowest.

    Each fit is :meth:`GaussianMixtureEM.fit` on the flat features (the distinct-values path
    for integer scans), without MRF or bias field; ``BIC = -2 log L + p log N`` with ``p``
    the free parameters of scikit-learn's ``GaussianMixture`` (:meth:`GaussianMixtureEM.bic`).

    Parameters
    ----------
    X : (N, D) array
        The fitted voxels' features.
    k_values : sequence of int
        At least two values of K.
    **options
        Model options of :func:`segment_array` (``n_components`` is replaced by each K).

    Returns
    -------
    dict
        ``criterion`` ("BIC"), ``n_components`` (the K chosen), ``tried`` (the K fitted) and
        ``curve``: one record per K with ``bic``, ``log_likelihood``, ``n_parameters`` and
        ``converged``. K above the number of distinct intensities are left out.
    """
    from ._estimator import n_parameters

    plain = {**options, "mrf_beta": 0.0, "bias_field": False, "pv_fit": False, "pve": False}
    curve = []
    for k in k_values:
        estimator = make_estimator({**plain, "n_components": int(k)})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                estimator.fit(X)
        except SegmentError as error:
            if "distinct" in str(error) and curve:
                break  # fewer distinct intensities than K: larger K cannot be fitted either
            raise
        p = n_parameters(k, estimator.n_features_in_)
        n = float(estimator.n_samples_)
        curve.append({
            "n_components": int(k),
            "bic": float(-2.0 * estimator.log_likelihood_ + p * np.log(n)),
            "log_likelihood": float(estimator.log_likelihood_),
            "n_parameters": int(p),
            "converged": bool(estimator.converged_),
        })  # fmt: skip
    best = min(curve, key=lambda row: row["bic"])
    return {
        "criterion": "BIC",
        "n_components": best["n_components"],
        "tried": [row["n_components"] for row in curve],
        "n_voxels": float(estimator.n_samples_),
        "curve": curve,
    }


def _segment_array_auto(array, mask, *, channel_axis, spacing, callback, memory_limit, **options):
    """:func:`segment_array` with K chosen by :func:`select_n_components` first."""
    requested = options["n_components"]
    k_values = _validation.check_k_range(requested)
    make_estimator(options)  # the other options' errors before any fit
    channels = _as_channels(array, channel_axis)
    valid, _ = masking.valid_voxels(channels, mask)
    if not valid.any():
        raise SegmentError("no voxel to fit: every voxel in the mask is NaN or inf")
    start = time.perf_counter()
    X = masking.flatten(channels[0] if len(channels) == 1 else np.stack(channels, -1), valid)
    selection = select_n_components(X, k_values, **options)
    del X
    selection_s = time.perf_counter() - start
    result = _segment_array(
        array, mask, channel_axis=channel_axis, spacing=spacing, callback=callback,
        memory_limit=memory_limit, **{**options, "n_components": selection["n_components"]},
    )  # fmt: skip
    result.model_selection = {"requested": str(requested), **selection}
    result.timings["select_k_s"] = selection_s
    return result


def _with_fractions(result: SegmentationResult, channels, pve: bool) -> SegmentationResult:
    """``result`` with its partial-volume fractions when ``pve`` (see :mod:`partial_volume`)."""
    if not pve:
        return result
    from . import partial_volume

    start = time.perf_counter()
    posterior = None
    if result.estimator.mrf_beta > 0:  # the MRF posterior of the pure classes as the prior
        posterior = result.flat_responsibilities
        if posterior is None:  # recomputed slab by slab with the fractions
            posterior = result.responsibility_volumes().slabs
    maps = partial_volume.FractionMaps(result.estimator, channels, result.mask, posterior)
    result.fraction_maps = maps
    result.pve_record = partial_volume.model_record(maps.model, maps.trace)
    result.timings["pve_s"] = time.perf_counter() - start
    return result


def spatial_memory_estimate(
    mask: np.ndarray, n_components: int, n_channels: int = 1, itemsize: int = 4
) -> float:
    """Bytes the MRF / bias-field path needs at least, beyond the input scan itself.

    Per voxel of the mask's bounding box: the uint8 posterior grid (K + 1 bytes) and the
    stacked channels; per voxel of the grid: the mask, the labels and the bias field
    (float32 per channel); per fitted voxel: the flattened features. The K float32 maps are
    kept only when they fit a third of the memory limit, else streamed, so they are not
    counted here.
    """
    box = int(np.prod([s.stop - s.start for s in bounding_box(mask)]))
    per_box_voxel = n_components + 1 + itemsize * n_channels
    per_grid_voxel = 2 + 4 * n_channels
    return float(
        box * per_box_voxel + mask.size * per_grid_voxel + int(mask.sum()) * itemsize * n_channels
    )


def _check_spatial_memory(mask, n_components, channels, memory_limit) -> None:
    itemsize = max(np.asarray(c).dtype.itemsize for c in channels)
    needed, budget = (
        spatial_memory_estimate(mask, n_components, len(channels), itemsize),
        memory_budget(memory_limit),
    )
    if needed > budget:
        raise SegmentError(
            f"the MRF prior and bias field keep the posterior on the image grid: about "
            f"{needed / 1e9:.1f} GB for this scan ({int(mask.sum()):,} voxels, K={n_components})"
            f", over the memory limit of {budget / 1e9:.1f} GB; raise --memory-limit "
            "(memory_limit=), fit inside a mask, or turn them off"
        )


def segment_file(
    path_or_paths: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    mask: str | Path | None = None,
    overwrite: bool = False,
    probseg: bool = True,
    qc: bool = True,
    callback: Callable | None = None,
    command_line: Sequence[str] | None = None,
    output_paths: naming.OutputPaths | None = None,
    extra: dict[str, Any] | None = None,
    corrected: bool = False,
    memory_limit: int | str | None = None,
    compresslevel: int | None = None,
    class_names: Sequence[str] | None = None,
    qc_histogram: str = "linear",
    **options: Any,
) -> SegmentationResult:
    """Segment a scan file (or several co-registered channel files) and optionally save it.

    Parameters
    ----------
    path_or_paths : path or list of paths
        NIfTI (``.nii``, ``.nii.gz``) or 2-D images (PNG, TIFF, JPEG, BMP). Several paths on
        the same grid are the channels of one scan.
    out_dir : path, optional
        Write ``<stem>_dseg``, ``<stem>_probseg``, ``<stem>_qc.png`` and ``<stem>_segment.json``
        here (see :meth:`SegmentationResult.save`).
    mask : {"none", "auto"} or path, optional
        Voxels to model: all (default), the automatic foreground (everything but the
        background: the whole head, or the brain of a skull-stripped scan), or a mask file on
        the same grid. A template such as ``"{stem}_brainmask.nii.gz"`` names the mask after
        the (first) scan, relative to its folder (see :class:`segment.scan_masks.MaskSpec`).
    overwrite, probseg, qc : bool
        Replace existing outputs; write the probability maps; write the QC picture.
    callback : callable, optional
        Progress callback, see :func:`segment_array`.
    qc_histogram : {"linear", "log"}
        Counts axis of the QC picture's histogram.
    command_line : list of str, optional
        Recorded in the sidecar (default ``sys.argv``).
    output_paths : OutputPaths, optional
        Where to write instead of the plain names in ``out_dir`` (e.g.
        :func:`segment.naming.bids_output_paths`); requires ``out_dir``.
    extra : dict, optional
        Added to the JSON sidecar (e.g. the pipeline and the final options).
    corrected : bool
        With ``bias_field=True``, also write the bias-corrected scan.
    memory_limit : int or str, optional
        See :func:`segment_array`.
    compresslevel : int, optional
        gzip level 0-9 of the ``.nii.gz`` outputs (default 1, see :meth:`SegmentationResult.save`).
    class_names : list of str, optional
        Names of labels 1..K; in BIDS mode they name the fraction files (``label-GM``...).
    **options
        Model options, see :func:`segment_array`.

    Returns
    -------
    SegmentationResult
    """
    from . import io

    make_estimator(options)  # parameter errors before touching any file
    memory_budget(memory_limit)
    compresslevel = check_compresslevel(compresslevel)
    paths = [Path(p) for p in ([path_or_paths] if isinstance(path_or_paths, (str, Path))
                               else path_or_paths)]  # fmt: skip
    if not paths:
        raise SegmentError("no input file given")
    if out_dir is not None:
        kind = "nifti" if naming.is_nifti(paths[0]) else "image"
        if output_paths is None:
            output_paths = naming.plain_output_paths(paths[0], out_dir, kind=kind)
        wanted = [output_paths.dseg, output_paths.sidecar]
        wanted += [output_paths.probseg] * probseg + [output_paths.qc] * qc
        wanted += bias_output_paths(
            output_paths, bool(options.get("bias_field")), corrected
        ).values()
        if options.get("pve"):  # with -k auto, the classes of the smallest K (checked again)
            n_classes = options.get("n_components", DEFAULT_OPTIONS["n_components"])
            n_classes = (_validation.check_k_range(n_classes) or [n_classes])[0]
            wanted += naming.pve_output_paths(output_paths, n_classes, class_names)
        check_outputs_free(wanted, overwrite)
        check_out_dir_creatable(output_paths.sidecar.parent)
    if isinstance(mask, (str, Path)) and ("{" in str(mask) or "}" in str(mask)):
        first = paths[0].absolute()
        mask = MaskSpec.parse(mask).for_scan(first, first.parent)
    check_mask_spec(mask)
    start = time.perf_counter()
    # a compressed input is read whole: refused above the memory limit (never below 512 MB,
    # so that a small limit chosen to make the EM stream does not refuse small scans)
    read_limit = max(memory_budget(memory_limit), io.MIN_READ_LIMIT)
    scans = [io.load_scan(p, memory_limit=read_limit) for p in paths]
    for scan in scans[1:]:
        io.check_same_grid(scans[0], scan, "channel")
    mask_array = masking.load_mask(mask, scans[0])
    load_s = time.perf_counter() - start
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            result = _segment_array(
                [s.data for s in scans], mask_array, spacing=scans[0].zooms, callback=callback,
                memory_limit=memory_limit, **options,
            )  # fmt: skip
    except InputError:
        raise
    except SegmentError as error:
        raise InputError(paths[0], str(error)) from None
    for warning in caught:  # re-issue with the file name
        message = str(warning.message)
        if issubclass(warning.category, DataWarning):
            message = f"{paths[0]}: {message}"
        warnings.warn(message, warning.category, stacklevel=2)
    result.timings = {"load_s": load_s, **result.timings}
    result.inputs = paths
    result.reference = scans[0]
    result.mask_spec = (
        "none" if mask is None else "array" if isinstance(mask, np.ndarray) else str(mask)
    )
    if out_dir is not None:
        announce = getattr(callback, "phase", None)
        if callable(announce):
            announce("writing")
        result.save(
            out_dir, overwrite=overwrite, probseg=probseg, qc=qc, paths=output_paths,
            command_line=command_line, extra=extra, corrected=corrected,
            compresslevel=compresslevel, class_names=class_names, qc_histogram=qc_histogram,
        )  # fmt: skip
    return result


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Load a JSON sidecar written by :meth:`SegmentationResult.save`."""
    return json.loads(Path(path).read_text())
