"""Partial-volume fractions of a fitted segmentation: the glue between a fit and :mod:`_pve`.

Takes the fitted :class:`~segment.GaussianMixtureEM`, the image channels and the mask, and
gives the class fractions of every fitted voxel (:class:`FractionMaps`): the intensities are
divided by the fitted bias field (when there is one), the mixed-voxel model of
:mod:`segment._pve` is refitted from the plain mixture on a histogram of them (one channel) or
a voxel sample (several), and the fractions are computed a slab of the last spatial axis at a
time (``CHUNK`` voxels at a time within it), with the MRF posterior of the pure classes as the
spatial prior when the MRF is on. No (N, K) array is held unless asked for
(:meth:`FractionMaps.flat`): the maps are written, and the volumes summed, slab by slab.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _pve, masking
from .exceptions import SegmentError

#: Histogram bins of one channel's intensities for the model fit.
N_BINS = 1024
#: Voxels sampled (evenly spaced) for the model fit with several channels.
N_SAMPLE = 200_000
#: Voxels (evenly spaced) in the histogram of one channel's intensities: all of them up to this
#: many (a 1 mm brain), so that the model is fitted in the same pass as the range is found.
N_HISTOGRAM = 2_000_000
#: Voxels per chunk when computing the fractions (each holds (chunk, K - 1, 20) float64).
CHUNK = 65_536
#: EM iterations and tolerance (mean log-likelihood per voxel) of the tissue fit of ``pv_fit``:
#: on a real T1 the mixels hold a third of the brain and the pure classes settle slowly (about
#: 900 iterations on the ICBM152 template; the fit runs on the histogram, a few ms each).
TISSUE_FIT_MAX_ITER = 2000
TISSUE_FIT_TOL = 1e-7
#: Histogram bins of the tissue fit (one channel).
TISSUE_FIT_BINS = 256


def check_pve(pve: Any, n_components: int) -> bool:
    """``pve`` as a bool; partial-volume fractions need at least two classes."""
    if not isinstance(pve, (bool, np.bool_)):
        raise SegmentError(f"pve must be true or false, got {pve!r}")
    if pve and n_components < 2:
        raise SegmentError(
            f"pve needs at least 2 classes to mix, got n_components={n_components}; "
            "raise -k or leave out --pve"
        )
    return bool(pve)


def corrected_features(
    channels: list[np.ndarray], mask: np.ndarray, bias_field: np.ndarray | None
) -> np.ndarray:
    """The fitted voxels' intensities divided by the bias field, (N, D) float32.

    ``bias_field`` is ``(*spatial, D)`` or None.
    """
    stacked = channels[0] if len(channels) == 1 else np.stack(channels, -1)
    X = np.asarray(masking.flatten(stacked, mask), np.float32).reshape(int(mask.sum()), -1)
    if bias_field is not None:
        field = bias_field if bias_field.ndim == mask.ndim + 1 else bias_field[..., None]
        X /= masking.flatten(field, mask).reshape(X.shape)
    return X


def histogram_range(values: np.ndarray, means: np.ndarray) -> tuple[float, float]:
    """The histogram's range: the 0.01-99.99 percentiles of ``values``, widened to ``means``."""
    low, high = np.percentile(values, [0.01, 99.99])
    return float(min(low, np.min(means))), float(max(high, np.max(means)))


def fit_model_on(
    sample: np.ndarray, histogram: tuple | None, estimator
) -> tuple[_pve.PveModel, list[float]]:
    """The mixed-voxel model from the estimator's plain mixture, fitted on data summaries.

    ``sample`` (n, D) is an evenly spaced voxel sample; ``histogram`` is None (several
    channels: the fit is on the sample) or ``((low, high), counts)`` of the one channel's
    intensities in :data:`N_BINS` bins (the fit is on the bin centres).
    """
    initial = _pve.initial_model(estimator.means_, estimator.covariances_, estimator.weights_)
    floor = np.broadcast_to(np.asarray(estimator.variance_floor_, np.float64), (sample.shape[1],))
    if histogram is None:
        return _pve.fit_pve_model(sample.astype(np.float64), None, initial, floor)
    (low, high), counts = histogram
    edges = np.linspace(low, high, N_BINS + 1)
    samples, weights = (0.5 * (edges[:-1] + edges[1:]))[:, None], counts.astype(np.float64)
    keep = weights > 0
    return _pve.fit_pve_model(samples[keep], weights[keep], initial, floor)


