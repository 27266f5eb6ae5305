"""Partial-volume fractions of a fitted segmentation: the glue between a fit and :mod:`_pve`.

Takes the fitted :class:`~segment.GaussianMixtureEM`, the image channels and the mask, and
returns the class fractions of every fitted voxel: the intensities are divided by the fitted
bias field (when there is one), the mixed-voxel model of :mod:`segment._pve` is refitted from
the plain mixture on a histogram of them (one channel) or a voxel sample (several), and the
fractions are computed ``chunk_size`` voxels at a time, with the MRF posterior of the pure
classes as the spatial prior when the MRF is on.
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
#: Voxels per chunk when computing the fractions (each holds (chunk, K - 1, 20) float64).
CHUNK = 65_536


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


def fit_model(X: np.ndarray, estimator) -> tuple[_pve.PveModel, list[float]]:
    """The mixed-voxel model fitted on ``X`` (N, D), from the estimator's plain mixture."""
    initial = _pve.initial_model(estimator.means_, estimator.covariances_, estimator.weights_)
    floor = np.broadcast_to(np.asarray(estimator.variance_floor_, np.float64), (X.shape[1],))
    if X.shape[1] == 1:
        step = max(1, len(X) // N_SAMPLE)
        low, high = np.percentile(X[::step, 0], [0.01, 99.99])
        low, high = (
            float(min(low, estimator.means_.min())),
            float(max(high, estimator.means_.max())),
        )
        samples, weights = _pve.histogram_samples(X[:, 0], N_BINS, low, high)
        keep = weights > 0
        samples, weights = samples[keep], weights[keep]
    else:
        samples, weights = X[:: max(1, len(X) // N_SAMPLE)].astype(np.float64), None
    return _pve.fit_pve_model(samples, weights, initial, floor)


def estimate_fractions(
    estimator,
    channels: list[np.ndarray],
    mask: np.ndarray,
    posterior: np.ndarray | None = None,
) -> tuple[np.ndarray, _pve.PveModel, list[float]]:
    """Class fractions of the fitted voxels.

    Parameters
    ----------
    estimator : fitted GaussianMixtureEM (with ``bias_field_`` when a field was fitted)
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
    X = corrected_features(channels, mask, estimator.bias_field_)
    model, trace = fit_model(X, estimator)
    out = np.empty((len(X), model.n_classes), np.float32)
    table = None
    if X.shape[1] == 1 and len(X):  # one channel: a lookup table over the data's range
        table = _pve.tabulate(model, float(X.min()), float(X.max()))
    for start in range(0, len(X), CHUNK):
        part = slice(start, start + CHUNK)
        prior = None if posterior is None else _pve.mrf_log_prior(posterior[part])
        if table is not None:
            out[part] = _pve.fractions_from_table(X[part, 0], table, prior)
        else:
            out[part] = _pve.fractions(X[part].astype(np.float64), model, prior)
    return out, model, trace


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
