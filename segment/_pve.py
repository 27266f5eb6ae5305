"""Partial-volume fractions: a mixed-voxel model between classes adjacent in intensity.

Pure numpy functions, no I/O and no Dask. Each voxel is either *pure* class ``k`` (one of K),
or a *mixel* of two classes adjacent in the label order (labels ascend in mean intensity):
a fraction ``f`` of class ``a = k`` and ``1 - f`` of class ``b = k + 1``. A mixel of fraction
``f`` is Gaussian with

    mean        mu(f)    = f mu_a + (1 - f) mu_b
    covariance  Sigma(f) = f Sigma_a + (1 - f) Sigma_b

(the noise, which dominates the class variance in MRI, does not average away inside one
voxel, so the variance is interpolated rather than shrunk as ``f^2 Sigma_a + (1-f)^2 Sigma_b``
would). ``f`` has a uniform prior on ``n_steps`` grid points in (0, 1). The 2K - 1 classes
(K pure, then K - 1 mixed, pair ``(k, k+1)`` at index ``K + k``) have weights ``pi_c``,
optionally times a per-voxel spatial prior (:func:`mrf_log_prior`). The fractions of a voxel
are the posterior expectation of its class content:

    F_k = P(pure k | x) + sum_{b} P(mix(k, b) | x) E[f_k | x, mix(k, b)]

so each row lies in [0, 1] and sums to 1. The class parameters are refitted under this model
by :func:`fit_pve_model` (pure classes from the posterior of their pure voxels, weights of all
2K - 1 classes), starting from a plain mixture.

References
----------
Santago & Gage (1993), Quantification of MR brain images by mixture density and partial volume
modeling. IEEE Trans. Med. Imaging 12(3), 566-574.
Shattuck, Sandor-Leahy, Schaper, Rottenberg & Leahy (2001), Magnetic resonance image tissue
classification using a partial volume model. NeuroImage 13(5), 856-876.
Zhang, Brady & Smith (2001), Segmentation of brain MR images through a hidden Markov random
field model and the expectation-maximization algorithm (FSL FAST). IEEE Trans. Med. Imaging
20(1), 45-57.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels

LOG_2PI = np.log(2.0 * np.pi)
#: Grid points of the mixing fraction f in (0, 1) (midpoints of equal bins).
N_FRACTION_STEPS = 20
#: Added to the MRF posterior before it weighs the classes, so that no class is ruled out.
PRIOR_FLOOR = 0.05


@dataclass
class PveModel:
    """Parameters of the mixed-voxel model.

    Attributes
    ----------
    means : (K, D) array
        Pure-class means, ascending along the label order.
    covariances : (K, D, D) array
        Pure-class covariances.
    weights : (2K - 1,) array
        Prior probabilities of the K pure classes, then of the K - 1 mixed pairs (k, k+1).
    n_steps : int
        Grid points of the mixing fraction.
    """

    means: np.ndarray
    covariances: np.ndarray
    weights: np.ndarray
    n_steps: int = N_FRACTION_STEPS

    @property
    def n_classes(self) -> int:
        return len(self.means)


def fraction_grid(n_steps: int = N_FRACTION_STEPS) -> np.ndarray:
    """The fractions f of the first class of a mixel, (n_steps,) midpoints of (0, 1)."""
    return (np.arange(n_steps) + 0.5) / n_steps


def log_gaussian(X: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """log N(x | mean, covariance) for each row of ``X`` (N, D); returns (N,) float64."""
    chol = np.linalg.cholesky(np.atleast_2d(covariance))
    z = np.linalg.solve(chol, (np.asarray(X, np.float64) - mean).T)  # (D, N)
    log_det = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * (X.shape[1] * LOG_2PI + log_det + np.einsum("dn,dn->n", z, z))


def log_class_likelihoods(X: np.ndarray, model: PveModel) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihoods of the pure classes and of the mixels on the fraction grid.

    Parameters
    ----------
    X : (N, D) array
    model : PveModel

    Returns
    -------
    pure : (N, K) array
        log N(x | mu_k, Sigma_k).
    mixed : (N, K - 1, n_steps) array
        log N(x | mu(f), Sigma(f)) + log(1 / n_steps) for pair (k, k+1) and each grid f
        (the uniform prior on f included).
    """
    K = model.n_classes
    f = fraction_grid(model.n_steps)
    if X.shape[1] == 1:  # one channel: broadcast over classes and fractions at once
        return _log_class_likelihoods_1d(np.asarray(X, np.float64)[:, 0], model, f)
    pure = np.stack([log_gaussian(X, model.means[k], model.covariances[k]) for k in range(K)], 1)
    mixed = np.empty((len(X), K - 1, len(f)))
    for k in range(K - 1):
        for j, fj in enumerate(f):
            mean = fj * model.means[k] + (1 - fj) * model.means[k + 1]
            cov = fj * model.covariances[k] + (1 - fj) * model.covariances[k + 1]
            mixed[:, k, j] = log_gaussian(X, mean, cov)
    mixed -= np.log(len(f))
    return pure, mixed


