"""The result of one segmentation: labels, probabilities, the fitted model, and how it is saved.

:class:`SegmentationResult` holds what :func:`segment.api.segment_array` computed;
:meth:`SegmentationResult.save` writes the output set (labels, probabilities, fractions, bias
field, QC picture, look-up table and the JSON sidecar last) all-or-nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import masking, naming, sidecar
from ._validation import check_compresslevel, check_outputs_free
from .exceptions import InputError, SegmentError
from .volumes import StreamedPosterior, StreamedVolumes, Volumes

if TYPE_CHECKING:
    from .mixture import GaussianMixtureEM

__all__ = ["SegmentationResult", "bias_output_paths", "ensure_out_dir"]


@dataclass
class SegmentationResult:
    """Labels, responsibilities and the fitted model of one segmentation.

    Attributes
    ----------
    labels : uint8 array of the spatial shape
        0 outside the mask (and for non-finite voxels), 1..K in ascending mean intensity.
        For a spatial fit too big to keep its probability maps, computed on first access (one
        more mean-field sweep), or by :meth:`save` while it writes the maps.
    responsibilities : float32 array of the spatial shape + (K,)
        Posterior probability of each label; zeros outside the mask. Built from
        :attr:`flat_responsibilities` on each access (it is the largest array of a run), or
        recomputed from :attr:`channels` when those were not kept.
    flat_responsibilities : (n_voxels, K) float32 array or None
        The same probabilities for the fitted voxels only, in :func:`segment.masking.flatten`
        order. None when they would not fit the memory budget: they are then recomputed from
        :attr:`channels` when written or accessed, one slab of all K maps at a time.
    channels : list of D arrays of the spatial shape, or None
        The image channels (for files: the scans' data, memory maps for ``.nii``), kept only
        when ``flat_responsibilities`` is None.
    estimator : GaussianMixtureEM
        The fitted mixture (``means_``, ``covariances_``, ``weights_``, trace...).
    mask : bool array of the spatial shape
        The voxels that were fitted.
    n_nonfinite : int
        Voxels inside the mask left out because they were NaN or inf.
    options : dict
        The model options used.
    timings : dict
        Seconds spent loading, fitting and predicting (and writing, after :meth:`save`).
    inputs : list of Path
        The input files (empty for :func:`segment_array`).
    reference : Scan or None
        The first input scan, whose grid the outputs are written on.
    mask_spec : str
        How the mask was chosen (``"none"``, ``"auto"``, a path or ``"array"``).
    """

    labels: np.ndarray
    flat_responsibilities: np.ndarray | None
    estimator: GaussianMixtureEM
    mask: np.ndarray
    n_nonfinite: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    reference: Any = None
    mask_spec: str = "none"
    channels: list[np.ndarray] | None = None
    written: list[Path] = field(default_factory=list)
    """Files written by :meth:`save`."""
    fraction_maps: Any = None
    """With ``pve=True``: the K partial-volume fraction maps, computed a slab at a time when
    written or read (a :class:`segment.partial_volume.FractionMaps`)."""
    pve_record: dict[str, Any] | None = None
    """With ``pve=True``: the refitted mixed-voxel model, for the sidecar."""
    model_selection: dict[str, Any] | None = None
    """With ``n_components="auto"``: the K tried, their BIC and the K chosen (see
    :func:`select_n_components`)."""
    # ``self._labels`` is set through the ``labels`` property defined after the class (an
    # instance attribute, not a field: the generated __init__ would reset a field after it).

    def _get_labels(self) -> np.ndarray:
        if self._labels is None:  # a streamed MRF posterior: one more sweep for the labels
            grid, beta = self.estimator.posterior_grid_, self.estimator.mrf_beta
            labels = np.zeros(self.mask.shape, np.uint8)
            labels[self.estimator.bounding_box_], self.estimator.soft_counts_ = grid.labels(beta)
            self._labels = labels
        return self._labels

    def _set_labels(self, labels: np.ndarray | None) -> None:
        self._labels = labels

    def _labels_pending(self) -> bool:
        """True while the labels of a streamed MRF posterior are not computed yet."""
        return self._labels is None

    def _streams_bias_field(self, reference, path) -> bool:
        """True when the field can be written slab by slab: one channel, a 3-D NIfTI."""
        shape = getattr(self.estimator, "bias_field_shape_", None)
        return (
            shape is not None and shape[-1] == 1 and len(reference.shape) == 3
            and naming.is_nifti(path)
        )  # fmt: skip

    @property
    def _has_bias_field(self) -> bool:
        return getattr(self.estimator, "bias_field_shape_", None) is not None

    @property
    def bias_field(self) -> np.ndarray | None:
        """The fitted multiplicative bias field, spatial shape + (D,) float32, or None."""
        field = getattr(self.estimator, "bias_field_", None)
        if field is None:
            return None
        return field if field.ndim == self.labels.ndim + 1 else field[..., None]

    @property
    def responsibilities(self) -> np.ndarray:
        """Probabilities on the image grid, spatial shape + (K,), zeros outside the mask."""
        if self.flat_responsibilities is None:
            return self.responsibility_volumes().stacked()
        return masking.unflatten(self.flat_responsibilities, self.mask)

    def responsibility_volumes(self) -> Volumes | StreamedVolumes:
        """The K probability maps as a lazy sequence, one spatial array built per index.

        When the probabilities were not kept, the sequence also has ``slabs(step)``, which
        :func:`segment.io.write_probabilities` uses to write all K maps in one pass.
        """
        if self.flat_responsibilities is None:
            if getattr(self.estimator, "posterior_grid_", None) is not None:
                return StreamedPosterior(self.mask, self.estimator)
            return StreamedVolumes(self.channels, self.mask, self.estimator)
        return Volumes(self.flat_responsibilities, self.mask)

    @property
    def fractions(self) -> np.ndarray | None:
        """Partial-volume fractions, spatial shape + (K,) float32, zeros outside the mask.

        None unless the result was made with ``pve=True``.
        """
        return None if self.fraction_maps is None else self.fraction_maps.stacked()

    @property
    def flat_fractions(self) -> np.ndarray | None:
        """The fractions of the fitted voxels, (n_voxels, K) float32 in
        :func:`segment.masking.flatten` order, or None (computed at each access)."""
        return None if self.fraction_maps is None else self.fraction_maps.flat()

    def fraction_volumes(self) -> np.ndarray | None:
        """Volume of each class in mL from the fractions, (K,) float64, or None."""
        if self.fraction_maps is None:
            return None
        return self.fraction_maps.column_sums() * self.voxel_volume_ml

    @property
    def soft_counts(self) -> np.ndarray:
        """Sum of each label's probabilities over the voxels, (K,) float64."""
        self._get_labels()  # a streamed MRF posterior counts them with its labels
        return np.asarray(self.estimator.soft_counts_, dtype=np.float64)

    @property
    def log_likelihood_trace(self) -> list[float]:
        """Total log-likelihood after each EM iteration."""
        return self.estimator.log_likelihood_trace_

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mm^3 = 0.001 mL when no geometry is known)."""
        return self.reference.voxel_volume_ml if self.reference is not None else 1e-3

    def volumes(self) -> list[dict[str, Any]]:
        """Voxel count and volume in mL of each label, hard and soft (sum of probabilities)."""
        return sidecar.label_volumes(
            self.labels, self.soft_counts, self.voxel_volume_ml, self.fraction_volumes()
        )

    def sidecar(self, outputs: dict[str, str] | None = None, command_line=None) -> dict:
        """The JSON sidecar record (see :mod:`segment.sidecar`)."""
        from . import partial_volume

        soft = self.soft_counts
        pv_model = getattr(self.estimator, "pv_model_", None)
        record = sidecar.build_sidecar(
            estimator=self.estimator,
            labels=self.labels,
            soft_counts=soft,
            voxel_volume_ml=self.voxel_volume_ml,
            inputs=self.inputs,
            options=self.options,
            mask={
                "spec": self.mask_spec,
                "n_voxels": int(self.mask.sum()),
                "n_nonfinite_excluded": int(self.n_nonfinite),
            },
            timings=self.timings,
            outputs=outputs or {},
            command_line=command_line,
            fraction_volumes=self.fraction_volumes(),
            partial_volume=self.pve_record,
            model_selection=self.model_selection,
        )
        if getattr(self.estimator, "pv_fit", False):  # the model the Gaussians came from
            record["model"]["pv_fit"] = {"status": self.estimator.pv_fit_status_}
            if pv_model is not None:
                record["model"]["pv_fit"].update(
                    partial_volume.model_record(pv_model, self.estimator.pv_trace_)
                )
        return record

    def save(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        probseg: bool = True,
        qc: bool = True,
        prefix: str | None = None,
        paths: naming.OutputPaths | None = None,
        command_line: Sequence[str] | None = None,
        extra: dict[str, Any] | None = None,
        corrected: bool = False,
        compresslevel: int | None = None,
        class_names: Sequence[str] | None = None,
        qc_histogram: str = "linear",
    ) -> naming.OutputPaths:
        """Write the label map, probabilities, QC picture and JSON sidecar into ``out_dir``.

        ``qc_histogram`` (``"linear"`` or ``"log"``) is the counts axis of the QC histogram.

        With partial-volume fractions (``pve=True``), also ``<stem>_pve`` (4-D, one volume per
        label), or in BIDS mode one ``..._label-<class>_probseg`` per class, named from
        ``class_names`` (see :func:`segment.naming.pve_output_paths`).

        With a bias field fitted, also ``<stem>_biasfield`` (the multiplicative field) and,
        with ``corrected=True``, ``<stem>_corrected`` (the input divided by the field).
        ``compresslevel`` is the gzip level 0-9 of ``.nii.gz`` files (default 1: about 3x
        faster than 6 for files about 10 % larger).

        Every file is first written under a hidden temporary name; once all are written they
        are renamed into place, the sidecar last, so its presence means the outputs are
        complete. Existing outputs are only replaced with ``overwrite=True``, and then only
        when the whole new set is written: if writing fails or is interrupted (Ctrl-C), the
        temporary files are removed, the old outputs are left as they were (put back if the
        renaming itself is interrupted) and so are the folders it created, if left empty.

        Returns
        -------
        OutputPaths
        """
        from . import io

        if qc_histogram not in ("linear", "log"):
            raise SegmentError(f"qc_histogram must be 'linear' or 'log', got {qc_histogram!r}")
        reference = self.reference or _array_reference(self.labels.shape)
        if paths is None:
            stem = prefix or (io.scan_stem(self.inputs[0]) if self.inputs else "segment")
            fake_input = f"{stem}.nii.gz" if reference.kind == "nifti" else f"{stem}.png"
            paths = naming.plain_output_paths(fake_input, out_dir, kind=reference.kind)
            if stem == "segment":  # an array without a name: segment.json, not segment_segment
                paths = dataclasses.replace(paths, sidecar=paths.sidecar.with_name("segment.json"))
        dseg_tsv = naming.dseg_tsv_path(paths)
        wanted = [paths.dseg, paths.sidecar] + [paths.probseg] * probseg + [paths.qc] * qc
        wanted += [dseg_tsv] if dseg_tsv is not None else []
        wanted += list(bias_output_paths(paths, self._has_bias_field, corrected).values())
        pve_paths = self._pve_paths(paths, class_names)
        check_outputs_free(wanted + pve_paths, overwrite)
        created = _missing_dirs(paths.sidecar.parent)
        ensure_out_dir(paths.sidecar.parent)
        io.remove_stale_temporaries(paths.sidecar.parent, recursive=False)  # of killed runs
        level = check_compresslevel(compresslevel)
        staged = io.StagedWrites()
        try:
            _write_outputs(
                self,
                reference,
                paths,
                probseg,
                qc,
                command_line,
                extra,
                staged,
                corrected,
                level,
                pve_paths,
                names=naming.label_names(class_names, len(self.estimator.means_)),
                log_histogram=qc_histogram == "log",
            )
            staged.commit()
        except BaseException as error:  # incl. KeyboardInterrupt: no half-written set of outputs
            self.written = []
            if isinstance(error, OSError):  # name the output, not its temporary file
                for attribute in ("filename", "filename2"):
                    if getattr(error, attribute, None):
                        setattr(error, attribute, staged.final_name(getattr(error, attribute)))
            staged.discard()
            for folder in created:  # folders this call created, deepest first, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return paths

    def _pve_paths(self, paths: naming.OutputPaths, class_names) -> list[Path]:
        if self.fraction_maps is None:
            return []
        n_classes = len(self.fraction_maps)
        return naming.pve_output_paths(paths, n_classes, list(class_names or []) or None)


# ``labels`` is a dataclass field (the constructor takes it) read through a property, so that a
# streamed MRF posterior can compute it on first use.
SegmentationResult.labels = property(  # type: ignore[assignment]
    SegmentationResult._get_labels, SegmentationResult._set_labels, doc="See the class."
)


def bias_output_paths(
    paths: naming.OutputPaths, bias_field: bool, corrected: bool
) -> dict[str, Path]:
    """``biasfield`` and ``corrected`` output paths next to the label map, as requested."""
    if not bias_field:
        return {}
    suffix = ".nii.gz" if paths.dseg.name.endswith((".nii.gz", ".nii")) else ".tif"
    stem = paths.dseg.name.split("_dseg")[0]
    names = ["biasfield"] + ["corrected"] * corrected
    return {name: paths.dseg.with_name(f"{stem}_{name}{suffix}") for name in names}


def _write_outputs(
    result: SegmentationResult,
    reference,
    paths,
    probseg,
    qc,
    command_line,
    extra,
    staged,
    corrected,
    level,
    pve_paths=(),
    names=None,
    log_histogram=False,
) -> None:
    """The writes of :meth:`SegmentationResult.save`, each to its temporary path from ``staged``."""
    from . import io

    names = names or naming.label_names(None, len(result.estimator.means_))
    dseg_tsv = naming.dseg_tsv_path(paths)
    if dseg_tsv is not None:
        staged.path(dseg_tsv).write_text(naming.run_dseg_tsv(names))

    fractions, start = result.fraction_maps, time.perf_counter()  # a slab of all K at a time
    if len(pve_paths) == 1:  # one 4-D file, a volume per label
        io.write_probabilities(fractions, reference, staged.path(pve_paths[0]), compresslevel=level)
    elif pve_paths:  # BIDS: a 3-D file per class
        for k, path in enumerate(pve_paths):
            io.write_map(fractions[k], reference, staged.path(path), compresslevel=level)
    if pve_paths:
        result.timings["write_pve_s"] = time.perf_counter() - start

    bias_paths = bias_output_paths(paths, result._has_bias_field, corrected)
    for name, path in bias_paths.items():
        if name == "biasfield" and result._streams_bias_field(reference, path):
            io.write_map_slabs(
                result.estimator.bias_field_last_axis_slabs, reference, staged.path(path),
                cal=result.estimator.bias_field_range_, compresslevel=level,
            )  # fmt: skip
            continue
        field = result.bias_field
        if name == "corrected":
            field = np.asarray(reference.data, dtype=np.float32)[..., None] / field
        io.write_map(field if field.shape[-1] > 1 else field[..., 0], reference,
                     staged.path(path), compresslevel=level)  # fmt: skip

    start = time.perf_counter()
    if probseg and result._labels_pending():
        # a streamed MRF posterior: the labels come from the same sweep as the maps
        volumes = StreamedPosterior(result.mask, result.estimator, keep_labels=result._set_labels)
        io.write_probabilities(volumes, reference, staged.path(paths.probseg), compresslevel=level)
        io.write_labels(result.labels, reference, staged.path(paths.dseg), compresslevel=level)
    else:
        io.write_labels(result.labels, reference, staged.path(paths.dseg), compresslevel=level)
        if probseg:
            io.write_probabilities(
                result.responsibility_volumes(), reference, staged.path(paths.probseg),
                compresslevel=level,
            )  # fmt: skip
    result.timings["write_s"] = time.perf_counter() - start
    if qc:
        from . import qc as qc_module

        start = time.perf_counter()
        image = reference.data if result.reference is not None else result.labels
        qc_module.write_qc(
            staged.path(paths.qc), np.asarray(image), result.labels,
            means=result.estimator.means_, covariances=result.estimator.covariances_,
            weights=result.estimator.weights_, mask=result.mask,
            title=result.inputs[0].name if result.inputs else "", zooms=reference.zooms,
            names=names, affine=getattr(reference, "affine", None), log_histogram=log_histogram,
        )  # fmt: skip
        result.timings["qc_s"] = time.perf_counter() - start
    written = {"dseg": paths.dseg, "probseg": paths.probseg if probseg else None,
               "qc": paths.qc if qc else None, "dseg_tsv": dseg_tsv, **bias_paths}  # fmt: skip
    written.update({f"pve_{k + 1}" if len(pve_paths) > 1 else "pve": path
                    for k, path in enumerate(pve_paths)})  # fmt: skip
    outputs = {name: p.name for name, p in written.items() if p is not None}
    record = result.sidecar(outputs, command_line)
    sidecar.name_labels(record, names)
    record.update(extra or {})
    staged.path(paths.sidecar).write_text(sidecar.dumps(record))  # moved into place last
    result.written = [p for p in written.values() if p is not None] + [paths.sidecar]


def _array_reference(shape: tuple[int, ...]):
    """A stand-in grid (identity affine, 1 mm voxels) for results of :func:`segment_array`."""
    import nibabel as nib

    from .io import Scan

    header = nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)).header
    return Scan(Path("array"), "nifti", np.zeros(shape, np.uint8), np.eye(4), header,
                (1.0,) * len(shape))  # fmt: skip


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def ensure_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and check it is writable."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(out_dir, f"cannot create the output folder: {error.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(out_dir, "the output folder is not writable")
    return out_dir
