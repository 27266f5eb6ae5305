"""The kernel layer: the compiled loops (C, ``segment/_estep.c``) or their numpy twins.

The per-voxel loops that EM repeats are compiled C in one extension module,
``segment._estep``: the E-step statistics of a chunk (see :func:`segment._em.chunk_statistics`),
the moments and histogram of one channel, the MRF's mean-field sweep
(:func:`mean_field_rows`), the bias field's interpolation (:func:`interpolate_field`) and the
partial-volume fractions (:func:`table_fractions`) and the EM of their model
(:func:`pve_em_1d`). They release the GIL, so threads run chunks side by side.

The extension is optional. When it was not built (no C compiler at install time) or when the
environment variable ``SEGMENT_NO_COMPILED=1`` is set, every kernel runs on its numpy twin,
with the same results to floating-point rounding, several times slower. :func:`notify_if_slow`
then issues one :class:`segment.exceptions.PerformanceWarning` per process.

Each compiled kernel has a numpy twin, which the tests compare it with:

=====================  ==============================================================
compiled               numpy twin
=====================  ==============================================================
``statistics_1d``      :func:`segment._em.reference_statistics` (e_step + moments)
``statistics_nd``      :func:`segment._em.reference_statistics`
``moments_1d``         :func:`moments_1d` here (numpy)
``histogram_1d``       :func:`histogram_1d` here (numpy)
``mean_field_rows``    :func:`_numpy_mean_field_rows` here (neighbour sums + the E-step)
``interpolate_field``  :func:`_numpy_interpolate_field` here (np.tensordot)
``table_fractions``    :func:`_numpy_table_fractions` here
``pve_em_1d``          :func:`_numpy_pve_em_1d` here
``bias_estep_1d``      the numpy path of :func:`segment.spatial.bias.em_sampled_block`
=====================  ==============================================================
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import numpy as np

from .exceptions import PerformanceWarning

#: Setting this environment variable to 1 turns the compiled kernels off (the numpy twins run).
DISABLE_VARIABLE = "SEGMENT_NO_COMPILED"

#: What :func:`mean_field_rows` writes: the next uint8 state (a sweep), the float32 posterior
#: (*block, K), the posterior component by component (K, *computed planes), or the posterior
#: with the block's axes reversed.
STATE, FINAL, FINAL_BY_COMPONENT, FINAL_REVERSED = 0, 1, 2, 3

#: Components more than this many nats under a voxel's best get weight 0 in a sweep, not
#: ``exp(-17) = 4e-8`` of it: under the resolution of the float32 probabilities (whose largest
#: is at least 1/K) and far under the 1/255 steps of the state. The same in C.
NEGLIGIBLE = -17.0


def _load() -> tuple[ModuleType | None, str]:
    """The compiled module, or None and why not."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return None, f"{DISABLE_VARIABLE} is set"
    try:
        from . import _estep
    except ImportError:
        return None, "segment._estep was not built when the package was installed"
    return _estep, ""


#: The compiled module ``segment._estep``, or None when the numpy twins run.
compiled, why_not_compiled = _load()
_notified = False


def notify_if_slow() -> None:
    """Warn once per process (:class:`PerformanceWarning`) when the numpy twins run."""
    global _notified
    if compiled is None and not _notified:
        _notified = True
        warnings.warn(
            f"the compiled kernels are off ({why_not_compiled}): running on numpy, with the "
            "same results but several times slower; install with a C compiler to build them",
            PerformanceWarning,
            stacklevel=2,
        )


# --------------------------------------------------------------------------------------------
# Moments and histogram of one channel
# --------------------------------------------------------------------------------------------
def moments_1d(x: np.ndarray) -> tuple[float, float, float, float]:
    """Minimum, maximum, mean and centred sum of squares of ``x`` (N,), in float64.

    A NaN or an infinity gives NaN extremes (the caller then counts them).
    """
    if compiled is not None:
        return compiled.moments_1d(x)
    n = len(x)
    total = float(np.sum(x, dtype=np.float64))
    if not np.isfinite(total):
        low = high = np.nan
    else:
        low, high = (float(x.min()), float(x.max())) if n else (np.inf, -np.inf)
    mean = total / n if n else 0.0
    diff = np.subtract(x, mean, dtype=np.float64)
    return low, high, mean, float(diff @ diff)