def _log_class_likelihoods_1d(x: np.ndarray, model: PveModel, f: np.ndarray):
    """:func:`log_class_likelihoods` for one channel, ``x`` (N,)."""
    mu, var = model.means[:, 0], model.covariances[:, 0, 0]
    pure = -0.5 * (LOG_2PI + np.log(var) + (x[:, None] - mu) ** 2 / var)
    mixed_mu = f * mu[:-1, None] + (1 - f) * mu[1:, None]  # (K-1, M)
    mixed_var = f * var[:-1, None] + (1 - f) * var[1:, None]
    mixed = (x[:, None, None] - mixed_mu) ** 2
    mixed /= mixed_var
    mixed += LOG_2PI + np.log(mixed_var)
    mixed *= -0.5
    mixed -= np.log(len(f))
    return pure, mixed


def class_posteriors(
    X: np.ndarray, model: PveModel, log_prior: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior of the pure classes and of (pair, f), and each voxel's log-likelihood.

    Parameters
    ----------
    X : (N, D) array
    model : PveModel
    log_prior : (N, 2K - 1) array, optional
        A per-voxel log prior added to ``log(model.weights)`` (need not be normalised).

    Returns
    -------
    pure : (N, K) array
        P(pure k | x).
    mixed : (N, K - 1, n_steps) array
        P(mix(k, k+1), f_j | x).
    log_likelihood : (N,) array
        log sum over classes and f of prior x likelihood.
    """
    K = model.n_classes
    pure, mixed = log_class_likelihoods(X, model)
    with np.errstate(divide="ignore"):
        log_weights = np.log(model.weights)
    pure += log_weights[:K]
    mixed += log_weights[K:, None]
    if log_prior is not None:
        pure += log_prior[:, :K]
        mixed += log_prior[:, K:, None]
    top = np.maximum(pure.max(1), mixed.max((1, 2)))
    pure = np.exp(pure - top[:, None])
    mixed = np.exp(mixed - top[:, None, None])
    total = pure.sum(1) + mixed.sum((1, 2))
    pure /= total[:, None]
    mixed /= total[:, None, None]
    return pure, mixed, top + np.log(total)


def fractions(X: np.ndarray, model: PveModel, log_prior: np.ndarray | None = None) -> np.ndarray:
    """Expected class fractions of each voxel, (N, K) float32, rows in [0, 1] summing to 1.

    Parameters
    ----------
    X : (N, D) array
        Intensities (bias-corrected when a field was fitted).
    model : PveModel
    log_prior : (N, 2K - 1) array, optional
        Spatial prior, e.g. :func:`mrf_log_prior`.

    Examples
    --------
    >>> import numpy as np
    >>> model = PveModel(np.array([[0.0], [1.0]]), np.full((2, 1, 1), 1e-4),
    ...                  np.array([0.4, 0.4, 0.2]))
    >>> fractions(np.array([[0.0], [0.3], [1.0]]), model).round(2)
    array([[1.  , 0.  ],
           [0.7 , 0.3 ],
           [0.  , 1.  ]], dtype=float32)
    """
    pure, mixed, _ = class_posteriors(X, model, log_prior)
    f = fraction_grid(model.n_steps)
    first = mixed @ f  # (N, K-1): P(mix) E[f | mix], the share of the lower class
    second = mixed.sum(2) - first
    out = pure
    out[:, :-1] += first
    out[:, 1:] += second
    np.clip(out, 0.0, 1.0, out=out)
    out /= out.sum(1, keepdims=True)
    return out.astype(np.float32)


def mrf_log_prior(posterior: np.ndarray, floor: float = PRIOR_FLOOR) -> np.ndarray:
    """Per-voxel log prior on the 2K - 1 classes from the MRF posterior of the pure classes.

    A pure class ``k`` is weighed by ``floor + q_k``, a mixel of ``(k, k+1)`` by
    ``floor + (q_k + q_{k+1}) / 2``: a voxel mixes the classes its spatially regularised
    posterior ``q`` holds, and a class its neighbourhood rules out is unlikely, pure or mixed.

    Parameters
    ----------
    posterior : (N, K) array
        MRF posterior of the pure classes.

    Returns
    -------
    (N, 2K - 1) float64 array
    """
    q = np.asarray(posterior, np.float64)
    mixed = 0.5 * (q[:, :-1] + q[:, 1:])
    return np.log(floor + np.concatenate([q, mixed], axis=1))


def initial_model(
    means: np.ndarray, covariances: np.ndarray, weights: np.ndarray, mixed_share: float = 0.2
) -> PveModel:
    """A mixed-voxel model from a plain mixture: pure weights scaled, mixels equal share."""
    K = len(means)
    mixed = np.full(K - 1, mixed_share / (K - 1))
    pure = (1.0 - mixed_share) * np.asarray(weights, np.float64) / np.sum(weights)
    return PveModel(
        np.asarray(means, np.float64).copy(),
        np.asarray(covariances, np.float64).copy(),
        np.concatenate([pure, mixed]),
    )


def pve_m_step(
    X: np.ndarray,
    sample_weight: np.ndarray,
    pure: np.ndarray,
    mixed: np.ndarray,
    variance_floor: np.ndarray,
    n_steps: int,
) -> PveModel:
    """Update the model from the class posteriors of weighted samples.

    The weights of all 2K - 1 classes are their posterior shares; the means and covariances of
    the pure classes come from their pure voxels (the mixels' content is explained by those).

    Parameters
    ----------
    X : (N, D) array
    sample_weight : (N,) array
        Voxels each row stands for (histogram counts, or ones).
    pure, mixed : arrays from :func:`class_posteriors`
    variance_floor : (D,) array
        Lower bound on each channel's variance.
    """
    w = np.asarray(sample_weight, np.float64)
    r = pure * w[:, None]
    s = mixed.sum(2) * w[:, None]
    nk = r.sum(0) + 1e-10
    weights = np.concatenate([r.sum(0), s.sum(0)]) / w.sum()
    means = (r.T @ X) / nk[:, None]
    covariances = np.empty((len(nk), X.shape[1], X.shape[1]))
    for k in range(len(nk)):
        d = X - means[k]
        covariances[k] = (r[:, k, None] * d).T @ d / nk[k]
        covariances[k][np.diag_indices(X.shape[1])] = np.maximum(
            np.diag(covariances[k]), variance_floor
        )
    return PveModel(means, covariances, weights, n_steps)


def fit_pve_model(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    initial: PveModel,
    variance_floor: np.ndarray,
    *,
    max_iter: int = 50,
    tol: float = 1e-6,
) -> tuple[PveModel, list[float]]:
    """EM for the mixed-voxel model on weighted samples (a histogram, or a voxel sample).

    Parameters
    ----------
    X : (N, D) array
    sample_weight : (N,) array or None
    initial : PveModel
        Starting point, e.g. :func:`initial_model` of the fitted plain mixture.
    variance_floor : (D,) array
    max_iter, tol
        Stop after ``max_iter`` iterations or when the mean log-likelihood per voxel changes by
        less than ``tol``.

    Returns
    -------
    model : PveModel
    trace : list of float
        Mean log-likelihood per voxel after each E-step.
    """
    X = np.asarray(X, np.float64)
    w = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if X.shape[1] == 1:
        return _fit_pve_model_1d(X[:, 0], w, initial, variance_floor, max_iter, tol)
    return _fit_pve_model_general(X, w, initial, variance_floor, max_iter, tol)


def _fit_pve_model_general(X, w, initial: PveModel, variance_floor, max_iter: int, tol: float):
    """:func:`fit_pve_model` on (N, D) features with weights ``w`` (N,), for any D."""
    model, trace = initial, []
    for _ in range(max_iter):
        pure, mixed, log_likelihood = class_posteriors(X, model)
        trace.append(float(w @ log_likelihood / w.sum()))
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) < tol:
            break
        model = pve_m_step(X, w, pure, mixed, variance_floor, model.n_steps)
    return model, trace


def tissue_moments(model: PveModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Gaussian per tissue: the moments of the voxels whose largest fraction it holds.

    Under the mixed-voxel model a tissue's voxels (those whose largest fraction is that
    tissue, the crisp truth of a fuzzy anatomical model) are its pure voxels and the half of
    each adjacent mixel where its fraction exceeds 1/2. Their intensity distribution is a
    mixture of Gaussians; its weight, mean and covariance are returned. On a real T1 this is
    close to the Gaussian of each tissue's true voxels, where the maximum-likelihood K-Gaussian
    fit is not (a broad class swallows the mixels and moves the other boundaries).

    Parameters
    ----------
    model : PveModel
        Classes ascending in intensity.

    Returns
    -------
    weights : (K,) array, summing to 1
    means : (K, D) array
    covariances : (K, D, D) array
    """
    K, f = model.n_classes, fraction_grid(model.n_steps)
    mu, cov = np.asarray(model.means, np.float64), np.asarray(model.covariances, np.float64)
    w = np.asarray(model.weights, np.float64)
    # every Gaussian of the model: K pure ones, then each pair's grid of mixels
    owner, weight, means, covs = list(range(K)), list(w[:K]), list(mu), list(cov)
    for k in range(K - 1):
        for fj in f:
            owner.append(k if fj > 0.5 else k + 1)  # the grid has no f = 1/2
            weight.append(w[K + k] / len(f))
            means.append(fj * mu[k] + (1 - fj) * mu[k + 1])
            covs.append(fj * cov[k] + (1 - fj) * cov[k + 1])
    owner, weight = np.asarray(owner), np.asarray(weight)
    means, covs = np.asarray(means), np.asarray(covs)
    totals = np.bincount(owner, weight, minlength=K)
    safe = np.maximum(totals, np.finfo(float).tiny)
    tissue_means = (
        np.stack([weight[owner == k] @ means[owner == k] for k in range(K)]) / safe[:, None]
    )
    second = (
        np.stack(
            [
                np.einsum("c,cde->de", weight[owner == k], covs[owner == k])
                + np.einsum("c,cd,ce->de", weight[owner == k], means[owner == k], means[owner == k])
                for k in range(K)
            ]
        )
        / safe[:, None, None]
    )
    tissue_covs = second - np.einsum("kd,ke->kde", tissue_means, tissue_means)
    return totals / totals.sum(), tissue_means, tissue_covs


def _fit_pve_model_1d(x, w, initial: PveModel, variance_floor, max_iter: int, tol: float):
    """:func:`fit_pve_model` for one channel, ``x`` (N,): the same steps on all 2K - 1 +
    (K - 1) n_steps Gaussians at once (:func:`segment._kernels.pve_em_1d`), a few times
    faster on a histogram."""
    mu, var, weights, trace = _kernels.pve_em_1d(
        x, w, fraction_grid(initial.n_steps), initial.means[:, 0],
        initial.covariances[:, 0, 0], initial.weights,
        float(np.asarray(variance_floor, np.float64).ravel()[0]), max_iter, tol,
    )  # fmt: skip
    model = PveModel(mu[:, None], var[:, None, None], weights, initial.n_steps)
    return model, trace


def histogram_samples(
    values: np.ndarray, n_bins: int, low: float, high: float, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres (n_bins, 1) and counts (n_bins,) of one channel's values on [low, high]
    (each value counted ``weights`` times when given)."""
    counts, edges = np.histogram(values, bins=n_bins, range=(low, high), weights=weights)
    return (0.5 * (edges[:-1] + edges[1:]))[:, None], counts.astype(np.float64)


def fraction_volumes(fraction_sums: np.ndarray, voxel_volume_ml: float) -> np.ndarray:
    """Volume of each class in mL from the column sums of the fractions, (K,)."""
    return np.asarray(fraction_sums, np.float64) * voxel_volume_ml


@dataclass
class FractionTable:
    """:func:`fractions` of one channel tabulated on an intensity grid, for fast lookup.

    Attributes
    ----------
    x : (n,) grid of intensities
    log_likelihood : (n, 2K - 1) log(pi_c p(x | c)), the mixels summed over f
    first_share : (n, K - 1) E[f | x, mix(k, k+1)], the share of the lower class
    """

    x: np.ndarray
    log_likelihood: np.ndarray
    first_share: np.ndarray


def tabulate(model: PveModel, low: float, high: float, n: int = 4096) -> FractionTable:
    """Tabulate the class likelihoods and mixing shares of a one-channel model on [low, high]."""
    x = np.linspace(low, high, n)
    pure, mixed = log_class_likelihoods(x[:, None], model)
    # a class of weight 0 gets a finite log weight: the table's slopes (differences of adjacent
    # rows) would be -inf - -inf = NaN
    log_weights = np.log(np.maximum(model.weights, np.finfo(np.float64).tiny))
    top = mixed.max(2, keepdims=True)
    terms = np.exp(mixed - top)
    mixed_sum = terms.sum(2)
    share = (terms @ fraction_grid(model.n_steps)) / mixed_sum
    log_mixed = top[..., 0] + np.log(mixed_sum)
    K = model.n_classes
    log_likelihood = np.concatenate([pure + log_weights[:K], log_mixed + log_weights[K:]], 1)
    return FractionTable(x, log_likelihood, share)


def fractions_from_table(
    x: np.ndarray, table: FractionTable, log_prior: np.ndarray | None = None
) -> np.ndarray:
    """:func:`fractions` of one channel ``x`` (N,) by linear interpolation in ``table``.

    Equal to :func:`fractions` up to the interpolation error (below 1e-4 with 4096 points over
    the data's range); ``x`` is clipped to the table's range.
    """
    n_classes = table.log_likelihood.shape[1]
    K = (n_classes + 1) // 2
    # the grid is uniform: one index and weight per voxel serve every column
    step = (table.x[-1] - table.x[0]) / max(len(table.x) - 1, 1)
    position = (np.asarray(x, np.float64) - table.x[0]) / (step if step > 0 else 1.0)
    np.clip(position, 0.0, len(table.x) - 1.0, out=position)
    low = np.minimum(position.astype(np.intp), max(len(table.x) - 2, 0))
    weight = (position - low)[:, None]
    high = np.minimum(low + 1, len(table.x) - 1)

    def lookup(values):  # (n, C) table -> (N, C), linear between grid points
        return values[low] * (1.0 - weight) + values[high] * weight

    log_post = lookup(table.log_likelihood)
    if log_prior is not None:
        log_post += log_prior
    log_post -= log_post.max(1, keepdims=True)
    post = np.exp(log_post)
    post /= post.sum(1, keepdims=True)
    share = lookup(table.first_share)
    out = post[:, :K].copy()
    out[:, :-1] += post[:, K:] * share
    out[:, 1:] += post[:, K:] * (1 - share)
    return out.astype(np.float32)


def fractions_from_table_mrf(
    x: np.ndarray,
    table: FractionTable,
    posterior: np.ndarray | None = None,
    floor: float = PRIOR_FLOOR,
) -> np.ndarray:
    """``fractions_from_table(x, table, mrf_log_prior(posterior, floor))``, computed faster.

    The same numbers up to rounding (about 1e-16): the prior weighs the likelihoods after
    the exp rather than as a log before it, and the work runs on one row per class, (C, N),
    so that the sums and maxima over classes are elementwise (the (N, C) layout reduces along
    rows of 3 to 5 values, several times slower), with one gather of the tabulated
    likelihoods and mixing shares for both ends of the interpolation: the loop
    :func:`segment._kernels.table_fractions` (compiled, or its numpy twin).

    Parameters
    ----------
    x : (N,) array
        One channel's intensities (bias-corrected when a field was fitted).
    table : FractionTable
    posterior : (N, K) array, optional
        MRF posterior of the pure classes (None: no spatial prior).
    floor : float
        As in :func:`mrf_log_prior`.

    Returns
    -------
    (N, K) float32 array
    """
    n_classes = table.log_likelihood.shape[1]
    n = len(table.x)
    step = (table.x[-1] - table.x[0]) / max(n - 1, 1)
    values = np.ascontiguousarray(np.concatenate([table.log_likelihood, table.first_share], 1).T)
    slopes = np.diff(values, axis=1, append=values[:, -1:])  # 0 past the last point
    return _kernels.table_fractions(x, values, slopes, float(table.x[0]),
                                    step if step > 0 else 1.0, posterior, floor,
                                    (n_classes + 1) // 2)  # fmt: skip
