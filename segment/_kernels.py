"""The compiled per-voxel loop of the MRF's mean-field sweep (numba).

The sweep is the pass over every voxel that the MRF prior repeats. In numpy it costs some 40
passes over (K, n) temporaries (about 280 ns a voxel for K = 6 on our 2-core machine); as one
loop per voxel it costs about a third of that, holds no (K, block) array, and releases the GIL,
so threads run slabs side by side.

The kernel is the loop form of numpy functions that stay the reference (the tests compare
them): :func:`segment._spatial.neighbour_sums` and :func:`segment._em.e_step` with a log
prior. What a voxel gets does not depend on the block it falls in. Compiled code is cached
next to this file (``cache=True``), so only the first run of an installation compiles (a few
seconds).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _log_posterior(x, means, precisions_chol, log_norm, log_prior, out):  # pragma: no cover
    """``out_k = log_prior_k + log N(x | mu_k, Sigma_k)``; returns ``max_k out_k``."""
    n_components, n_features = means.shape
    peak = -np.inf
    for k in range(n_components):
        quad = 0.0
        for d in range(n_features):
            y = 0.0
            for e in range(n_features):
                y += (x[e] - means[k, e]) * precisions_chol[k, e, d]
            quad += y * y
        value = log_norm[k] - 0.5 * quad + log_prior[k]
        out[k] = value
        if value > peak:
            peak = value
    return peak


@numba.njit(cache=True, nogil=True, error_model="numpy")
def mean_field_block(
    previous,
    corrected,
    mask,
    offsets,
    offset_weights,
    means,
    precisions_chol,
    log_norm,
    log_weights,
    prior_scale,
    first_row,
    stop_row,
    state_out,
    final_out,
    final,
    skip_settled,
):  # pragma: no cover - compiled; tested against the numpy reference
    """One mean-field sweep over planes ``first_row:stop_row`` of a 3-D block.

    Parameters
    ----------
    previous : (n0, n1, n2, >= K) uint8
        The previous posterior in units of 1/255 in the first K slots (zeros outside the mask).
    corrected : (n0, n1, n2, D) float32, the bias-corrected intensities ``y / b``
    mask : (n0, n1, n2) bool
    offsets : (M, 3) int64 and offset_weights : (M,) float64
        The neighbours and their weights ``w_ij``.
    means, precisions_chol : (K, D), (K, D, D) float64
    log_norm : (K,) float64, ``log det(P_k) - D/2 log(2 pi)``
    log_weights : (K,) float64
        ``log pi_k``, used when ``prior_scale == 0`` (the plain E-step).
    prior_scale : float
        ``beta / 255``: the log prior is ``prior_scale * sum_j w_ij previous_jk``.
    first_row, stop_row : int
        Planes to compute (the others, halo planes, are left as they are).
    state_out : (n0, n1, n2, K + 1) uint8
        Unless ``final``: the rounded posterior (units of 1/255) and, in the last slot, the
        change ``round(sum_k |state_k - previous_k| / 2)``.
    final_out : (n0, n1, n2, K) float32
        When ``final``: the posterior.
    final : bool
    skip_settled : bool
        Keep the previous state of voxels none of whose neighbours changed in the previous
        sweep (their update would give the same values again, exactly). Only valid when that
        previous sweep was itself an MRF sweep.
    """
    n0, n1, n2 = mask.shape
    n_components, n_features = means.shape
    n_slots = previous.shape[3]
    flat_previous = previous.reshape(-1)
    # Neighbour sums a row at a time, neighbours outermost: for each neighbour the row's
    # (n2, slots) values are one contiguous run, which the compiler vectorises.
    sums = np.zeros(n2 * n_slots, np.float32)
    shifted = np.empty(n2 * n_components, np.float32)
    weights_row = np.empty(n2 * n_components, np.float32)
    scale_bits = np.empty(n2 * n_components, np.int32)
    active = np.zeros(n2, np.bool_)
    log_prior = np.empty(n_components)
    log_post = np.empty(n_components)
    x = np.empty(n_features)
    for i in range(first_row, stop_row):
        for j in range(n1):
            if not mask[i, j].any():
                continue
            if prior_scale > 0:
                sums[:] = 0.0
                for o in range(offset_weights.shape[0]):
                    a = i + offsets[o, 0]
                    b = j + offsets[o, 1]
                    shift = offsets[o, 2]
                    if a < 0 or a >= n0 or b < 0 or b >= n1:
                        continue
                    w = np.float32(offset_weights[o])
                    start = max(0, -shift) * n_slots
                    stop = (n2 - max(0, shift)) * n_slots
                    source = ((a * n1 + b) * n2 + shift) * n_slots
                    # slices, so that the loop index is known non-negative and vectorises
                    values = flat_previous[source + start : source + stop]
                    target = sums[start:stop]
                    for t in range(stop - start):
                        target[t] += w * np.float32(values[t])
            # 1. the log posterior of each voxel of the row, minus its best, into a row buffer
            for m in range(n2):
                active[m] = mask[i, j, m]
                if active[m] and skip_settled and sums[m * n_slots + n_components] == 0:
                    active[m] = False  # settled: keeps its state
                    for k in range(n_components):
                        state_out[i, j, m, k] = previous[i, j, m, k]
                    state_out[i, j, m, n_components] = 0
                if not active[m]:
                    for k in range(n_components):
                        shifted[m * n_components + k] = NEGLIGIBLE
                    continue
                for k in range(n_components):
                    if prior_scale > 0:
                        log_prior[k] = prior_scale * sums[m * n_slots + k]
                    else:
                        log_prior[k] = log_weights[k]
                for d in range(n_features):
                    x[d] = corrected[i, j, m, d]
                peak = _log_posterior(x, means, precisions_chol, log_norm, log_prior, log_post)
                for k in range(n_components):
                    shifted[m * n_components + k] = max(log_post[k] - peak, NEGLIGIBLE)
            # 2. their exponentials, in one vectorised loop over the row
            _exp_row(shifted, weights_row, scale_bits)
            # 3. normalised, and written as probabilities or as the rounded state
            for m in range(n2):
                if not active[m]:
                    continue
                total = 0.0
                for k in range(n_components):
                    total += weights_row[m * n_components + k]
                if final:
                    for k in range(n_components):
                        final_out[i, j, m, k] = weights_row[m * n_components + k] / total
                else:
                    change = 0
                    for k in range(n_components):
                        level = int(weights_row[m * n_components + k] / total * 255.0 + 0.5)
                        state_out[i, j, m, k] = level
                        change += abs(level - int(previous[i, j, m, k]))
                    state_out[i, j, m, n_components] = min((change + 1) // 2, 255)


#: Components more than this many nats under a voxel's best are given weight 0, not
#: ``exp(-17) = 4e-8`` of it: under the resolution of the float32 probabilities (whose largest
#: is at least 1/K) and far under the 1/255 steps of the state, and it spares many of the
#: ``exp`` calls (the costliest step).
NEGLIGIBLE = -17.0


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = HI + LO, HI with few bits: n * HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _exp_row(shifted, out, scale_bits):  # pragma: no cover
    """``out = exp(shifted)`` for ``NEGLIGIBLE <= shifted <= 0``, and 0 at ``NEGLIGIBLE``.

    ``exp(t) = 2^n e^g`` with ``n = round(t / ln 2)``, ``g = t - n ln 2`` (Cody-Waite: ln 2 in
    two parts, so ``|g| <= ln(2) / 2`` is exact to float32) and e^g by its Taylor series to
    degree 7 (error under 1e-8); 2^n is written into the exponent bits. Relative error: a few
    float32 steps (tested under 5e-7). Unlike a call to libm's ``exp`` (about 10 ns each here),
    these loops vectorise.
    """
    for t in range(shifted.shape[0]):
        n = np.floor(shifted[t] * _LOG2E + np.float32(0.5))
        g = (shifted[t] - n * _LN2_HI) - n * _LN2_LO
        p = np.float32(1.0) + g * (np.float32(1.0) + g * (np.float32(1 / 2) + g * (
            np.float32(1 / 6) + g * (np.float32(1 / 24) + g * (np.float32(1 / 120) + g * (
                np.float32(1 / 720) + g * np.float32(1 / 5040)))))))  # fmt: skip
        out[t] = p
        scale_bits[t] = (np.int32(n) + 127) << 23
    scale = scale_bits.view(np.float32)
    for t in range(shifted.shape[0]):
        out[t] = out[t] * scale[t] if shifted[t] > NEGLIGIBLE else np.float32(0.0)