def histogram_1d(x: np.ndarray, low: float, high: float, counts: np.ndarray) -> None:
    """Add the counts of ``x`` in ``len(counts)`` equal bins over ``[low, high]`` into ``counts``.

    The last bin is closed; values outside the range or not finite are not counted.
    """
    if compiled is not None:
        compiled.histogram_1d(x, low, high, counts)
        return
    n_bins = len(counts)
    scale = n_bins / (high - low) if high > low else 0.0
    values = np.asarray(x, dtype=np.float64)
    values = values[(values >= low) & (values <= high)]
    bins = np.minimum(((values - low) * scale).astype(np.intp), n_bins - 1)
    counts += np.bincount(bins, minlength=n_bins)


# --------------------------------------------------------------------------------------------
# The MRF sweep
# --------------------------------------------------------------------------------------------
def mean_field_rows(
    previous: np.ndarray,
    corrected: np.ndarray,
    mask: np.ndarray,
    offsets: np.ndarray,
    offset_weights: np.ndarray,
    means: np.ndarray,
    precisions_chol: np.ndarray,
    log_norm: np.ndarray,
    log_weights: np.ndarray,
    prior_scale: float,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    mode: int,
    skip_settled: bool,
    state_out: np.ndarray,
    final_out: np.ndarray,
    labels_out: np.ndarray,
    counts: np.ndarray,
) -> None:
    """One mean-field sweep over the rows ``[i0:i1, j0:j1]`` of a 3-D block (compiled or numpy).

    Parameters
    ----------
    previous : (n0, n1, n2, >= K) uint8
        The previous posterior in units of 1/255 in the first K slots (zeros outside the mask),
        read (never written) for the voxels and their neighbours.
    corrected : (i1 - i0, j1 - j0, n2, D) float32
        The bias-corrected intensities ``y / b`` of the computed voxels.
    mask : (n0, n1, n2) bool
    offsets : (M, 3) int64 and offset_weights : (M,) float64
        The neighbours and their weights ``w_ij``.
    means, precisions_chol : (K, D), (K, D, D) float64
    log_norm : (K,) float64, ``log det(P_k) - D/2 log(2 pi)``
    log_weights : (K,) float64
        ``log pi_k``, used when ``prior_scale == 0`` (the plain E-step).
    prior_scale : float
        ``beta / 255``: the log prior is ``prior_scale * sum_j w_ij previous_jk``.
    i0, i1, j0, j1 : int
        The rows to compute: planes of the first axis, rows of the second (whole rows of the
        last axis each).
    mode : int
        :data:`STATE`: write ``state_out`` (n0, n1, n2, K + 1) uint8, the rounded posterior
        (units of 1/255) and in the last slot the change ``round(sum_k |state_k -
        previous_k| / 2)``. :data:`FINAL`: write the float32 posterior into ``final_out``
        (n0, n1, n2, K) unless it has size 1; :data:`FINAL_REVERSED`: (n2, n1, n0, K), at
        ``[m, j, i, k]``. :data:`FINAL_BY_COMPONENT`: into ``final_out`` (K, i1 - i0, n1, n2)
        at ``[k, i - i0, j, m]``.
    skip_settled : bool
        Keep the previous state of voxels none of whose neighbours changed in the previous
        sweep (their update would give the same values again, exactly). Only valid when that
        previous sweep was itself an MRF sweep.
    state_out, final_out, labels_out : uint8, float32, uint8 arrays (may be strided views)
        With the final modes, ``labels_out`` gets ``1 + argmax_k`` of the float32 posterior,
        indexed as ``final_out`` without its K axis; an output of size 1 is not written.
    counts : (K,) float64
        With the final modes: the float32 posterior summed over the computed voxels (added).

    Notes
    -----
    Per voxel it is :func:`segment._spatial.neighbour_sums` of ``previous`` and
    :func:`segment._em.e_step` with the log prior ``prior_scale * sums`` (or ``log pi_k``), in
    float64; components more than :data:`NEGLIGIBLE` nats under the best get weight 0.
    """
    previous = np.ascontiguousarray(previous, dtype=np.uint8)
    corrected = np.ascontiguousarray(corrected, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=bool)
    args = (
        previous, corrected, mask, np.ascontiguousarray(offsets, dtype=np.int64),
        np.ascontiguousarray(offset_weights, dtype=np.float64),
        np.ascontiguousarray(means, dtype=np.float64),
        np.ascontiguousarray(precisions_chol, dtype=np.float64),
        np.ascontiguousarray(log_norm, dtype=np.float64),
        np.ascontiguousarray(log_weights, dtype=np.float64), float(prior_scale),
        int(i0), int(i1), int(j0), int(j1), int(mode), bool(skip_settled),
        state_out, final_out, labels_out, counts,
    )  # fmt: skip
    if compiled is not None:
        compiled.mean_field_rows(*args)
    else:
        _numpy_mean_field_rows(*args)


