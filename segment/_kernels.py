"""The compiled per-voxel loop of the MRF's mean-field sweep (numba).

The sweep is the pass over every voxel that the MRF prior repeats. In numpy it costs some 40
passes over (K, n) temporaries (about 280 ns a voxel for K = 6 on our 2-core machine). The
compiled loop works an image row at a time: the row's neighbour sums, then each step of the
E-step as a loop over the row's voxels (component by component, so the compiler vectorises
it), then the outputs. That costs about 30 ns a voxel for the plain E-step and 45-60 ns for an
MRF sweep (K = 6, one thread; a voxel at a time it was 60-90 ns), holds no (K, block) array,
and releases the GIL, so threads run slabs side by side.

The kernel is the loop form of numpy functions that stay the reference (the tests compare
them): :func:`segment._spatial.neighbour_sums` and :func:`segment._em.e_step` with a log
prior. What a voxel gets does not depend on the block it falls in. Compiled code is cached
next to this file (``cache=True``), so only the first run of an installation compiles (a few
seconds).
"""

from __future__ import annotations

import numba
import numpy as np

#: What :func:`mean_field_rows` writes: the next uint8 state (a sweep), the float32 posterior
#: (*block, K), the same with the block's axes reversed, or the float32 posterior component by
#: component, (K, *computed planes).
STATE, FINAL, FINAL_REVERSED, FINAL_BY_COMPONENT = 0, 1, 3, 2


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _neighbour_sums_row(flat_previous, shape, n_slots, i, j, offsets, offset_weights,
                        sums):  # fmt: skip  # pragma: no cover
    """``sums[m * n_slots + s] = sum_o w_o previous[(i, j, m) + o, s]`` for the row's voxels m.

    Neighbours outermost: for each one, the row's values are one contiguous run, which the
    compiler vectorises. Neighbours outside the grid count 0.
    """
    n0, n1, n2 = shape
    sums[:] = 0.0
    for o in range(offset_weights.shape[0]):
        a = i + offsets[o, 0]
        b = j + offsets[o, 1]
        shift = offsets[o, 2]
        if a < 0 or a >= n0 or b < 0 or b >= n1:
            continue
        lo, hi = max(0, -shift), min(n2, n2 - shift)  # voxels whose neighbour is inside
        if hi <= lo:
            continue
        w = np.float32(offset_weights[o])
        source = ((a * n1 + b) * n2 + lo + shift) * n_slots
        # slices, so that the loop index is known non-negative and vectorises
        values = flat_previous[source : source + (hi - lo) * n_slots]
        target = sums[lo * n_slots : hi * n_slots]
        for t in range((hi - lo) * n_slots):
            target[t] += w * np.float32(values[t])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _row_posterior(x, sums, n_slots, means, precisions_chol, log_norm, log_weights,
                   prior_scale, log_post, peak, shifted, weights, scale_bits,
                   totals):  # fmt: skip  # pragma: no cover
    """The unnormalised posterior of one row of ``width`` voxels, component by component.

    ``x`` is (D, width) float64. Writes ``weights[k * width + m] = exp(log q_mk - max_k log
    q_mk)`` (0 under :data:`NEGLIGIBLE`) and ``totals[m] = sum_k weights``. Each step is a loop
    over the row, which the compiler vectorises; per voxel the arithmetic is that of
    :func:`segment._em.e_step` with the log prior ``prior_scale * sums`` (or ``log_weights``).
    """
    n_components, n_features = means.shape
    width = x.shape[1]
    peak[:width] = -np.inf
    for k in range(n_components):
        row = log_post[k]
        c = log_norm[k]
        if n_features == 1:
            mu, scale = means[k, 0], precisions_chol[k, 0, 0]
            for m in range(width):
                y = (x[0, m] - mu) * scale
                row[m] = c - 0.5 * (y * y)
        else:
            row[:width] = 0.0
            for d in range(n_features):
                for m in range(width):
                    y = 0.0
                    for e in range(n_features):
                        y += (x[e, m] - means[k, e]) * precisions_chol[k, e, d]
                    row[m] += y * y
            for m in range(width):
                row[m] = c - 0.5 * row[m]
        if prior_scale > 0:
            for m in range(width):
                row[m] += prior_scale * sums[m * n_slots + k]
        else:
            lw = log_weights[k]
            for m in range(width):
                row[m] += lw
        for m in range(width):
            peak[m] = max(peak[m], row[m])
    for k in range(n_components):
        row = log_post[k]
        for m in range(width):
            shifted[k * width + m] = max(row[m] - peak[m], NEGLIGIBLE)
    n = n_components * width
    _exp_row(shifted[:n], weights[:n], scale_bits[:n])
    totals[:width] = 0.0
    for k in range(n_components):
        for m in range(width):
            totals[m] += weights[k * width + m]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def mean_field_rows(
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
    i0,
    i1,
    j0,
    j1,
    mode,
    skip_settled,
    state_out,
    final_out,
    labels_out,
    counts,
):  # pragma: no cover - compiled; tested against the numpy reference
    """One mean-field sweep over the rows ``[i0:i1, j0:j1]`` of a 3-D block.

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
    labels_out : uint8, or size 1
        With the final modes: ``1 + argmax_k`` of the float32 posterior, indexed as
        ``final_out`` without its K axis.
    counts : (K,) float64
        With the final modes: the float32 posterior summed over the computed voxels (added).
    """
    n0, n1, n2 = mask.shape
    n_components, n_features = means.shape
    n_slots = previous.shape[3]
    flat_previous = previous.reshape(-1)
    width = n2
    keep_maps, keep_labels = final_out.size > 1, labels_out.size > 1
    sums = np.zeros(width * n_slots, np.float32)
    x = np.zeros((n_features, width))
    log_post = np.empty((n_components, width))
    peak = np.empty(width)
    shifted = np.empty(n_components * width, np.float32)
    weights = np.empty(n_components * width, np.float32)
    scale_bits = np.empty(n_components * width, np.int32)
    totals = np.empty(width)
    for i in range(i0, i1):
        for j in range(j0, j1):
            inside = mask[i, j]
            if not inside.any():
                continue
            if prior_scale > 0:
                _neighbour_sums_row(flat_previous, (n0, n1, n2), n_slots, i, j,
                                    offsets, offset_weights, sums)  # fmt: skip
            for d in range(n_features):
                for m in range(width):  # outside the mask: any finite value, not used
                    x[d, m] = corrected[i - i0, j - j0, m, d] if inside[m] else 0.0
            _row_posterior(x, sums, n_slots, means, precisions_chol, log_norm, log_weights,
                           prior_scale, log_post, peak, shifted, weights, scale_bits,
                           totals)  # fmt: skip
            for m in range(width):
                if not inside[m]:
                    continue
                total = totals[m]
                if mode == STATE:
                    if skip_settled and sums[m * n_slots + n_components] == 0:
                        for k in range(n_components):  # settled: keeps its state
                            state_out[i, j, m, k] = previous[i, j, m, k]
                        state_out[i, j, m, n_components] = 0
                        continue
                    change = 0
                    for k in range(n_components):
                        level = int(weights[k * width + m] / total * 255.0 + 0.5)
                        state_out[i, j, m, k] = level
                        change += abs(level - int(previous[i, j, m, k]))
                    state_out[i, j, m, n_components] = min((change + 1) // 2, 255)
                    continue
                best, best_value = 0, np.float32(-1.0)
                for k in range(n_components):
                    value = np.float32(weights[k * width + m] / total)
                    counts[k] += value
                    if value > best_value:
                        best, best_value = k, value
                    if keep_maps:
                        if mode == FINAL:
                            final_out[i, j, m, k] = value
                        elif mode == FINAL_REVERSED:
                            final_out[m, j, i, k] = value
                        else:
                            final_out[k, i - i0, j, m] = value
                if keep_labels:
                    if mode == FINAL:
                        labels_out[i, j, m] = best + 1
                    elif mode == FINAL_REVERSED:
                        labels_out[m, j, i] = best + 1
                    else:
                        labels_out[i - i0, j, m] = best + 1


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
