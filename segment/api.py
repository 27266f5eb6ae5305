"""Segment arrays and files: the library calls behind ``segment run`` and ``segment batch``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _validation, masking, naming, sidecar
from ._options import DEFAULT_OPTIONS
from .exceptions import ConvergenceWarning, DataWarning, InputError, SegmentError
from .mixture import GaussianMixtureEM

__all__ = ["segment_array", "segment_file", "SegmentationResult", "DEFAULT_OPTIONS"]


def make_estimator(options: dict[str, Any], callback: Callable | None = None) -> GaussianMixtureEM:
    """A :class:`GaussianMixtureEM` from the shared option names (``seed``, ``workers``...)."""
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise SegmentError(
            f"unknown option(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_OPTIONS)}"
        )
    merged = {**DEFAULT_OPTIONS, **options}
    k_values = _validation.check_k_range(merged["n_components"])
    if k_values is not None:  # n_components="auto": each K is checked like the smallest
        if merged["pve"]:
            raise SegmentError(
                "pve cannot be combined with n_components='auto' yet; give an integer K"
            )
        merged["n_components"] = k_values[0]
    from .partial_volume import check_pve

    check_pve(merged["pve"], merged["n_components"])
    estimator = GaussianMixtureEM(
        merged["n_components"],
        max_iter=merged["max_iter"],
        tol=merged["tol"],
        variance_floor=merged["variance_floor"],
        random_state=merged["seed"],
        chunk_size=merged["chunk_size"],
        scheduler=merged["scheduler"],
        n_workers=merged["workers"],
        mrf_beta=merged["mrf_beta"],
        bias_field=merged["bias_field"],
        bias_smoothness=merged["bias_smoothness"],
        callback=callback,
    )
    estimator.validate_parameters()
    return estimator


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
            and Path(path).name.lower().endswith((".nii", ".nii.gz"))
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

    def responsibility_volumes(self) -> _Volumes | _StreamedVolumes:
        """The K probability maps as a lazy sequence, one spatial array built per index.

        When the probabilities were not kept, the sequence also has ``slabs(step)``, which
        :func:`segment.io.write_probabilities` uses to write all K maps in one pass.
        """
        if self.flat_responsibilities is None:
            if getattr(self.estimator, "posterior_grid_", None) is not None:
                return _StreamedPosterior(self.mask, self.estimator)
            return _StreamedVolumes(self.channels, self.mask, self.estimator)
        return _Volumes(self.flat_responsibilities, self.mask)

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
        soft = self.soft_counts
        return sidecar.build_sidecar(
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
    ) -> naming.OutputPaths:
        """Write the label map, probabilities, QC picture and JSON sidecar into ``out_dir``.

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
        level = _check_compresslevel(compresslevel)
        staged = io.StagedWrites()
        try:
            self._write_outputs(
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

    def _write_outputs(
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
        pve_paths=(),
        names=None,
    ) -> None:
        """The writes of :meth:`save`, each to its temporary path from ``staged``."""
        from . import io

        names = names or naming.label_names(None, len(self.estimator.means_))
        dseg_tsv = naming.dseg_tsv_path(paths)
        if dseg_tsv is not None:
            staged.path(dseg_tsv).write_text(naming.run_dseg_tsv(names))

        fractions, start = self.fraction_maps, time.perf_counter()  # a slab of all K at a time
        if len(pve_paths) == 1:  # one 4-D file, a volume per label
            io.write_probabilities(
                fractions, reference, staged.path(pve_paths[0]), compresslevel=level
            )
        elif pve_paths:  # BIDS: a 3-D file per class
            for k, path in enumerate(pve_paths):
                io.write_map(fractions[k], reference, staged.path(path), compresslevel=level)
        if pve_paths:
            self.timings["write_pve_s"] = time.perf_counter() - start

        bias_paths = bias_output_paths(paths, self._has_bias_field, corrected)
        for name, path in bias_paths.items():
            if name == "biasfield" and self._streams_bias_field(reference, path):
                io.write_map_slabs(
                    self.estimator.bias_field_last_axis_slabs, reference, staged.path(path),
                    cal=self.estimator.bias_field_range_, compresslevel=level,
                )  # fmt: skip
                continue
            field = self.bias_field
            if name == "corrected":
                field = np.asarray(reference.data, dtype=np.float32)[..., None] / field
            io.write_map(field if field.shape[-1] > 1 else field[..., 0], reference,
                         staged.path(path), compresslevel=level)  # fmt: skip

        start = time.perf_counter()
        if probseg and self._labels_pending():
            # a streamed MRF posterior: the labels come from the same sweep as the maps
            volumes = _StreamedPosterior(self.mask, self.estimator, keep_labels=self._set_labels)
            io.write_probabilities(
                volumes, reference, staged.path(paths.probseg), compresslevel=level
            )
            io.write_labels(self.labels, reference, staged.path(paths.dseg), compresslevel=level)
        else:
            io.write_labels(self.labels, reference, staged.path(paths.dseg), compresslevel=level)
            if probseg:
                io.write_probabilities(
                    self.responsibility_volumes(), reference, staged.path(paths.probseg),
                    compresslevel=level,
                )  # fmt: skip
        self.timings["write_s"] = time.perf_counter() - start
        if qc:
            from . import qc as qc_module

            start = time.perf_counter()
            image = reference.data if self.reference is not None else self.labels
            qc_module.write_qc(
                staged.path(paths.qc), np.asarray(image), self.labels,
                means=self.estimator.means_, covariances=self.estimator.covariances_,
                weights=self.estimator.weights_, mask=self.mask,
                title=self.inputs[0].name if self.inputs else "", zooms=reference.zooms,
                names=names, affine=getattr(reference, "affine", None),
            )  # fmt: skip
            self.timings["qc_s"] = time.perf_counter() - start
        written = {"dseg": paths.dseg, "probseg": paths.probseg if probseg else None,
                   "qc": paths.qc if qc else None, "dseg_tsv": dseg_tsv, **bias_paths}  # fmt: skip
        written.update({f"pve_{k + 1}" if len(pve_paths) > 1 else "pve": path
                        for k, path in enumerate(pve_paths)})  # fmt: skip
        outputs = {name: p.name for name, p in written.items() if p is not None}
        record = self.sidecar(outputs, command_line)
        sidecar.name_labels(record, names)
        record.update(extra or {})
        staged.path(paths.sidecar).write_text(sidecar.dumps(record))  # moved into place last
        self.written = [p for p in written.values() if p is not None] + [paths.sidecar]


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


class _Volumes:
    """Sequence of the K probability maps stored as (N, K) flat values, unflattened per index."""

    def __init__(self, flat: np.ndarray, mask: np.ndarray):
        self.flat, self.mask = flat, mask

    def __len__(self) -> int:
        return self.flat.shape[1]

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return masking.unflatten(self.flat[:, k], self.mask)


class _StreamedVolumes:
    """The K probability maps recomputed from the fitted model, a slab of all K at a time.

    For results whose (N, K) probabilities were too big to keep. :meth:`slabs` walks the last
    spatial axis once: per slab it gathers the mask's voxels from the image channels in
    Fortran order (the order NIfTI stores them), runs the E-step on them ``chunk_size`` voxels
    at a time, and scatters each component into its own slab. Memory: the channels (memory
    maps for ``.nii`` inputs) and a few slabs of K maps; no whole map, no (N, D) features.
    Values are those of :meth:`GaussianMixtureEM.predict_with_proba`: the same
    E-step per voxel, rounded to float32.
    """

    def __init__(self, channels: list[np.ndarray], mask: np.ndarray, estimator):
        self.channels, self.mask, self.estimator = channels, mask, estimator

    def __len__(self) -> int:
        return self.estimator.n_components

    def slabs(self, step: int) -> Iterator[list[np.ndarray]]:
        """Yield, for ``start = 0, step, ...`` along the last axis, the K maps' slabs.

        Each slab is a list of K float32 arrays of shape ``(*S[:-1], n)``, n <= step, each
        Fortran-contiguous (zeros outside the mask).
        """
        from . import _em
        from ._chunked import DEFAULT_CHUNK_SIZE

        chunk = int(self.estimator.chunk_size or DEFAULT_CHUNK_SIZE)
        params = (
            self.estimator.weights_,
            self.estimator.means_,
            self.estimator.precisions_cholesky_,
        )
        for start in range(0, self.mask.shape[-1], step):
            where = (Ellipsis, slice(start, start + step))
            # Transposed Fortran-order copies: C-contiguous arrays in the slab's NIfTI order.
            inside = np.asfortranarray(self.mask[where]).T
            slab = [np.asfortranarray(c[where]).T for c in self.channels]
            X = masking.flatten(slab[0] if len(slab) == 1 else np.stack(slab, -1), inside)
            del slab
            probabilities = np.empty((len(self), len(X)), np.float32)
            for first in range(0, len(X), chunk):
                stop = first + chunk
                probabilities[:, first:stop] = _em.responsibilities(X[first:stop], *params).T
            del X
            maps = np.zeros((len(self),) + inside.shape, np.float32)
            for k in range(len(self)):
                maps[k][inside] = probabilities[k]
            del probabilities
            yield [maps[k].T for k in range(len(self))]
            del maps

    def _by_slab(self) -> Iterator[tuple[tuple[slice, ...], list[np.ndarray]]]:
        """``(index into the grid, the K maps' slabs)`` for each slab of the default size."""
        from .io import slab_step

        step = slab_step(self.mask.shape, np.float32)
        leading = (slice(None),) * (self.mask.ndim - 1)
        for start, maps in zip(range(0, self.mask.shape[-1], step), self.slabs(step)):
            yield leading + (slice(start, start + step),), maps

    def stacked(self) -> np.ndarray:
        """All K maps as one (*S, K) float32 array, in one pass."""
        out = np.zeros(self.mask.shape + (len(self),), np.float32)
        for where, maps in self._by_slab():
            out[where] = np.stack(maps, axis=-1)
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        """Map ``k`` alone (a whole pass over the data; :meth:`slabs` gives all K in one)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        out = np.zeros(self.mask.shape, np.float32)
        for where, maps in self._by_slab():
            out[where] = maps[k]
        return out


class _StreamedPosterior(_StreamedVolumes):
    """The MRF posterior's K maps, recomputed a slab of the last axis at a time.

    For spatial fits whose float32 maps were too big to keep: each slab is one more
    mean-field sweep of the fitted uint8 posterior grid over those planes (and their
    neighbours), :meth:`segment._sweeps.PosteriorGrid.slab`. Memory: the grid the fit holds
    and a few slabs of K maps.
    """

    def __init__(self, mask: np.ndarray, estimator, keep_labels: Callable | None = None):
        super().__init__([], mask, estimator)
        self.keep_labels = keep_labels

    #: Writer slabs computed together. The grid is held in NIfTI order, so a block of writer
    #: slabs is a slab of the grid; its neighbours are read in place. 1 and 2 took the same
    #: time at 8x (28.8 s); 2 held 74 MB more.
    GROUP = 1

    def slabs(self, step: int) -> Iterator[list[np.ndarray]]:
        grid, beta = self.estimator.posterior_grid_, self.estimator.mrf_beta
        box = self.estimator.bounding_box_  # the grid covers the mask's bounding box
        first, last = box[-1].start, box[-1].stop
        reverse = tuple(range(self.mask.ndim))[::-1]
        n_last = self.mask.shape[-1]
        if self.keep_labels is not None:  # the argmax and column sums of every slab
            labels, soft_counts = np.zeros(self.mask.shape, np.uint8), np.zeros(len(self))
        for begin in range(0, n_last, step * self.GROUP):
            end = min(begin + step * self.GROUP, n_last)
            maps = np.zeros((len(self), end - begin) + self.mask.shape[:-1][::-1], np.float32)
            lo, hi = max(begin, first), min(end, last)
            if lo < hi:  # the box's planes, axes reversed: (K, planes, ..., first axis)
                inner = (slice(lo - begin, hi - begin),) + tuple(box[a] for a in reverse[1:])
                box_labels = np.zeros(maps[(0,) + inner].shape, np.uint8)
                _, _, sums = grid.slab(lo - first, hi - first, beta, maps[(slice(None),) + inner],
                                       box_labels)  # fmt: skip
                if self.keep_labels is not None:
                    labels[box[:-1] + (slice(lo, hi),)] = box_labels.T
                    soft_counts += sums
            for start in range(begin, end, step):
                part = maps[:, start - begin : min(start + step, end) - begin]
                yield [part[k].T for k in range(len(self))]
            del maps, part
        if self.keep_labels is not None:  # only once every slab is done
            self.estimator.soft_counts_ = soft_counts
            self.keep_labels(labels)


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


def check_outputs_free(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse to replace existing outputs unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise InputError(path, "exists; pass --overwrite to replace it")


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


def check_out_dir_creatable(out_dir: str | Path) -> None:
    """Fail early, without creating anything, if ``out_dir`` could not be created or written."""
    path = Path(out_dir).absolute()
    if path.exists():
        if not path.is_dir():
            raise InputError(out_dir, "exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(out_dir, "the output folder is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(out_dir, f"cannot create the output folder: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(out_dir, f"cannot create the output folder: {parent} is not writable")


def _check_mask_spec(mask: Any) -> None:
    """A mask given as a path must exist (before any scan is loaded)."""
    if not isinstance(mask, (str, Path)) or str(mask).lower() in ("none", "auto"):
        return
    if not Path(mask).exists():
        raise InputError(
            mask, "mask file not found; give a mask file on the scan's grid, 'auto' or 'none'"
        )


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
    if _validation.check_k_range(options.get("n_components", 6)) is not None:
        return _segment_array_auto(
            array, mask, channel_axis=channel_axis, spacing=spacing, callback=callback,
            memory_limit=memory_limit, **options,
        )  # fmt: skip
    estimator = make_estimator(options, callback)
    _memory_budget(memory_limit)
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
        estimator.set_params(posterior_memory_limit=_memory_budget(memory_limit))
        stacked = channels[0][..., None] if len(channels) == 1 else np.stack(channels, -1)
        estimator.fit_image(stacked, valid, spacing=spacing, channel_axis=-1)
        del stacked
        X, responsibilities = None, estimator.responsibilities_
        timings = {"fit_s": time.perf_counter() - start}
        if responsibilities is None:
            # streamed: the labels are computed on first use, or while save() writes the maps
            result = SegmentationResult(
                labels=None, flat_responsibilities=None, channels=[], estimator=estimator,
                mask=valid, n_nonfinite=n_nonfinite, options={**DEFAULT_OPTIONS, **options},
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
        if X.shape[0] * (estimator.n_components + 1) * 4 <= _memory_budget(memory_limit) / 3:
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
        options={**DEFAULT_OPTIONS, **options},
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

    plain = {**options, "mrf_beta": 0.0, "bias_field": False, "pve": False}
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
    result = segment_array(
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
    from .mixture import _bounding_box

    box = int(np.prod([s.stop - s.start for s in _bounding_box(mask)]))
    per_box_voxel = n_components + 1 + itemsize * n_channels
    per_grid_voxel = 2 + 4 * n_channels
    return float(
        box * per_box_voxel + mask.size * per_grid_voxel + int(mask.sum()) * itemsize * n_channels
    )


def _check_spatial_memory(mask, n_components, channels, memory_limit) -> None:
    itemsize = max(np.asarray(c).dtype.itemsize for c in channels)
    needed, budget = (
        spatial_memory_estimate(mask, n_components, len(channels), itemsize),
        _memory_budget(memory_limit),
    )
    if needed > budget:
        raise SegmentError(
            f"the MRF prior and bias field keep the posterior on the image grid: about "
            f"{needed / 1e9:.1f} GB for this scan ({int(mask.sum()):,} voxels, K={n_components})"
            f", over the memory limit of {budget / 1e9:.1f} GB; raise --memory-limit "
            "(memory_limit=), fit inside a mask, or turn them off"
        )


def _check_compresslevel(compresslevel: int | None) -> int:
    """The gzip level of ``.nii.gz`` outputs, 0-9 (default ``io.DEFAULT_COMPRESSLEVEL``)."""
    from .io import DEFAULT_COMPRESSLEVEL

    if compresslevel is None:
        return DEFAULT_COMPRESSLEVEL
    if (
        isinstance(compresslevel, bool)
        or not isinstance(compresslevel, (int, np.integer))
        or (not 0 <= compresslevel <= 9)
    ):
        raise SegmentError(f"compresslevel must be an integer from 0 to 9, got {compresslevel!r}")
    return int(compresslevel)


def _memory_budget(memory_limit: int | str | None) -> float:
    """Bytes from ``memory_limit`` (default 3 GB)."""
    if memory_limit is None:
        return 3e9
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
    except ValueError:
        value = None
    if not isinstance(value, (int, float)) or value <= 0:
        raise SegmentError(
            f"memory_limit must be a positive size such as 2GB or 1500MB, got {memory_limit!r}"
        )
    return float(value)


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
        the (first) scan, relative to its folder (see :class:`segment.batch.MaskSpec`).
    overwrite, probseg, qc : bool
        Replace existing outputs; write the probability maps; write the QC picture.
    callback : callable, optional
        Progress callback, see :func:`segment_array`.
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
    _memory_budget(memory_limit)
    compresslevel = _check_compresslevel(compresslevel)
    paths = [Path(p) for p in ([path_or_paths] if isinstance(path_or_paths, (str, Path))
                               else path_or_paths)]  # fmt: skip
    if not paths:
        raise SegmentError("no input file given")
    if out_dir is not None:
        kind = "nifti" if paths[0].name.lower().endswith((".nii", ".nii.gz")) else "image"
        if output_paths is None:
            output_paths = naming.plain_output_paths(paths[0], out_dir, kind=kind)
        wanted = [output_paths.dseg, output_paths.sidecar]
        wanted += [output_paths.probseg] * probseg + [output_paths.qc] * qc
        wanted += bias_output_paths(
            output_paths, bool(options.get("bias_field")), corrected
        ).values()
        if options.get("pve"):
            n_classes = options.get("n_components", DEFAULT_OPTIONS["n_components"])
            wanted += naming.pve_output_paths(output_paths, n_classes, class_names)
        check_outputs_free(wanted, overwrite)
        check_out_dir_creatable(output_paths.sidecar.parent)
    if isinstance(mask, (str, Path)) and ("{" in str(mask) or "}" in str(mask)):
        from .batch import MaskSpec  # the templates of segment batch, for this one scan

        first = paths[0].absolute()
        mask = MaskSpec.parse(mask).for_scan(first, first.parent)
    _check_mask_spec(mask)
    start = time.perf_counter()
    # a compressed input is read whole: refused above the memory limit (never below 512 MB,
    # so that a small limit chosen to make the EM stream does not refuse small scans)
    read_limit = max(_memory_budget(memory_limit), io.MIN_READ_LIMIT)
    scans = [io.load_scan(p, memory_limit=read_limit) for p in paths]
    for scan in scans[1:]:
        io.check_same_grid(scans[0], scan, "channel")
    mask_array = masking.load_mask(mask, scans[0])
    load_s = time.perf_counter() - start
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            result = segment_array(
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
            compresslevel=compresslevel, class_names=class_names,
        )  # fmt: skip
    return result


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Load a JSON sidecar written by :meth:`SegmentationResult.save`."""
    return json.loads(Path(path).read_text())