def _numpy_mean_field_rows(previous, corrected, mask, offsets, offset_weights, means,
                           precisions_chol, log_norm, log_weights, prior_scale, i0, i1, j0, j1,
                           mode, skip_settled, state_out, final_out, labels_out,
                           counts):  # fmt: skip
    """:func:`mean_field_rows` in numpy: the twin of the C kernel, plane by plane.

    The same float64 operations in the same order as the C loop (the neighbour sums, the
    log posterior, its shift by each voxel's best), with ``np.exp`` for the exponential.
    """
    n0, n1, n2 = mask.shape
    n_components, n_features = means.shape
    skip_settled = skip_settled and mode == STATE and prior_scale > 0
    for i in range(i0, i1):
        inside = mask[i, j0:j1]  # (rows, n2)
        if not inside.any():
            continue
        rows = slice(j0, j1)
        sums = None
        if prior_scale > 0:
            sums = _plane_neighbour_sums(previous, i, rows, offsets, offset_weights)
        x = np.where(inside[..., None], corrected[i - i0], 0.0).astype(np.float64)
        weights = _plane_posterior(x, sums, means, precisions_chol, log_norm, log_weights,
                                   prior_scale).astype(np.float64)  # fmt: skip
        total = weights.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # voxels outside: not written
            q = weights / total
        previous_plane = previous[i, rows, :, :n_components].astype(int)
        if mode == STATE:
            levels = (q * 255.0 + 0.5).astype(int).transpose(1, 2, 0)  # (rows, n2, K)
            change = np.abs(levels - previous_plane).sum(axis=-1)
            change = np.minimum((change + 1) // 2, 255)
            if skip_settled:
                settled = sums[..., n_components] == 0
                levels[settled] = previous_plane[settled]
                change[settled] = 0
            state_plane = state_out[i, rows]
            state_plane[..., :n_components][inside] = levels[inside]
            state_plane[..., n_components][inside] = change[inside]
            continue
        values = q.astype(np.float32).transpose(1, 2, 0)[inside]  # (n_inside, K)
        counts += values.sum(axis=0, dtype=np.float64)
        labels = (values.argmax(axis=1) + 1).astype(np.uint8)
        where = np.nonzero(inside)  # (row index within rows, m)
        j, m = where[0] + j0, where[1]
        _scatter(final_out, mode, i, i0, j, m, values)
        _scatter(labels_out, mode, i, i0, j, m, labels)


def _scatter(out: np.ndarray, mode: int, i: int, i0: int, j, m, values: np.ndarray) -> None:
    """Write the values of voxels ``(i, j, m)`` (plane ``i``, rows ``j``, columns ``m``) into
    ``out`` as the final ``mode`` indexes it; an ``out`` of size 1 is not written.

    ``values`` is (n, K) for the posterior, (n,) for the labels (``out`` has no K axis).
    """
    if out.size <= 1:
        return
    if mode == FINAL:
        out[i, j, m] = values
    elif mode == FINAL_REVERSED:
        out[m, j, i] = values
    else:  # FINAL_BY_COMPONENT: the posterior's K axis first
        out[..., i - i0, j, m] = values.T


def _offset_groups(offsets, offset_weights):
    """The neighbours as rows of three taps, as the C loop groups them.

    Offsets ``(da, db, dc)`` with ``dc`` in {-1, 0, 1} and the same ``(da, db)``, one after
    the other, make one group (a new one starts where ``(da, db)`` changes or ``dc`` does not
    increase). Returns ``[(da, db, (w_left, w_centre, w_right) float32)]``, 0 for a missing tap.
    """
    groups, last = [], None
    for (da, db, dc), w in zip(offsets.tolist(), offset_weights):
        if dc not in (-1, 0, 1):
            raise ValueError("offsets: the last coordinate must be -1, 0 or 1")
        if not groups or groups[-1][:2] != (da, db) or dc <= last:
            groups.append((da, db, np.zeros(3, np.float32)))
        groups[-1][2][dc + 1] = w
        last = dc
    return groups


def _plane_neighbour_sums(previous, i, rows, offsets, offset_weights):
    """``sum_o w_o previous[(i, j, m) + o, :]`` for the rows ``j`` of plane ``i``, float32.

    (rows, n2, slots); neighbours outside the block count 0. The C loop's float32 operations
    in its order, one neighbour row at a time: ``(w_l v[m - 1] + w_c v[m]) + w_r v[m + 1]``
    with 0 for a missing voxel, so the sums are the same to the bit.
    """
    n0, n1, n2, n_slots = previous.shape
    j_lo, j_hi = rows.start, rows.stop
    sums = np.zeros((j_hi - j_lo, n2, n_slots), np.float32)
    for da, db, (left, centre, right) in _offset_groups(offsets, offset_weights):
        a = i + da
        b_lo, b_hi = max(j_lo + db, 0), min(j_hi + db, n1)  # neighbour rows inside
        if not 0 <= a < n0 or b_hi <= b_lo:
            continue
        values = np.zeros((b_hi - b_lo, n2 + 2, n_slots), np.float32)  # a zero either side
        values[:, 1:-1] = previous[a, b_lo:b_hi]
        part = (left * values[:, :-2] + centre * values[:, 1:-1]) + right * values[:, 2:]
        sums[b_lo - db - j_lo : b_hi - db - j_lo] += part
    return sums


def _plane_posterior(x, sums, means, precisions_chol, log_norm, log_weights, prior_scale):
    """Unnormalised posterior (K, rows, n2) float32: ``exp(l_k - max_k l_k)`` (0 under
    :data:`NEGLIGIBLE`) by :func:`_exp_sweep`.

    ``x`` (rows, n2, D) float64; ``l_k = log_norm_k - |(x - mu_k) U_k|^2 / 2`` plus the log
    prior ``prior_scale * sums[..., k]`` (or ``log pi_k`` when ``prior_scale == 0``).
    """
    n_components, n_features = means.shape
    log_post = np.empty((n_components,) + x.shape[:-1])
    for k in range(n_components):
        if n_features == 1:
            y = (x[..., 0] - means[k, 0]) * precisions_chol[k, 0, 0]
            row = log_norm[k] - 0.5 * (y * y)
        else:
            row = np.zeros(x.shape[:-1])
            for d in range(n_features):
                y = np.zeros(x.shape[:-1])
                for e in range(n_features):
                    y += (x[..., e] - means[k, e]) * precisions_chol[k, e, d]
                row += y * y
            row = log_norm[k] - 0.5 * row
        if prior_scale > 0:
            row += prior_scale * sums[..., k].astype(np.float64)
        else:
            row += log_weights[k]
        log_post[k] = row
    shifted = np.maximum(log_post - log_post.max(axis=0), NEGLIGIBLE).astype(np.float32)
    return _exp_sweep(shifted)


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = HI + LO, HI with few bits: n * HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_ROUND = np.float32(1.5 * 2**23)  # adding it rounds a float32 under 2^22 to an integer
_TAYLOR = [np.float32(1.0 / factorial) for factorial in (5040, 720, 120, 24, 6, 2, 1, 1)]


def _exp_sweep(shifted: np.ndarray) -> np.ndarray:
    """``exp(shifted)`` in float32 for ``NEGLIGIBLE <= shifted <= 0``, and 0 at :data:`NEGLIGIBLE`.

    The sweep's exponential (``exp_sweep`` in ``_estep.c``), the same float32 operations:
    ``exp(t) = 2^n e^g`` with ``n = round(t / ln 2)``, ``g = t - n ln 2`` (ln 2 in two parts,
    so ``n * HI`` is exact) and ``e^g`` by its Taylor polynomial of degree 7 (Horner);
    ``2^n`` is written into the exponent bits. Relative error: a few float32 steps.
    """
    t = np.asarray(shifted, dtype=np.float32)
    n = (t * _LOG2E + _ROUND) - _ROUND
    g = (t - n * _LN2_HI) - n * _LN2_LO
    poly = np.full_like(g, _TAYLOR[0])
    for coefficient in _TAYLOR[1:]:
        poly = coefficient + g * poly
    scale = ((n.astype(np.int32) + 127) << 23).view(np.float32)
    return np.where(t > np.float32(NEGLIGIBLE), poly * scale, np.float32(0.0))


# --------------------------------------------------------------------------------------------
# The bias field's interpolation
# --------------------------------------------------------------------------------------------
def interpolate_field(
    coarse: np.ndarray,
    lows: list[np.ndarray],
    weights: list[np.ndarray],
    reverse: bool = False,
) -> np.ndarray:
    """Separable linear interpolation of a coarse grid at the voxels of a block (compiled or numpy).

    Parameters
    ----------
    coarse : (c_0, ..., c_{n-1}, D) float64
        The values at the cell centres, ``n`` = 2 or 3 spatial axes, at least 2 cells each.
    lows : n arrays (m_a,) of int
        Per axis, the lower of the two cells each voxel lies between, in ``[0, c_a - 2]``.
    weights : n arrays (m_a, 2) float64
        Per axis, the weights of the lower and the upper cell.
    reverse : bool
        Return the block's axes in reverse order.

    Returns
    -------
    (m_0, ..., m_{n-1}, D) float32, or (m_{n-1}, ..., m_0, D) with ``reverse``
        The axes contracted in order (axis 0 first), in float64, then rounded to float32.
    """
    coarse = np.ascontiguousarray(coarse, dtype=np.float64)
    lows = [np.ascontiguousarray(low, dtype=np.int64) for low in lows]
    weights = [np.ascontiguousarray(w, dtype=np.float64) for w in weights]
    if compiled is None:
        return _numpy_interpolate_field(coarse, lows, weights, reverse)
    shape = tuple(len(low) for low in lows)
    if len(shape) == 2:  # a first axis of one voxel, on two equal cells: v * 1 + v * 0 = v
        coarse = np.stack([coarse, coarse])
        lows = [np.zeros(1, np.int64), *lows]
        weights = [np.array([[1.0, 0.0]]), *weights]
    full = tuple(len(low) for low in lows)
    out = np.empty((full[::-1] if reverse else full) + coarse.shape[-1:], np.float32)
    compiled.interpolate_field(coarse, lows[0], weights[0], lows[1], weights[1], lows[2],
                               weights[2], out, reverse)  # fmt: skip
    out_shape = (shape[::-1] if reverse else shape) + coarse.shape[-1:]
    return out.reshape(out_shape)


def _numpy_interpolate_field(coarse, lows, weights, reverse):
    """:func:`interpolate_field` in numpy: each axis contracted with a dense (m_a, c_a) matrix
    by ``np.tensordot``, the twin of the C kernel (which leaves out the zero terms)."""
    ndim = coarse.ndim - 1
    tensor = coarse
    for axis in range(ndim):  # contract the leading cell axis; the voxel axis goes last but one
        rows = np.arange(len(lows[axis]))
        matrix = np.zeros((len(rows), coarse.shape[axis]))
        matrix[rows, lows[axis]] = weights[axis][:, 0]
        matrix[rows, lows[axis] + 1] = weights[axis][:, 1]
        tensor = np.moveaxis(np.tensordot(tensor, matrix, axes=(0, 1)), -2, -1)
    if reverse:  # axes are now (*block, D)
        tensor = np.transpose(tensor, tuple(range(ndim))[::-1] + (ndim,))
    return np.ascontiguousarray(tensor, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Partial-volume fractions from a table
# --------------------------------------------------------------------------------------------
def table_fractions(
    x: np.ndarray,
    values: np.ndarray,
    slopes: np.ndarray,
    x0: float,
    step: float,
    posterior: np.ndarray | None,
    floor: float,
    n_classes: int,
) -> np.ndarray:
    """Partial-volume fractions of one channel from a tabulated model (compiled or numpy).

    Parameters
    ----------
    x : (N,) array
        The intensities.
    values, slopes : (2 K - 1 + K - 1, n) float64
        On a uniform grid of n points from ``x0`` by ``step``: the log-likelihoods of the
        2 K - 1 pure and mixed classes, then the K - 1 mixels' shares of their lower class;
        and their slopes per grid step (0 at the last point).
    x0, step : float
        The grid's first point and spacing (``step > 0``).
    posterior : (N, K) float32 or float64 array, or None
        The MRF posterior of the pure classes, the spatial prior: ``q_k + floor`` for pure
        class k, ``(q_k + q_k+1) / 2 + floor`` for a mixel (None: no prior).
    floor : float
    n_classes : int
        K.

    Returns
    -------
    (N, K) float32
        The posterior expectation of each class's fraction.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    values = np.ascontiguousarray(values, dtype=np.float64)
    slopes = np.ascontiguousarray(slopes, dtype=np.float64)
    if posterior is not None:
        posterior = np.asarray(posterior)
        if posterior.dtype not in (np.float32, np.float64):
            posterior = posterior.astype(np.float64)
        posterior = np.ascontiguousarray(posterior)
    if compiled is None:
        return _numpy_table_fractions(x, values, slopes, x0, step, posterior, floor, n_classes)
    out = np.empty((len(x), n_classes), np.float32)
    no_prior = np.zeros((0, n_classes), np.float32)
    compiled.table_fractions(x, values, slopes, float(x0), float(step),
                             no_prior if posterior is None else posterior, float(floor),
                             out)  # fmt: skip
    return out


def _numpy_table_fractions(x, values, slopes, x0, step, posterior, floor, n_classes):
    """:func:`table_fractions` in numpy, one row per class, (C, N), so that the sums and
    maxima over classes are elementwise; ``np.exp`` for the exponential."""
    K, n = n_classes, values.shape[1]
    n_mixed = 2 * K - 1
    position = (x - x0) / step
    np.clip(position, 0.0, n - 1.0, out=position)
    low = np.minimum(position.astype(np.intp), max(n - 2, 0))
    position -= low  # the weight of the upper grid point
    rows = np.take(slopes, low, axis=1)  # (C + K - 1, N)
    rows *= position
    rows += np.take(values, low, axis=1)
    post, share = rows[:n_mixed], rows[n_mixed:]
    post -= post.max(0)
    np.exp(post, out=post)
    if posterior is not None:
        q = np.asarray(posterior, np.float64).T  # (K, N)
        post[:K] *= q + floor
        mixed_prior = q[:-1] + q[1:]
        mixed_prior *= 0.5
        mixed_prior += floor
        post[K:] *= mixed_prior
    post /= post.sum(0)
    out, mixed = post[:K], post[K:]
    first = mixed * share  # the lower class's share of each mixel
    out[:-1] += first
    mixed -= first
    out[1:] += mixed
    return np.ascontiguousarray(out.T, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The mixed-voxel model's EM on a histogram
# --------------------------------------------------------------------------------------------
#: ``log(2 pi)``, as in :mod:`segment._em`.
LOG_2PI = float(np.log(2.0 * np.pi))


def pve_em_1d(
    x: np.ndarray,
    w: np.ndarray,
    f: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    weights: np.ndarray,
    floor: float,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """EM of the one-channel mixed-voxel model on weighted samples (compiled or numpy).

    Parameters
    ----------
    x, w : (N,) float64
        The samples (e.g. histogram bin centres) and their weights (counts).
    f : (n_steps,) float64
        The fractions of the lower class of a mixel.
    mu, var : (K,) float64
        The pure classes' means and variances to start from, ascending means.
    weights : (2 K - 1,) float64
        The K pure classes' weights, then those of the K - 1 mixels (each spread evenly over
        its ``n_steps`` fractions).
    floor : float
        The smallest variance.
    max_iter, tol
        Stop after ``max_iter`` iterations or when the mean log-likelihood per sample changes by
        less than ``tol``.

    Returns
    -------
    mu, var, weights : the fitted parameters (those of the last E-step)
    trace : list of float
        The mean log-likelihood per sample after each E-step.
    """
    x, w, f = (np.ascontiguousarray(a, dtype=np.float64) for a in (x, w, f))
    mu, var, weights = (np.array(a, dtype=np.float64) for a in (mu, var, weights))
    if compiled is None:
        return _numpy_pve_em_1d(x, w, f, mu, var, weights, float(floor), max_iter, tol)
    trace = np.empty(max(int(max_iter), 0))
    n_trace = compiled.pve_em_1d(x, w, f, mu, var, weights, float(floor), int(max_iter),
                                 float(tol), trace)  # fmt: skip
    return mu, var, weights, trace[:n_trace].tolist()


def _numpy_pve_em_1d(x, w, f, mu, var, weights, floor, max_iter, tol):
    """:func:`pve_em_1d` in numpy: one (N, C) array of all K + (K - 1) n_steps Gaussians."""
    K, n_steps = len(mu), len(f)
    total = w.sum()
    trace: list[float] = []
    for _ in range(max_iter):
        means = np.concatenate([mu, (f * mu[:-1, None] + (1 - f) * mu[1:, None]).ravel()])
        variances = np.concatenate([var, (f * var[:-1, None] + (1 - f) * var[1:, None]).ravel()])
        prior = np.concatenate([weights[:K], np.repeat(weights[K:] / n_steps, n_steps)])
        log_prior = np.log(prior, out=np.full(prior.shape, -np.inf), where=prior > 0)
        log_p = (x[:, None] - means) ** 2
        log_p /= variances
        log_p += LOG_2PI + np.log(variances)
        log_p *= -0.5
        log_p += log_prior
        top = log_p.max(1, keepdims=True)
        np.exp(log_p - top, out=log_p)
        norm = log_p.sum(1, keepdims=True)
        trace.append(float(w @ (np.log(norm[:, 0]) + top[:, 0]) / total))
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) < tol:
            break
        log_p *= w[:, None] / norm  # now the weighted posteriors
        r = log_p[:, :K]
        nk = r.sum(0) + 1e-10
        weights = np.concatenate(
            [r.sum(0), log_p[:, K:].reshape(len(x), K - 1, n_steps).sum((0, 2))]
        )
        weights /= total
        mu = (x @ r) / nk
        var = np.maximum(((x[:, None] - mu) ** 2 * r).sum(0) / nk, floor)
    return mu, var, weights, trace
