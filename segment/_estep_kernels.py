"""Compiled per-chunk loops of the EM passes over the voxels (numba).

Each EM iteration maps :func:`segment._em.chunk_statistics` over chunks of voxels. In numpy
it costs a dozen calls per block of voxels, each taking the GIL and streaming (K, block)
temporaries through memory, so two Dask threads did not run it side by side. Here it is one
loop over the chunk that releases the GIL (``nogil=True``) and keeps its work in a few small
buffers: :func:`statistics_1d` for one channel, :func:`statistics_nd` for several.

The kernels compute the same numbers as the numpy functions of :mod:`segment._em`, which stay
the reference (the tests compare them): float64 arithmetic and accumulators, the log-domain
E-step shifted by each voxel's largest term (log-sum-exp), so a voxel far from every component
stays finite. Compiled code is cached next to this file (``cache=True``): only the first run
of an installation compiles (a few seconds). Worker processes import the module and load the
cache. The first call in a process also sets numba itself up (registering its typing of
numpy: about 0.15 to 0.2 s of Python work on our 2-core machine, paid once per process, by
the first E-step of the first fit).

Notation as in :mod:`segment._em`: ``N`` voxels, ``K`` components.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

#: Voxels per inner block: the two (K, block) float64 buffers of :func:`statistics_1d` then
#: take 2 x 6 x 256 x 8 B = 24 kB, which stays in a core's L1 cache.
BLOCK = 256
#: Exponents are raised to this before the exponential: ``2^n`` stays a normal float64 and
#: ``exp(-708) = 3e-308``, which changes no sum that holds a ``exp(0) = 1`` term.
MIN_EXPONENT = -708.0

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 = HI + LO, HI with 21 trailing zero bits:
_LN2_LO = 1.90821492927058770002e-10  # n * HI is exact for |n| < 2^21
#: Adding 1.5 * 2^52 rounds a float of magnitude < 2^51 to an integer held in the low
#: mantissa bits: ``bits(x + ROUND) - bits(ROUND) = round(x)``.
_ROUND = 6755399441055744.0
_ROUND_BITS = int(np.array(_ROUND).view(np.int64))
_EXPONENT_BIAS = 1023


@intrinsic
def _float_bits(typingctx, value):  # pragma: no cover - inlined in compiled code
    """The bits of a float64 as an int64 (no conversion), like ``x.view(np.int64)``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, bits):  # pragma: no cover - inlined in compiled code
    """The float64 whose bits are the int64 ``bits``, like ``b.view(np.float64)``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def exp_nonpositive(t):  # pragma: no cover - compiled
    """``exp(max(t, MIN_EXPONENT))`` in float64, for ``t <= 0``; vectorises in loops.

    ``exp(t) = 2^n e^g`` with ``n = round(t / ln 2)`` and ``g = t - n ln 2`` (Cody-Waite: ln 2
    in two parts, so ``|g| <= ln(2) / 2`` is exact); ``e^g`` is its Taylor polynomial of degree
    13 (truncation under 5e-18 relative) by Estrin's scheme, and ``2^n`` is written into the
    exponent bits. Relative error: one or two float64 steps (tested under 1e-15 against
    ``np.exp``). Unlike calls to libm's ``exp``, a loop of these runs in vector lanes.
    """
    t = max(t, MIN_EXPONENT)
    r = t * _LOG2E + _ROUND
    n = r - _ROUND
    g = (t - n * _LN2_HI) - n * _LN2_LO
    # Estrin's scheme: a few short chains instead of one of 13 dependent steps
    g2 = g * g
    g4 = g2 * g2
    p01 = 1.0 + g
    p23 = 0.5 + g * (1.0 / 6.0)
    p45 = 1.0 / 24.0 + g * (1.0 / 120.0)
    p67 = 1.0 / 720.0 + g * (1.0 / 5040.0)
    p89 = 1.0 / 40320.0 + g * (1.0 / 362880.0)
    p1011 = 1.0 / 3628800.0 + g * (1.0 / 39916800.0)
    p1213 = 1.0 / 479001600.0 + g * (1.0 / 6227020800.0)
    low = (p01 + g2 * p23) + g4 * (p45 + g2 * p67)
    high = (p89 + g2 * p1011) + g4 * p1213
    scale = _bits_float((_float_bits(r) - _ROUND_BITS + _EXPONENT_BIAS) << 52)
    return (low + (g4 * g4) * high) * scale


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _weighted_row_sums(e, y, ratio, n_block, sums):  # pragma: no cover - compiled
    """``sums[j, k] += sum_i e_ki y_ki^j ratio_i`` for j = 0, 1, 2, rows of length ``n_block``.

    Reassociation lets the sums run in several vector lanes (a sequential float sum waits on
    each addition); the order is fixed by the code, so results do not vary from run to run.
    """
    for k in range(sums.shape[1]):
        row = k * n_block
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for i in range(n_block):
            r = e[row + i] * ratio[i]
            ry = r * y[row + i]
            s0 += r
            s1 += ry
            s2 += ry * y[row + i]
        sums[0, k] += s0
        sums[1, k] += s1
        sums[2, k] += s2


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _log_likelihood_unweighted(total, peak, n_block, group):  # pragma: no cover - compiled
    """``sum_i log(total_i) + peak_i``, with one ``log`` per ``group`` voxels.

    Every ``total_i`` is in ``[1, K]`` (a sum of K exponentials whose largest is 1), so a
    product of ``group <= 700 / log K`` of them cannot overflow, and the log of the product
    is the sum of the logs to within a few float64 steps.
    """
    value = 0.0
    for i in range(n_block):
        value += peak[i]
    for first in range(0, n_block, group):
        product = 1.0
        for i in range(first, min(first + group, n_block)):
            product *= total[i]
        value += np.log(product)
    return value


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _normalise_block(e, peak, ratio, nb, n_components, weight, start, group):  # pragma: no cover
    """The E-step's normalisation of one block; returns its log-likelihood.

    ``e`` holds ``log pi_k N(x_n | k)`` (K rows of ``nb``) and ``peak`` each voxel's largest.
    Writes ``e_nk = exp(e_nk - peak_n)`` and ``ratio_n = w_n / t_n`` with ``t_n = sum_k e_nk``,
    so that ``r_nk w_n = e_nk ratio_n``; ``weight`` of length 0 means 1 per voxel.
    """
    ratio[:nb] = 0.0
    for k in range(n_components):
        row = k * nb
        for i in range(nb):
            v = exp_nonpositive(e[row + i] - peak[i])
            e[row + i] = v
            ratio[i] += v  # t_n
    if weight.shape[0] > 0:
        log_likelihood = 0.0
        for i in range(nb):
            w = weight[start + i]
            log_likelihood += w * (np.log(ratio[i]) + peak[i])
            ratio[i] = w / ratio[i]
        return log_likelihood
    log_likelihood = _log_likelihood_unweighted(ratio, peak, nb, group)
    for i in range(nb):
        ratio[i] = 1.0 / ratio[i]
    return log_likelihood


@numba.njit(cache=True, nogil=True, error_model="numpy")
def statistics_1d(x, sample_weight, centers, inv_scale, offset, sums):  # pragma: no cover
    """One-channel E-step of a chunk reduced to weighted row sums, in one pass; no GIL.

    With ``y_kn = (x_n - c_k) * inv_scale_k`` and ``l_kn = offset_k - y_kn^2`` (the log of
    ``pi_k N(x_n | c_k, sigma_k^2)`` when ``inv_scale_k = 1 / (sqrt(2) sigma_k)``), each voxel
    gets ``m_n = max_k l_kn``, ``e_kn = exp(l_kn - m_n)``, ``t_n = sum_k e_kn`` (so
    ``r_nk = e_kn / t_n`` and ``log p(x_n) = log t_n + m_n``), and the kernel adds
    ``sum_n e_kn y_kn^j w_n / t_n`` into ``sums[j, k]`` for j = 0, 1, 2.

    Parameters
    ----------
    x : (N,) float32 or float64 array, contiguous
    sample_weight : (N,) float64 array, or (0,) for a weight of 1 per voxel
    centers, inv_scale, offset : (K,) float64 arrays
        ``c_k``, the scale of the residual and ``offset_k``.
    sums : (3, K) float64 array
        Accumulated into (not zeroed).

    Returns
    -------
    log_likelihood : float
        ``sum_n w_n log p(x_n)``.
    """
    n_voxels = x.shape[0]
    n_components = centers.shape[0]
    size = n_components * BLOCK
    y = np.empty(size)
    e = np.empty(size)
    peak = np.empty(BLOCK)
    ratio = np.empty(BLOCK)
    group = max(1, int(700.0 / np.log(max(n_components, 2))))
    log_likelihood = 0.0
    for start in range(0, n_voxels, BLOCK):
        nb = min(BLOCK, n_voxels - start)  # rows of length nb, packed
        peak[:nb] = -np.inf
        for k in range(n_components):
            c, s, a = centers[k], inv_scale[k], offset[k]
            row = k * nb
            for i in range(nb):
                v = (np.float64(x[start + i]) - c) * s
                y[row + i] = v
                v = a - v * v
                e[row + i] = v
                peak[i] = max(peak[i], v)
        log_likelihood += _normalise_block(
            e, peak, ratio, nb, n_components, sample_weight, start, group
        )
        _weighted_row_sums(e, y, ratio, nb, sums)
    return log_likelihood


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _weighted_moments(r, diff, n_block, k, sums0, sums1, sums2):  # pragma: no cover
    """Add ``sum_i r_i``, ``sum_i r_i diff_di`` and ``sum_i r_i diff_di diff_ei`` for ``k``."""
    n_features = diff.shape[0]
    s0 = 0.0
    for i in range(n_block):
        s0 += r[i]
    sums0[k] += s0
    for d in range(n_features):
        s1 = 0.0
        for i in range(n_block):
            s1 += r[i] * diff[d, i]
        sums1[k, d] += s1
        for e in range(d + 1):
            s2 = 0.0
            for i in range(n_block):
                s2 += r[i] * diff[d, i] * diff[e, i]
            sums2[k, d, e] += s2


@numba.njit(cache=True, nogil=True, error_model="numpy")
def statistics_nd(
    X, sample_weight, means, precisions_chol, offset, sums0, sums1, sums2
):  # pragma: no cover - compiled; tested against the numpy reference
    """E-step of a chunk of D-channel voxels reduced to centred moments, in one pass; no GIL.

    ``l_kn = offset_k - |(x_n - mu_k) U_k|^2 / 2`` (the log of ``pi_k N(x_n | mu_k, Sigma_k)``
    when ``offset_k = log pi_k + log det U_k - D/2 log(2 pi)``), then as
    :func:`statistics_1d`: ``m_n = max_k l_kn``, ``e_kn = exp(l_kn - m_n)``,
    ``t_n = sum_k e_kn``, ``r_nk = w_n e_kn / t_n``; the moments are centred on ``mu_k``.

    Parameters
    ----------
    X : (N, D) float32 or float64 array
    sample_weight : (N,) float64 array, or (0,) for a weight of 1 per voxel
    means : (K, D) float64 array
    precisions_chol : (K, D, D) float64 array, ``U_k`` with ``precision = U_k U_k^T``
    offset : (K,) float64 array
    sums0 : (K,) float64 array, ``sum_n r_nk`` accumulated into
    sums1 : (K, D) float64 array, ``sum_n r_nk (x_n - mu_k)`` accumulated into
    sums2 : (K, D, D) float64 array, ``sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T``; only the lower
        triangle ``e <= d`` is accumulated into

    Returns
    -------
    log_likelihood : float
    """
    n_voxels, n_features = X.shape
    n_components = means.shape[0]
    xt = np.empty((n_features, BLOCK))  # the block's voxels, channel-major
    diff = np.empty((n_features, BLOCK))
    e = np.empty(n_components * BLOCK)
    peak = np.empty(BLOCK)
    ratio = np.empty(BLOCK)
    r = np.empty(BLOCK)
    z = np.empty(BLOCK)
    group = max(1, int(700.0 / np.log(max(n_components, 2))))
    log_likelihood = 0.0
    for start in range(0, n_voxels, BLOCK):
        nb = min(BLOCK, n_voxels - start)
        for i in range(nb):
            for d in range(n_features):
                xt[d, i] = np.float64(X[start + i, d])
        peak[:nb] = -np.inf
        for k in range(n_components):
            row = k * nb
            e[row : row + nb] = 0.0
            for d in range(n_features):
                for i in range(nb):
                    diff[d, i] = xt[d, i] - means[k, d]
            for d in range(n_features):  # z_d = sum_c (x_c - mu_kc) U_k[c, d]
                z[:nb] = 0.0
                for c in range(n_features):
                    u = precisions_chol[k, c, d]
                    for i in range(nb):
                        z[i] += diff[c, i] * u
                for i in range(nb):
                    e[row + i] += z[i] * z[i]
            for i in range(nb):
                v = offset[k] - 0.5 * e[row + i]
                e[row + i] = v
                peak[i] = max(peak[i], v)
        log_likelihood += _normalise_block(
            e, peak, ratio, nb, n_components, sample_weight, start, group
        )
        for k in range(n_components):
            row = k * nb
            for i in range(nb):
                r[i] = e[row + i] * ratio[i]
            for d in range(n_features):
                for i in range(nb):
                    diff[d, i] = xt[d, i] - means[k, d]
            _weighted_moments(r, diff, nb, k, sums0, sums1, sums2)
    return log_likelihood