def summarise(
    values: np.ndarray, counts: np.ndarray | None, n_bins: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples and weights for a model fit: a histogram of one channel, or the rows themselves.

    Parameters
    ----------
    values : (n, D) array
        Intensities (an evenly spaced sample of the fitted voxels when they are many).
    counts : (n,) array or None
        Voxels each row stands for (None: one each).
    n_bins : int

    Returns
    -------
    samples : (m, D) float64
        Occupied bin centres on the 0.01-99.99 percentile range (one channel), or ``values``.
    weights : (m,) float64 or None
        Voxels in each bin (None: one each).
    """
    values = np.asarray(values, np.float64)
    counts = None if counts is None else np.asarray(counts, np.float64)
    if values.shape[1] != 1 or len(values) <= n_bins:
        return values, counts
    if counts is None:
        low, high = np.percentile(values[:, 0], [0.01, 99.99])
    else:  # the same percentiles of the voxels the rows stand for
        order = np.argsort(values[:, 0], kind="stable")
        cumulative = np.cumsum(counts[order]) / counts.sum()
        low, high = values[order, 0][np.searchsorted(cumulative, [1e-4, 1 - 1e-4])]
    high = high if high > low else low + 1.0
    centres, binned = _pve.histogram_samples(values[:, 0], n_bins, low, high, counts)
    keep = binned > 0
    return centres[keep], binned[keep]


def fit_tissues(
    values: np.ndarray,
    counts: np.ndarray | None,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    variance_floor: np.ndarray,
) -> tuple[_pve.PveModel, list[float], tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """The mixed-voxel model fitted from a mixture, and one Gaussian per tissue from it.

    Of the two starts (see below) the one of higher likelihood among those that keep every
    pure class (at least one voxel, means ascending) is kept; None when neither does.

    Parameters
    ----------
    values : (n, D) array
        Intensities of the fitted voxels (divided by the bias field), or an evenly spaced
        sample of them.
    counts : (n,) array or None
        Voxels each row stands for (None: one each).
    weights, means, covariances : (K,), (K, D), (K, D, D) arrays
        The fitted mixture, the starting point, in any order.
    variance_floor : (D,) array

    Returns
    -------
    model : PveModel
        Classes in ascending order of the first channel's mean.
    trace : list of float
        Mean log-likelihood per voxel of the model fit.
    tissues : (weights, means, covariances)
        :func:`segment._pve.tissue_moments` of ``model``, in the order of the input mixture.
    """
    order = np.argsort(np.asarray(means)[:, 0], kind="stable")
    means, weights = np.asarray(means)[order], np.asarray(weights)[order]
    covariances = np.asarray(covariances)[order]
    samples, counts = summarise(values, counts, TISSUE_FIT_BINS)
    floor = np.broadcast_to(np.asarray(variance_floor, np.float64), (samples.shape[1],))
    # Two starts, the better likelihood kept: the mixture's covariances, and every class at
    # the sharpest class's covariance (in MRI the noise, shared by the tissues). From the
    # first alone a class the ML fit widened over the mixed voxels can keep them (a noise-free
    # phantom's CSF stayed at sd 0.22); from the second alone a mixel class can die out.
    sharpest = covariances[np.argmin(np.trace(covariances, axis1=1, axis2=2))]
    total = len(samples) if counts is None else float(np.sum(counts))
    best = None
    for start in (covariances, np.broadcast_to(sharpest, covariances.shape)):
        initial = _pve.initial_model(means, start, weights)
        model, trace = _pve.fit_pve_model(
            samples, counts, initial, floor, max_iter=TISSUE_FIT_MAX_ITER, tol=TISSUE_FIT_TOL
        )
        keeps_every_class = (
            np.isfinite(trace[-1])
            and model.weights[: model.n_classes].min() * total >= 1.0
            and np.all(np.diff(model.means[:, 0]) > 0)
        )
        if keeps_every_class and (best is None or trace[-1] > best[1][-1]):
            best = model, trace
    if best is None:
        return None
    model, trace = best
    inverse = np.argsort(order)
    tissues = tuple(a[inverse] for a in _pve.tissue_moments(model))
    return model, trace, tissues


def fit_model(X: np.ndarray, estimator) -> tuple[_pve.PveModel, list[float]]:
    """The mixed-voxel model fitted on the whole features ``X`` (N, D) (dense reference)."""
    sample = X[:: max(1, len(X) // N_SAMPLE)]
    histogram = None
    if X.shape[1] == 1:
        edges = histogram_range(sample[:, 0], estimator.means_)
        values = X[:: max(1, len(X) // N_HISTOGRAM), 0]
        histogram = edges, np.histogram(values, bins=N_BINS, range=edges)[0]
    return fit_model_on(sample, histogram, estimator)


class FractionMaps:
    """The K fraction maps of a fit, computed a slab of the last spatial axis at a time.

    Built after the fit: one pass over slabs of the channels (divided by the bias field slab,
    when there is one) gathers what the model fit needs: the intensity range, the evenly
    spaced voxel samples of :func:`fit_model` (picked by their rank in
    :func:`segment.masking.flatten` order) and, for one channel, the histogram of up to
    :data:`N_HISTOGRAM` of them on the percentile range of the smaller sample; when the
    (N, K) posterior is held, it keeps the corrected intensities, (N, D) float32, so that the
    field is evaluated once.
    :meth:`slabs` then computes the fractions of each slab, with the MRF posterior of the same
    planes as the spatial prior, and adds up their column sums (the volumes) on the way. A
    voxel's fraction depends only on its own intensity, field and posterior, and the model only
    on whole-image statistics, so the maps do not depend on the slab size. Memory: the channels
    (memory maps for ``.nii`` inputs), the corrected intensities only beside a held (N, K)
    posterior, the samples (at most 2.2 M values) and a few slabs of all K maps.

    Parameters
    ----------
    estimator : fitted GaussianMixtureEM (``bias_field_last_axis_slabs`` when a field was fitted)
    channels : list of D arrays of the spatial shape S
    mask : bool array of shape S, the fitted voxels
    posterior : None, (N, K) array or callable
        MRF posterior of the pure classes, used as the spatial prior: None (no prior), the
        fitted voxels' probabilities in :func:`segment.masking.flatten` order, or a callable
        ``slabs(step)`` yielding, for each slab of the last axis, the K posterior maps of
        those planes, each of shape ``(*S[:-1], n)`` (as ``_StreamedPosterior.slabs``).

    Attributes
    ----------
    model : PveModel
    trace : list of float
        Mean log-likelihood per voxel of the model fit.
    """

    def __init__(self, estimator, channels, mask, posterior=None):
        self.estimator, self.channels, self.mask = estimator, list(channels), np.asarray(mask)
        self.posterior = posterior
        self.n_voxels = int(self.mask.sum())
        self._sums: np.ndarray | None = None
        self.model, self.trace, self.table = self._fit()

    def __len__(self) -> int:
        return self.model.n_classes

    # -- passes over the data ------------------------------------------------------------
    def _default_step(self) -> int:
        from .io import slab_step

        return slab_step(self.mask.shape, np.float32)

    def _field_slabs(self, step: int):
        """The bias field of each slab, ``(*S[:-1], n, D)`` float32, or None without a field."""
        n_last = self.mask.shape[-1]
        if getattr(self.estimator, "bias_field_shape_", None) is None:
            for _ in range(0, n_last, step):
                yield None
        elif len(self.channels) == 1:
            for (planes,) in self.estimator.bias_field_last_axis_slabs(step):
                yield planes[..., None]
        else:  # several channels: the field is computed whole (no per-channel slab access)
            field = self.estimator.bias_field_
            for start in range(0, n_last, step):
                yield field[..., start : start + step, :]

    def _corrected_slabs(self, step: int):
        """``(inside, ranks, X)`` per slab of ``step`` planes of the last axis.

        ``inside`` is the slab's mask, ``ranks`` (n,) the rows of its voxels in
        :func:`segment.masking.flatten` order and ``X`` (n, D) float32 their intensities
        divided by the field, both in the slab's C order.
        """
        for (start, inside, ranks), field in zip(
            slab_ranks(self.mask, step), self._field_slabs(step)
        ):
            X = np.empty((len(ranks), len(self.channels)), np.float32)
            for d, channel in enumerate(self.channels):
                X[:, d] = np.asarray(channel[..., start : start + step])[inside]
            if field is not None:
                X /= field[inside]
            yield inside, ranks, X

    def _fit(self):
        """The model fitted as :func:`fit_model` fits it on the whole (N, D) features.

        One pass: the range, the voxel sample ``X[::every]`` and, for one channel, the
        intensities ``X[::every_histogram]`` the histogram is made of (only the range when the
        estimator's own ``pv_fit`` model is taken).
        """
        every = max(1, self.n_voxels // N_SAMPLE)
        every_histogram = max(1, self.n_voxels // N_HISTOGRAM)
        low = np.full(len(self.channels), np.inf)
        high = np.full(len(self.channels), -np.inf)
        picked, sample, values = [], [], []
        # the corrected intensities (N x D float32) are kept for the fractions' pass, sparing a
        # second evaluation of the field, when the (N x K) posterior is held anyway: then they
        # are no larger than it and the peak memory does not move
        D, K = len(self.channels), len(self.estimator.means_)
        held = isinstance(self.posterior, np.ndarray) and D <= K
        self._features = np.empty((self.n_voxels, D), np.float32) if held else None
        fitted = getattr(self.estimator, "pv_model_", None)
        if fitted is not None and not np.allclose(
            _pve.tissue_moments(fitted)[1], self.estimator.means_
        ):  # reused only in the estimator's class order
            fitted = None
        for _, ranks, X in self._corrected_slabs(self._default_step()):
            if held:
                self._features[ranks] = X
            if len(X):
                low, high = np.minimum(low, X.min(0)), np.maximum(high, X.max(0))
            if fitted is not None:  # fitted with pv_fit: only the range is needed
                continue
            keep = ranks % every == 0
            picked.append(ranks[keep])
            sample.append(X[keep])
            if len(self.channels) == 1:  # the histogram's counts do not depend on the order
                values.append(X[ranks % every_histogram == 0, 0])
        if fitted is not None:
            model, trace = fitted, self.estimator.pv_trace_  # fitted with pv_fit: the same model
        else:
            order = np.argsort(np.concatenate(picked), kind="stable")
            sample = np.concatenate(sample)[order]  # = X[::every] of the whole features
            histogram = None
            if len(self.channels) == 1:
                edges = histogram_range(sample[:, 0], self.estimator.means_)
                values = np.concatenate(values)
                histogram = edges, np.histogram(values, bins=N_BINS, range=edges)[0]
                del values
            model, trace = fit_model_on(sample, histogram, self.estimator)
        table = None
        if len(self.channels) == 1 and self.n_voxels:
            table = _pve.tabulate(model, float(low[0]), float(high[0]))
        return model, trace, table

    def _fractions(self, X: np.ndarray, posterior: np.ndarray | None) -> np.ndarray:
        """Fractions of ``X`` (n, D), ``CHUNK`` voxels at a time, (n, K) float32."""
        out = np.empty((len(X), len(self)), np.float32)
        for start in range(0, len(X), CHUNK):
            part = slice(start, start + CHUNK)
            rows = None if posterior is None else posterior[part]
            if self.table is not None:
                out[part] = _pve.fractions_from_table_mrf(X[part, 0], self.table, rows)
            else:
                prior = None if rows is None else _pve.mrf_log_prior(rows)
                out[part] = _pve.fractions(X[part].astype(np.float64), self.model, prior)
        return out

    def flat_slabs(self, step: int):
        """``(inside, ranks, fractions)`` per slab: (n,) rows, (n, K) float32 fractions.

        The slab's intensities are the rows ``ranks`` of the features kept by the model fit
        (or the channels divided by the field, again); its posterior rows (the spatial prior)
        are those of the kept (N, K) posterior, or the mask's voxels of the posterior maps of
        the same planes.
        """
        sums = np.zeros(len(self))
        maps = self.posterior(step) if callable(self.posterior) else None
        corrected = self._corrected_slabs(step) if self._features is None else None
        for _, inside, ranks in slab_ranks(self.mask, step):
            if maps is not None:
                posterior = np.stack([np.asarray(m)[inside] for m in next(maps)], 1)
            else:
                posterior = None if self.posterior is None else self.posterior[ranks]
            X = self._features[ranks] if corrected is None else next(corrected)[2]
            fractions = self._fractions(X, posterior)
            sums += fractions.sum(0, dtype=np.float64)
            yield inside, ranks, fractions
        self._sums = sums

    def slabs(self, step: int):
        """Yield the K maps' slabs, for ``start = 0, step, ...`` along the last axis.

        Each slab is a list of K float32 arrays of shape ``(*S[:-1], n)``, n <= step, zeros
        outside the mask (the form :func:`segment.io.write_probabilities` streams). A whole
        pass also sets the column sums behind :meth:`column_sums`.
        """
        for inside, _, fractions in self.flat_slabs(step):
            maps = [np.zeros(inside.shape, np.float32, order="F") for _ in range(len(self))]
            for k, volume in enumerate(maps):  # in Fortran order, as NIfTI stores them
                volume[inside] = fractions[:, k]
            yield maps

    def column_sums(self) -> np.ndarray:
        """Sum of each class's fractions over the fitted voxels, (K,) float64 (one pass if new)."""
        if self._sums is None:
            for _ in self.flat_slabs(self._default_step()):
                pass
        return self._sums

    def flat(self) -> np.ndarray:
        """All fractions, (N, K) float32 in :func:`segment.masking.flatten` order."""
        out = np.empty((self.n_voxels, len(self)), np.float32)
        for _, ranks, fractions in self.flat_slabs(self._default_step()):
            out[ranks] = fractions
        return out

    def stacked(self) -> np.ndarray:
        """All K maps as one (*S, K) float32 array, zeros outside the mask."""
        out = np.zeros(self.mask.shape + (len(self),), np.float32)
        step = self._default_step()
        for index, maps in enumerate(self.slabs(step)):  # a whole pass: the sums are kept
            out[..., index * step : (index + 1) * step, :] = np.stack(maps, -1)
        return out

    def __getitem__(self, k: int) -> np.ndarray:
        """Map ``k`` alone, of shape S (a whole pass; :meth:`slabs` gives all K in one)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        out = np.zeros(self.mask.shape, np.float32)
        step = self._default_step()
        for index, maps in enumerate(self.slabs(step)):
            out[..., index * step : (index + 1) * step] = maps[k]
        return out


def slab_ranks(mask: np.ndarray, step: int):
    """``(start, inside, ranks)`` per slab of ``step`` planes of the last axis of ``mask``.

    ``inside`` is ``mask[..., start:start + step]``; ``ranks`` (n,) int64 are the rows of its
    voxels, in the slab's C order, in :func:`segment.masking.flatten` order of the whole mask
    (the C order of ``mask.nonzero()``): the voxels of the earlier lines along the last axis,
    plus those of the same line before the voxel.

    Examples
    --------
    >>> mask = np.array([[True, False, True], [True, True, False]])
    >>> [ranks.tolist() for _, _, ranks in slab_ranks(mask, 2)]
    [[0, 2, 3], [1]]
    """
    per_line = mask.sum(-1, dtype=np.int64)
    line_start = np.cumsum(per_line.ravel()).reshape(per_line.shape) - per_line
    seen = np.zeros_like(line_start)  # voxels of each line in the slabs already done
    for start in range(0, mask.shape[-1], step):
        inside = np.asarray(mask[..., start : start + step])
        count = inside.sum(-1, dtype=np.int64)  # voxels of each line in this slab
        first = np.cumsum(count.ravel()) - count.ravel()  # a line's first voxel in the slab
        ranks = np.arange(int(count.sum()), dtype=np.int64)
        ranks += np.repeat((line_start + seen).ravel() - first, count.ravel())
        seen += count
        yield start, inside, ranks


def estimate_fractions(
    estimator,
    channels: list[np.ndarray],
    mask: np.ndarray,
    posterior: np.ndarray | None = None,
) -> tuple[np.ndarray, _pve.PveModel, list[float]]:
    """Class fractions of the fitted voxels, all at once (see :class:`FractionMaps`).

    Parameters
    ----------
    estimator : fitted GaussianMixtureEM (with a bias field when one was fitted)
    channels : list of D arrays of the spatial shape
    mask : bool array of the spatial shape, the fitted voxels
    posterior : (N, K) array, optional
        MRF posterior of the pure classes in :func:`segment.masking.flatten` order, used as
        the spatial prior (None: no spatial prior).

    Returns
    -------
    fractions : (N, K) float32
        Rows in [0, 1] summing to 1, labels in the estimator's (ascending-mean) order.
    model : PveModel
    trace : list of float
        Mean log-likelihood per voxel of the model fit.
    """
    maps = FractionMaps(estimator, channels, mask, posterior)
    return maps.flat(), maps.model, maps.trace


def model_record(model: _pve.PveModel, trace: list[float]) -> dict[str, Any]:
    """The sidecar's ``partial_volume`` record: the refitted model and its fit."""
    K = model.n_classes
    return {
        "model": "pure classes and mixels of classes adjacent in mean intensity "
        "(mean f mu_a + (1-f) mu_b, covariance f S_a + (1-f) S_b, f uniform on "
        f"{model.n_steps} steps); fractions = posterior expectation",
        "means": model.means.tolist(),
        "covariances": model.covariances.tolist(),
        "pure_weights": model.weights[:K].tolist(),
        "mixed_weights": {f"{k + 1}-{k + 2}": float(model.weights[K + k]) for k in range(K - 1)},
        "n_iter": len(trace),
        "log_likelihood_per_voxel": trace[-1] if trace else None,
    }
