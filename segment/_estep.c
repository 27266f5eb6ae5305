/*
 * Compiled per-chunk loops of the EM passes over the voxels: ``segment._estep``.
 *
 * Each EM iteration maps ``segment._em.chunk_statistics`` over chunks of voxels. In numpy it
 * costs a dozen calls per block of voxels, each taking the GIL and streaming (K, block)
 * temporaries through memory, so two Dask threads did not run it side by side. Here it is
 * one loop over the chunk that releases the GIL and keeps its work in a few small buffers:
 * ``statistics_1d`` for one channel, ``statistics_nd`` for several.
 *
 * The kernels compute the same numbers as the numpy functions of ``segment._em``, which stay
 * the reference (the tests compare them): float64 arithmetic and accumulators, the log-domain
 * E-step shifted by each voxel's largest term (log-sum-exp), so a voxel far from every
 * component stays finite.
 *
 * The MRF's mean-field sweep (``mean_field_rows``, below) is here too: one compiled stack.
 * (It was numba: loading numba and its first cached kernel in a process cost about 0.5 s of
 * Python work under the GIL, and numba with llvmlite is some 210 MB installed.) This module
 * loads in under a millisecond, and is optional: without it (no C compiler at install time)
 * ``segment._kernels`` runs the numpy twins. On x86-64 Linux (glibc), gcc >= 11 builds the
 * loops for AVX-512, AVX2 and baseline x86-64 and picks one when the module loads
 * (``target_clones``).
 *
 * The bias field's interpolation at the voxels of a block (``interpolate_field``) is here as well:
 * np.tensordot with dense interpolation matrices spent most of its time on zero terms.
 *
 * Notation as in ``segment._em``: N voxels, K components, D channels. The arguments are
 * C-contiguous buffers (numpy arrays), checked by ``buffers`` below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Voxels per inner block: two (K, block) float64 buffers then take 2 x 6 x 256 x 8 B = 24 kB,
 * which stays in a core's L1 cache. */
#define BLOCK 256
/* Exponents are raised to this before the exponential: 2^n stays a normal float64 and
 * exp(-708) = 3e-308, which changes no sum that holds an exp(0) = 1 term. */
#define MIN_EXPONENT (-708.0)

#define LOG2E 1.4426950408889634
#define LOG_2PI 1.8378770664093453 /* log(2 pi) */
#define LN2_HI 6.93147180369123816490e-01 /* ln 2 = HI + LO, HI with 21 trailing zero bits: */
#define LN2_LO 1.90821492927058770002e-10 /* n * HI is exact for |n| < 2^21 */
/* Adding 1.5 * 2^52 rounds a float of magnitude < 2^51 to an integer held in the low mantissa
 * bits: bits(x + ROUND) - bits(ROUND) = round(x). */
#define ROUND 6755399441055744.0

/* target_clones needs the dynamic loader's ifunc support, which glibc has (musl has not), and
 * the arch=x86-64-v3/v4 levels need GCC 11; other compilers build one generic version */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__GLIBC__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#define SIMD_REDUCTION(...) _Pragma(#__VA_ARGS__)
#else
#define INLINE static inline
#define SIMD_REDUCTION(...)
#endif

static int64_t bits_of(double value)
{
    int64_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* exp(max(t, MIN_EXPONENT)) in float64, for t <= 0; vectorises in loops.
 *
 * exp(t) = 2^n e^g with n = round(t / ln 2) and g = t - n ln 2 (Cody-Waite: ln 2 in two parts,
 * so |g| <= ln(2) / 2 is exact); e^g is its Taylor polynomial of degree 13 (truncation under
 * 5e-18 relative) by Estrin's scheme, and 2^n is written into the exponent bits. Relative
 * error: one or two float64 steps (tested under 1e-15 against np.exp). Unlike calls to libm's
 * exp, a loop of these runs in vector lanes. */
INLINE double exp_nonpositive(double t, int64_t round_bits)
{
    t = t < MIN_EXPONENT ? MIN_EXPONENT : t; /* a NaN stays NaN */
    double r = t * LOG2E + ROUND;
    double n = r - ROUND;
    double g = (t - n * LN2_HI) - n * LN2_LO;
    /* Estrin's scheme: a few short chains instead of one of 13 dependent steps */
    double g2 = g * g, g4 = g2 * g2;
    double p01 = 1.0 + g;
    double p23 = 0.5 + g * (1.0 / 6.0);
    double p45 = 1.0 / 24.0 + g * (1.0 / 120.0);
    double p67 = 1.0 / 720.0 + g * (1.0 / 5040.0);
    double p89 = 1.0 / 40320.0 + g * (1.0 / 362880.0);
    double p1011 = 1.0 / 3628800.0 + g * (1.0 / 39916800.0);
    double p1213 = 1.0 / 479001600.0 + g * (1.0 / 6227020800.0);
    double low = (p01 + g2 * p23) + g4 * (p45 + g2 * p67);
    double high = (p89 + g2 * p1011) + g4 * p1213;
    int64_t r_bits, scale_bits;
    double scale;
    memcpy(&r_bits, &r, sizeof r_bits);
    scale_bits = (r_bits - round_bits + 1023) << 52;
    memcpy(&scale, &scale_bits, sizeof scale);
    return (low + (g4 * g4) * high) * scale;
}

/* The E-step's normalisation of one block; returns its log-likelihood.
 *
 * e holds log pi_k N(x_n | k) (K rows of nb) and peak each voxel's largest. Writes
 * e_nk = exp(e_nk - peak_n) and ratio_n = w_n / t_n with t_n = sum_k e_nk, so that
 * r_nk w_n = e_nk ratio_n; weight NULL means 1 per voxel. Without weights the logs are taken
 * of products of group totals: every t_n is in [1, K] (a sum of K exponentials whose largest
 * is 1), so a product of group <= 700 / log K of them cannot overflow, and the log of the
 * product is the sum of the logs to within a few float64 steps. */
INLINE double normalise_block(double *e, const double *peak, double *ratio, Py_ssize_t nb,
                              Py_ssize_t n_components, const double *weight, Py_ssize_t group)
{
    const int64_t round_bits = bits_of(ROUND);
    double log_likelihood = 0.0;
    for (Py_ssize_t i = 0; i < nb; i++) ratio[i] = 0.0;
    for (Py_ssize_t k = 0; k < n_components; k++) {
        double *row = e + k * nb;
        for (Py_ssize_t i = 0; i < nb; i++) {
            double v = exp_nonpositive(row[i] - peak[i], round_bits);
            row[i] = v;
            ratio[i] += v; /* t_n */
        }
    }
    if (weight != NULL) {
        for (Py_ssize_t i = 0; i < nb; i++) {
            log_likelihood += weight[i] * (log(ratio[i]) + peak[i]);
            ratio[i] = weight[i] / ratio[i];
        }
        return log_likelihood;
    }
    SIMD_REDUCTION(omp simd reduction(+ : log_likelihood))
    for (Py_ssize_t i = 0; i < nb; i++) log_likelihood += peak[i];
    for (Py_ssize_t first = 0; first < nb; first += group) {
        Py_ssize_t last = first + group < nb ? first + group : nb;
        double product = 1.0;
        SIMD_REDUCTION(omp simd reduction(* : product))
        for (Py_ssize_t i = first; i < last; i++) product *= ratio[i];
        log_likelihood += log(product);
    }
    for (Py_ssize_t i = 0; i < nb; i++) ratio[i] = 1.0 / ratio[i];
    return log_likelihood;
}

static Py_ssize_t product_group(Py_ssize_t n_components)
{
    Py_ssize_t group = (Py_ssize_t)(700.0 / log(n_components > 2 ? (double)n_components : 2.0));
    return group > 1 ? group : 1;
}

/* One-channel E-step of a chunk reduced to weighted row sums, in one pass.
 *
 * With y_kn = (x_n - c_k) * inv_scale_k and l_kn = offset_k - y_kn^2 (the log of
 * pi_k N(x_n | c_k, sigma_k^2) when inv_scale_k = 1 / (sqrt(2) sigma_k)), each voxel gets
 * m_n = max_k l_kn, e_kn = exp(l_kn - m_n), t_n = sum_k e_kn (so r_nk = e_kn / t_n and
 * log p(x_n) = log t_n + m_n), and the kernel adds sum_n e_kn y_kn^j w_n / t_n into
 * sums[j * K + k] for j = 0, 1, 2. work holds 2 K BLOCK + 2 BLOCK doubles. Returns
 * sum_n w_n log p(x_n). */
#define DEFINE_STATISTICS_1D(NAME, TYPE)                                                       \
    MULTIVERSION static double NAME(const TYPE *x, Py_ssize_t n_voxels, const double *weight,  \
                                    Py_ssize_t n_components, const double *centers,            \
                                    const double *inv_scale, const double *offset,             \
                                    double *sums, double *work)                                \
    {                                                                                          \
        double *y = work, *e = y + n_components * BLOCK, *peak = e + n_components * BLOCK;    \
        double *ratio = peak + BLOCK;                                                          \
        const Py_ssize_t group = product_group(n_components);                                  \
        double log_likelihood = 0.0;                                                           \
        for (Py_ssize_t start = 0; start < n_voxels; start += BLOCK) {                         \
            const Py_ssize_t nb = n_voxels - start < BLOCK ? n_voxels - start : BLOCK;         \
            const TYPE *xb = x + start;                                                        \
            for (Py_ssize_t i = 0; i < nb; i++) peak[i] = -INFINITY;                           \
            for (Py_ssize_t k = 0; k < n_components; k++) { /* rows of length nb, packed */   \
                const double c = centers[k], s = inv_scale[k], a = offset[k];                  \
                double *yk = y + k * nb, *ek = e + k * nb;                                     \
                for (Py_ssize_t i = 0; i < nb; i++) {                                          \
                    double v = ((double)xb[i] - c) * s;                                        \
                    yk[i] = v;                                                                 \
                    v = a - v * v;                                                             \
                    ek[i] = v;                                                                 \
                    peak[i] = peak[i] > v ? peak[i] : v;                                       \
                }                                                                              \
            }                                                                                  \
            log_likelihood += normalise_block(e, peak, ratio, nb, n_components,                \
                                              weight ? weight + start : NULL, group);          \
            for (Py_ssize_t k = 0; k < n_components; k++) {                                    \
                const double *yk = y + k * nb, *ek = e + k * nb;                               \
                double s0 = 0.0, s1 = 0.0, s2 = 0.0;                                           \
                /* several vector lanes: the order is fixed by the code, not by the run */     \
                SIMD_REDUCTION(omp simd reduction(+ : s0, s1, s2))                             \
                for (Py_ssize_t i = 0; i < nb; i++) {                                          \
                    double r = ek[i] * ratio[i];                                               \
                    double ry = r * yk[i];                                                     \
                    s0 += r;                                                                   \
                    s1 += ry;                                                                  \
                    s2 += ry * yk[i];                                                          \
                }                                                                              \
                sums[k] += s0;                                                                 \
                sums[n_components + k] += s1;                                                  \
                sums[2 * n_components + k] += s2;                                              \
            }                                                                                  \
        }                                                                                      \
        return log_likelihood;                                                                 \
    }

DEFINE_STATISTICS_1D(statistics_1d_float, float)
DEFINE_STATISTICS_1D(statistics_1d_double, double)

/* E-step of a chunk of D-channel voxels reduced to centred moments, in one pass.
 *
 * l_kn = offset_k - |(x_n - mu_k) U_k|^2 / 2 (the log of pi_k N(x_n | mu_k, Sigma_k) when
 * offset_k = log pi_k + log det U_k - D/2 log(2 pi)), then as statistics_1d: m_n = max_k l_kn,
 * e_kn = exp(l_kn - m_n), t_n = sum_k e_kn, r_nk = w_n e_kn / t_n. Adds sum_n r_nk to
 * sums0[k], sum_n r_nk (x_n - mu_k) to sums1[k, :] and the lower triangle (e <= d) of
 * sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T to sums2[k, :, :]. precisions_chol holds U_k, with
 * precision = U_k U_k^T. work holds (2 D + K + 4) BLOCK doubles. */
#define DEFINE_STATISTICS_ND(NAME, TYPE)                                                       \
    MULTIVERSION static double NAME(                                                           \
        const TYPE *X, Py_ssize_t n_voxels, Py_ssize_t n_features, const double *weight,       \
        Py_ssize_t n_components, const double *means, const double *precisions_chol,           \
        const double *offset, double *sums0, double *sums1, double *sums2, double *work)       \
    {                                                                                          \
        const Py_ssize_t D = n_features;                                                       \
        double *xt = work, *diff = xt + D * BLOCK, *e = diff + D * BLOCK; /* channel-major */ \
        double *peak = e + n_components * BLOCK, *ratio = peak + BLOCK, *r = ratio + BLOCK;    \
        double *z = r + BLOCK;                                                                 \
        const Py_ssize_t group = product_group(n_components);                                  \
        double log_likelihood = 0.0;                                                           \
        for (Py_ssize_t start = 0; start < n_voxels; start += BLOCK) {                         \
            const Py_ssize_t nb = n_voxels - start < BLOCK ? n_voxels - start : BLOCK;         \
            for (Py_ssize_t i = 0; i < nb; i++)                                                \
                for (Py_ssize_t d = 0; d < D; d++) xt[d * BLOCK + i] = (double)X[(start + i) * D + d]; \
            for (Py_ssize_t i = 0; i < nb; i++) peak[i] = -INFINITY;                           \
            for (Py_ssize_t k = 0; k < n_components; k++) {                                    \
                const double *mu = means + k * D, *u = precisions_chol + k * D * D;            \
                double *ek = e + k * nb;                                                       \
                for (Py_ssize_t i = 0; i < nb; i++) ek[i] = 0.0;                               \
                for (Py_ssize_t d = 0; d < D; d++)                                             \
                    for (Py_ssize_t i = 0; i < nb; i++)                                        \
                        diff[d * BLOCK + i] = xt[d * BLOCK + i] - mu[d];                       \
                for (Py_ssize_t d = 0; d < D; d++) { /* z_d = sum_c (x_c - mu_kc) U_k[c, d] */ \
                    for (Py_ssize_t i = 0; i < nb; i++) z[i] = 0.0;                            \
                    for (Py_ssize_t c = 0; c < D; c++) {                                       \
                        const double ucd = u[c * D + d];                                       \
                        for (Py_ssize_t i = 0; i < nb; i++) z[i] += diff[c * BLOCK + i] * ucd; \
                    }                                                                          \
                    for (Py_ssize_t i = 0; i < nb; i++) ek[i] += z[i] * z[i];                  \
                }                                                                              \
                for (Py_ssize_t i = 0; i < nb; i++) {                                          \
                    double v = offset[k] - 0.5 * ek[i];                                        \
                    ek[i] = v;                                                                 \
                    peak[i] = peak[i] > v ? peak[i] : v;                                       \
                }                                                                              \
            }                                                                                  \
            log_likelihood += normalise_block(e, peak, ratio, nb, n_components,                \
                                              weight ? weight + start : NULL, group);          \
            for (Py_ssize_t k = 0; k < n_components; k++) {                                    \
                const double *mu = means + k * D, *ek = e + k * nb;                            \
                double s0 = 0.0;                                                               \
                SIMD_REDUCTION(omp simd reduction(+ : s0))                                     \
                for (Py_ssize_t i = 0; i < nb; i++) {                                          \
                    r[i] = ek[i] * ratio[i];                                                   \
                    s0 += r[i];                                                                \
                }                                                                              \
                sums0[k] += s0;                                                                \
                for (Py_ssize_t d = 0; d < D; d++)                                             \
                    for (Py_ssize_t i = 0; i < nb; i++)                                        \
                        diff[d * BLOCK + i] = xt[d * BLOCK + i] - mu[d];                       \
                for (Py_ssize_t d = 0; d < D; d++) {                                           \
                    const double *dd = diff + d * BLOCK;                                       \
                    double s1 = 0.0;                                                           \
                    SIMD_REDUCTION(omp simd reduction(+ : s1))                                 \
                    for (Py_ssize_t i = 0; i < nb; i++) s1 += r[i] * dd[i];                    \
                    sums1[k * D + d] += s1;                                                    \
                    for (Py_ssize_t c = 0; c <= d; c++) {                                      \
                        const double *dc = diff + c * BLOCK;                                   \
                        double s2 = 0.0;                                                       \
                        SIMD_REDUCTION(omp simd reduction(+ : s2))                             \
                        for (Py_ssize_t i = 0; i < nb; i++) s2 += r[i] * dd[i] * dc[i];        \
                        sums2[(k * D + d) * D + c] += s2;                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return log_likelihood;                                                                 \
    }

DEFINE_STATISTICS_ND(statistics_nd_float, float)
DEFINE_STATISTICS_ND(statistics_nd_double, double)

/* Extremes, sum and centred sum of squares of one channel, in two passes (no temporaries).
 * Writes out = {min, max, mean, m2}; the sums are float64 whatever the voxels' type. A NaN or
 * an infinity makes the sum non-finite, and then min and max are NaN, so the caller sees that
 * the chunk is not all finite. */
#define DEFINE_MOMENTS_1D(NAME, TYPE)                                                          \
    MULTIVERSION static void NAME(const TYPE *x, Py_ssize_t n, double *out)                   \
    {                                                                                          \
        double low = INFINITY, high = -INFINITY, sum = 0.0, m2 = 0.0;                          \
        SIMD_REDUCTION(omp simd reduction(min : low) reduction(max : high) reduction(+ : sum)) \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            const double v = (double)x[i];                                                     \
            low = v < low ? v : low;                                                           \
            high = v > high ? v : high;                                                        \
            sum += v;                                                                          \
        }                                                                                      \
        if (!isfinite(sum)) low = high = NAN;                                                  \
        const double mean = n > 0 ? sum / (double)n : 0.0;                                     \
        SIMD_REDUCTION(omp simd reduction(+ : m2))                                             \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            const double d = (double)x[i] - mean;                                              \
            m2 += d * d;                                                                       \
        }                                                                                      \
        out[0] = low;                                                                          \
        out[1] = high;                                                                         \
        out[2] = mean;                                                                         \
        out[3] = m2;                                                                           \
    }

DEFINE_MOMENTS_1D(moments_1d_float, float)
DEFINE_MOMENTS_1D(moments_1d_double, double)

/* Counts of one channel's values in n_bins equal bins over [low, high] (the last bin closed),
 * added into counts; values outside the range or not finite are not counted. */
#define DEFINE_HISTOGRAM_1D(NAME, TYPE)                                                        \
    static void NAME(const TYPE *x, Py_ssize_t n, double low, double high, Py_ssize_t n_bins,  \
                     double *counts)                                                           \
    {                                                                                          \
        const double scale = high > low ? (double)n_bins / (high - low) : 0.0;                 \
        for (Py_ssize_t i = 0; i < n; i++) {                                                   \
            const double v = (double)x[i];                                                     \
            if (!(v >= low && v <= high)) continue;                                            \
            Py_ssize_t bin = (Py_ssize_t)((v - low) * scale);                                  \
            counts[bin < n_bins ? bin : n_bins - 1] += 1.0;                                    \
        }                                                                                      \
    }

DEFINE_HISTOGRAM_1D(histogram_1d_float, float)
DEFINE_HISTOGRAM_1D(histogram_1d_double, double)

/* ------------------------------------------------------------------ the MRF's mean-field sweep
 *
 * One mean-field sweep over rows of a 3-D block (``mean_field_rows`` below; its numpy twin is
 * ``segment._kernels._numpy_mean_field_rows``). The loop works an image row (the last axis) at
 * a time: the row's neighbour sums, then each step of the E-step with the MRF log prior as a
 * loop over the row's voxels, component by component (so the compiler vectorises it), then the
 * outputs. The log posterior in float64, the neighbour sums and the exponentials in float32
 * (8 vector lanes); a component more than SWEEP_NEGLIGIBLE nats under a voxel's best gets
 * weight 0 (under the float32 and 1/255 resolution of the outputs). The numpy twin does the
 * same operations in the same order, so the two agree to the bit but for the order of some
 * float64 sums. */
#define SWEEP_NEGLIGIBLE (-17.0)
enum sweep_mode { STATE = 0, FINAL = 1, FINAL_BY_COMPONENT = 2, FINAL_REVERSED = 3 };

/* A strided output array: base pointer, shape and strides in bytes (4 axes at most). */
struct strided {
    char *buf;
    Py_ssize_t size, shape[4], strides[4];
};

struct sweep {
    const uint8_t *previous; /* (n0, n1, n2, n_slots), C order */
    const float *corrected;  /* (i1 - i0, j1 - j0, n2, D), C order */
    const uint8_t *mask;     /* (n0, n1, n2), C order, 0 or 1 */
    const int64_t *groups;   /* (G, 2): the neighbour rows (da, db) ... */
    const float *taps;       /* (G, 3): ... and the weights of their voxels m - 1, m, m + 1 */
    const double *means, *precisions_chol, *log_norm, *log_weights;
    Py_ssize_t n0, n1, n2, n_slots, n_groups, K, D;
    double prior_scale;
    Py_ssize_t i0, i1, j0, j1;
    int mode, skip_settled;
    struct strided state, final, labels;
    double *counts;
};

/* The neighbours as rows of three taps: offsets (da, db, dc) with dc in {-1, 0, 1} and the same
 * (da, db) one after the other make one group (a new one starts where (da, db) changes or dc
 * does not increase). Writes groups (G, 2) and taps (G, 3) (0 for a missing tap) and returns
 * G, or -1 if some dc is not -1, 0 or 1. segment._kernels._offset_groups is the same. */
static Py_ssize_t offset_groups(const int64_t *offsets, const double *weights, Py_ssize_t n,
                                int64_t *groups, float *taps)
{
    Py_ssize_t g = -1;
    for (Py_ssize_t o = 0; o < n; o++) {
        const int64_t da = offsets[3 * o], db = offsets[3 * o + 1], dc = offsets[3 * o + 2];
        if (dc < -1 || dc > 1) return -1;
        if (g < 0 || groups[2 * g] != da || groups[2 * g + 1] != db ||
            dc <= offsets[3 * (o - 1) + 2]) {
            g++;
            groups[2 * g] = da;
            groups[2 * g + 1] = db;
            taps[3 * g] = taps[3 * g + 1] = taps[3 * g + 2] = 0.0f;
        }
        taps[3 * g + dc + 1] = (float)weights[o];
    }
    return g + 1;
}

/* sums[m * n_slots + s] = sum_o w_o previous[(i, j, m) + o, s]; neighbours outside count 0.
 * In float32 (8 vector lanes; the sums of at most 26 weights times 255 are exact to 1e-7), one
 * pass per neighbour row: (w_l v[m - 1] + w_c v[m]) + w_r v[m + 1], a missing voxel 0. */
MULTIVERSION static void neighbour_sums_row(const struct sweep *p, Py_ssize_t i, Py_ssize_t j,
                                            float *restrict sums, float *restrict v)
{
    const Py_ssize_t S = p->n_slots, L = p->n2 * S;
    for (Py_ssize_t t = 0; t < L; t++) sums[t] = 0.0f;
    for (Py_ssize_t g = 0; g < p->n_groups; g++) {
        const Py_ssize_t a = i + p->groups[2 * g], b = j + p->groups[2 * g + 1];
        if (a < 0 || a >= p->n0 || b < 0 || b >= p->n1) continue;
        const float wl = p->taps[3 * g], wc = p->taps[3 * g + 1], wr = p->taps[3 * g + 2];
        const uint8_t *row = p->previous + (a * p->n1 + b) * L;
        for (Py_ssize_t t = 0; t < L; t++) v[t] = (float)row[t]; /* converted once, used 3x */
        const Py_ssize_t edge = S < L ? S : L, tail = L - S > S ? L - S : S;
        for (Py_ssize_t t = 0; t < edge; t++) { /* m = 0 (and m = n2 - 1 when n2 = 1) */
            const float right = t + S < L ? v[t + S] : 0.0f;
            sums[t] += (wl * 0.0f + wc * v[t]) + wr * right;
        }
        for (Py_ssize_t t = S; t < L - S; t++)
            sums[t] += (wl * v[t - S] + wc * v[t]) + wr * v[t + S];
        for (Py_ssize_t t = tail; t < L; t++) /* m = n2 - 1 */
            sums[t] += (wl * v[t - S] + wc * v[t]) + wr * 0.0f;
    }
}

/* exp(t) in float32 for SWEEP_NEGLIGIBLE <= t <= 0, and 0 at SWEEP_NEGLIGIBLE: 2^n e^g with
 * n = round(t / ln 2) (adding 1.5 * 2^23 rounds a float32 to an integer), g = t - n ln 2
 * (Cody-Waite, ln 2 in two parts) and e^g by its Taylor polynomial of degree 7 (error under
 * 1e-8), 2^n written into the exponent bits. Relative error: a few float32 steps (tested
 * under 5e-7). In float32, a loop of these runs in 8 vector lanes;
 * segment._kernels._exp_sweep does the same operations in numpy, to the bit. */
#define LOG2E_F ((float)1.4426950408889634)
#define LN2_HI_F 0.693359375f /* few bits: n * HI is exact */
#define LN2_LO_F ((float)-2.12194440e-4)
#define ROUND_F 12582912.0f /* 1.5 * 2^23 */
INLINE float exp_sweep(float t)
{
    const float n = (t * LOG2E_F + ROUND_F) - ROUND_F;
    const float g = (t - n * LN2_HI_F) - n * LN2_LO_F;
    const float poly =
        1.0f + g * (1.0f + g * (0.5f + g * ((float)(1.0 / 6) + g * ((float)(1.0 / 24) +
        g * ((float)(1.0 / 120) + g * ((float)(1.0 / 720) + g * (float)(1.0 / 5040)))))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return t > (float)SWEEP_NEGLIGIBLE ? poly * scale : 0.0f;
}

/* The unnormalised posterior of one row: weights[k * n2 + m] = exp(l_km - max_k l_km) (float32,
 * 0 under SWEEP_NEGLIGIBLE) and totals[m] = sum_k weights, where l_km = log_norm_k -
 * |(x_m - mu_k) U_k|^2 / 2 + (prior_scale * sums[m, k] or log pi_k), in float64. x is
 * (D, n2); log_post holds K n2 doubles. */
MULTIVERSION static void row_posterior(const struct sweep *p, const double *x,
                                       const float *sums, double *log_post, float *weights,
                                       double *peak, double *totals)
{
    const Py_ssize_t K = p->K, D = p->D, n2 = p->n2, n_slots = p->n_slots;
    for (Py_ssize_t m = 0; m < n2; m++) peak[m] = -INFINITY;
    for (Py_ssize_t k = 0; k < K; k++) {
        double *row = log_post + k * n2;
        const double c = p->log_norm[k];
        const double *mu = p->means + k * D, *u = p->precisions_chol + k * D * D;
        if (D == 1) {
            const double mu0 = mu[0], scale = u[0];
            for (Py_ssize_t m = 0; m < n2; m++) {
                const double y = (x[m] - mu0) * scale;
                row[m] = c - 0.5 * (y * y);
            }
        } else {
            for (Py_ssize_t m = 0; m < n2; m++) row[m] = 0.0;
            for (Py_ssize_t d = 0; d < D; d++) {
                for (Py_ssize_t m = 0; m < n2; m++) {
                    double y = 0.0;
                    for (Py_ssize_t e = 0; e < D; e++) y += (x[e * n2 + m] - mu[e]) * u[e * D + d];
                    row[m] += y * y;
                }
            }
            for (Py_ssize_t m = 0; m < n2; m++) row[m] = c - 0.5 * row[m];
        }
        if (p->prior_scale > 0) {
            const double scale = p->prior_scale;
            for (Py_ssize_t m = 0; m < n2; m++) row[m] += scale * (double)sums[m * n_slots + k];
        } else {
            const double lw = p->log_weights[k];
            for (Py_ssize_t m = 0; m < n2; m++) row[m] += lw;
        }
        for (Py_ssize_t m = 0; m < n2; m++) peak[m] = peak[m] > row[m] ? peak[m] : row[m];
    }
    /* three simple loops, each of which vectorises */
    for (Py_ssize_t k = 0; k < K; k++) {
        const double *row = log_post + k * n2;
        float *w = weights + k * n2;
        for (Py_ssize_t m = 0; m < n2; m++) {
            const double t = row[m] - peak[m];
            w[m] = (float)(t > SWEEP_NEGLIGIBLE ? t : SWEEP_NEGLIGIBLE);
        }
    }
    for (Py_ssize_t t = 0; t < K * n2; t++) weights[t] = exp_sweep(weights[t]);
    for (Py_ssize_t m = 0; m < n2; m++) totals[m] = 0.0;
    for (Py_ssize_t k = 0; k < K; k++) {
        const float *w = weights + k * n2;
        for (Py_ssize_t m = 0; m < n2; m++) totals[m] += (double)w[m];
    }
}

/* The next state of one row's voxels (mode STATE): levels[k * n2 + m] = round(255 q_km) and
 * change[m] = sum_k |levels - previous|, in loops over the row that vectorise. */
MULTIVERSION static void row_levels(Py_ssize_t K, Py_ssize_t n2, Py_ssize_t n_slots,
                                    const uint8_t *previous, const float *weights,
                                    const double *totals, int32_t *levels, int32_t *change)
{
    for (Py_ssize_t m = 0; m < n2; m++) change[m] = 0;
    for (Py_ssize_t k = 0; k < K; k++) {
        const float *w = weights + k * n2;
        int32_t *level = levels + k * n2;
        for (Py_ssize_t m = 0; m < n2; m++) {
            level[m] = (int32_t)((double)w[m] / totals[m] * 255.0 + 0.5);
            const int32_t d = level[m] - (int32_t)previous[m * n_slots + k];
            change[m] += d < 0 ? -d : d;
        }
    }
}

/* The outputs of one row's voxels, from its weights and totals (see mean_field_rows_doc). */
MULTIVERSION static void row_outputs(const struct sweep *p, Py_ssize_t i, Py_ssize_t j,
                                     const uint8_t *inside, const float *sums,
                                     const float *weights, const double *totals, int32_t *levels)
{
    const Py_ssize_t K = p->K, n2 = p->n2, n_slots = p->n_slots;
    const int keep_maps = p->final.size > 1, keep_labels = p->labels.size > 1;
    const uint8_t *previous = p->previous + (i * p->n1 + j) * n2 * n_slots;
    if (p->mode == STATE) {
        int32_t *change = levels + K * n2;
        row_levels(K, n2, n_slots, previous, weights, totals, levels, change);
        /* the row's first voxel and the steps (the stores through uint8_t may alias anything,
         * so nothing is reloaded from p in the loop) */
        uint8_t *const voxel0 = (uint8_t *)p->state.buf + i * p->state.strides[0] +
                                j * p->state.strides[1];
        const Py_ssize_t step_m = p->state.strides[2], step_k = p->state.strides[3];
        for (Py_ssize_t m = 0; m < n2; m++) {
            if (!inside[m]) continue;
            uint8_t *out = voxel0 + m * step_m;
            if (p->skip_settled && sums[m * n_slots + K] == 0) { /* settled: keeps its state */
                for (Py_ssize_t k = 0; k < K; k++) out[k * step_k] = previous[m * n_slots + k];
                out[K * step_k] = 0;
                continue;
            }
            for (Py_ssize_t k = 0; k < K; k++) out[k * step_k] = (uint8_t)levels[k * n2 + m];
            const int32_t half = (change[m] + 1) / 2;
            out[K * step_k] = (uint8_t)(half < 255 ? half : 255);
        }
        return;
    }
    /* the float32 posterior of the row, in a loop that vectorises */
    float *probs = (float *)(levels + (K + 1) * n2);
    for (Py_ssize_t k = 0; k < K; k++)
        for (Py_ssize_t m = 0; m < n2; m++)
            probs[k * n2 + m] = (float)((double)weights[k * n2 + m] / totals[m]);
    for (Py_ssize_t k = 0; k < K; k++)
        for (Py_ssize_t m = 0; m < n2; m++)
            if (inside[m]) p->counts[k] += probs[k * n2 + m];
    /* where voxel m, component k goes: base + m * step_m + k * step_k (as the mode lays out) */
    const Py_ssize_t *fs = p->final.strides, *ls = p->labels.strides, ii = i - p->i0;
    char *maps = p->final.buf, *labels = p->labels.buf;
    Py_ssize_t map_m, map_k, label_m;
    if (p->mode == FINAL) {
        maps += i * fs[0] + j * fs[1], map_m = fs[2], map_k = fs[3];
        labels += i * ls[0] + j * ls[1], label_m = ls[2];
    } else if (p->mode == FINAL_REVERSED) {
        maps += j * fs[1] + i * fs[2], map_m = fs[0], map_k = fs[3];
        labels += j * ls[1] + i * ls[2], label_m = ls[0];
    } else {
        maps += ii * fs[1] + j * fs[2], map_m = fs[3], map_k = fs[0];
        labels += ii * ls[0] + j * ls[1], label_m = ls[2];
    }
    for (Py_ssize_t m = 0; m < n2; m++) {
        if (!inside[m]) continue;
        Py_ssize_t best = 0;
        float best_value = -1.0f;
        for (Py_ssize_t k = 0; k < K; k++) {
            const float value = probs[k * n2 + m];
            if (value > best_value) {
                best = k;
                best_value = value;
            }
            if (keep_maps) *(float *)(maps + m * map_m + k * map_k) = value;
        }
        if (keep_labels) *(uint8_t *)(labels + m * label_m) = (uint8_t)(best + 1);
    }
}

/* The sweep over the rows [i0:i1, j0:j1]; work holds (n_slots + D + 3 K + 3) n2 doubles. */
static void mean_field_rows_run(const struct sweep *p, double *work)
{
    const Py_ssize_t n2 = p->n2, D = p->D, K = p->K;
    float *sums = (float *)work, *v = sums + p->n_slots * n2; /* 2 n_slots n2 floats */
    double *x = work + p->n_slots * n2, *log_post = x + D * n2, *peak = log_post + K * n2;
    double *totals = peak + n2;
    float *weights = (float *)(totals + n2);   /* K n2 floats */
    int32_t *levels = (int32_t *)(weights + K * n2); /* (K + 1) n2 ints, then K n2 floats */
    for (Py_ssize_t i = p->i0; i < p->i1; i++) {
        for (Py_ssize_t j = p->j0; j < p->j1; j++) {
            const uint8_t *inside = p->mask + (i * p->n1 + j) * n2;
            int any = 0;
            for (Py_ssize_t m = 0; m < n2; m++) any |= inside[m];
            if (!any) continue;
            if (p->prior_scale > 0) neighbour_sums_row(p, i, j, sums, v);
            const float *values =
                p->corrected + ((i - p->i0) * (p->j1 - p->j0) + (j - p->j0)) * n2 * D;
            for (Py_ssize_t d = 0; d < D; d++) /* outside the mask: any finite value, not used */
                for (Py_ssize_t m = 0; m < n2; m++)
                    x[d * n2 + m] = inside[m] ? (double)values[m * D + d] : 0.0;
            row_posterior(p, x, sums, log_post, weights, peak, totals);
            row_outputs(p, i, j, inside, sums, weights, totals, levels);
        }
    }
}

/* ------------------------------------------------------------------ the bias field */

/* Separable linear interpolation of a coarse grid at the voxels of a 3-D block.
 *
 * coarse: (c0, c1, c2, D); per axis a, voxel i lies between cells low_a[i] and low_a[i] + 1
 * with weights w_a[2 i], w_a[2 i + 1]. The axes are contracted in order (0, then 1, then 2),
 * each value as w_low * v_low + w_high * v_high in float64 (no fused multiply-add), then
 * rounded to float32 into out: (n0, n1, n2, D), or (n2, n1, n0, D) when reverse. This is
 * segment._kernels._numpy_interpolate_field (dense matrices and np.tensordot) with the zero
 * terms left out. work holds n0 c1 c2 D + n0 c2 D doubles. */
MULTIVERSION static void interpolate_field_run(const double *coarse, Py_ssize_t c1,
                                               Py_ssize_t c2, Py_ssize_t D,
                                               const int64_t *const low[3],
                                               const double *const w[3], const Py_ssize_t n[3],
                                               float *out, int reverse, double *work)
{
    const Py_ssize_t n0 = n[0], n1 = n[1], n2 = n[2], row = c2 * D, plane = c1 * row;
    double *a = work;              /* (n0, c1, c2, D): axis 0 interpolated */
    double *b = work + n0 * plane; /* (n0, c2, D): axis 1 interpolated at one i1 */
    for (Py_ssize_t i0 = 0; i0 < n0; i0++) {
        const double *lo = coarse + low[0][i0] * plane, *hi = lo + plane;
        const double wl = w[0][2 * i0], wh = w[0][2 * i0 + 1];
        double *ai = a + i0 * plane;
        for (Py_ssize_t j = 0; j < plane; j++) ai[j] = lo[j] * wl + hi[j] * wh;
    }
    for (Py_ssize_t i1 = 0; i1 < n1; i1++) {
        const double wl = w[1][2 * i1], wh = w[1][2 * i1 + 1];
        for (Py_ssize_t i0 = 0; i0 < n0; i0++) { /* reverse: b is (c2, D, n0), read along i0 */
            const double *lo = a + i0 * plane + low[1][i1] * row, *hi = lo + row;
            if (reverse)
                for (Py_ssize_t j = 0; j < row; j++) b[j * n0 + i0] = lo[j] * wl + hi[j] * wh;
            else
                for (Py_ssize_t j = 0; j < row; j++) b[i0 * row + j] = lo[j] * wl + hi[j] * wh;
        }
        for (Py_ssize_t i0 = 0; i0 < n0 && !reverse; i0++) {
            float *o = out + (i0 * n1 + i1) * n2 * D;
            const double *bi = b + i0 * row;
            if (D == 1) { /* the usual case, one channel: a loop the compiler keeps simple */
                for (Py_ssize_t i2 = 0; i2 < n2; i2++) {
                    const double *lo = bi + low[2][i2];
                    o[i2] = (float)(lo[0] * w[2][2 * i2] + lo[1] * w[2][2 * i2 + 1]);
                }
                continue;
            }
            for (Py_ssize_t i2 = 0; i2 < n2; i2++) {
                const double *lo = bi + low[2][i2] * D, *hi = lo + D;
                const double wl2 = w[2][2 * i2], wh2 = w[2][2 * i2 + 1];
                for (Py_ssize_t d = 0; d < D; d++)
                    o[i2 * D + d] = (float)(lo[d] * wl2 + hi[d] * wh2);
            }
        }
        for (Py_ssize_t i2 = 0; i2 < n2 && reverse; i2++) {
            float *o = out + (i2 * n1 + i1) * n0 * D;
            const double wl2 = w[2][2 * i2], wh2 = w[2][2 * i2 + 1];
            for (Py_ssize_t d = 0; d < D; d++) {
                const double *lo = b + (low[2][i2] * D + d) * n0, *hi = lo + D * n0;
                for (Py_ssize_t i0 = 0; i0 < n0; i0++)
                    o[i0 * D + d] = (float)(lo[i0] * wl2 + hi[i0] * wh2);
            }
        }
    }
}

/* ------------------------------------------------------------------ partial-volume fractions */

/* Fractions of one channel from a tabulated mixed-voxel model, with the MRF prior.
 *
 * For each voxel: position p = (x - x0) / step clipped to [0, n - 1], low = min(floor(p),
 * n - 2), t = p - low; each of the R = C + K - 1 rows (C = 2 K - 1 class log-likelihoods,
 * then K - 1 mixing shares) is slopes[r][low] * t + values[r][low]; the C likelihoods are
 * exp(l_c - max_c l_c), weighted by the prior (q_k + floor for pure class k, (q_m + q_m+1) / 2
 * + floor for the mixel of m and m + 1; none without a posterior), normalised by their sum
 * (taken in class order), and each mixel's posterior is split between its two classes by the
 * share. The same float64 operations in the same order as the numpy twin
 * (segment._kernels._numpy_table_fractions), with this module's exponential. q holds K
 * float32 (or float64) values per voxel or is NULL. work holds (R + K + 2) BLOCK doubles and
 * BLOCK indices; the loops run over a block of voxels, class by class. */
#define DEFINE_TABLE_FRACTIONS(NAME, QTYPE)                                                    \
    MULTIVERSION static void NAME(const double *x, Py_ssize_t n_voxels, const double *values,  \
                                  const double *slopes, Py_ssize_t n, Py_ssize_t R, double x0, \
                                  double step, const QTYPE *q, double floor_, Py_ssize_t K,    \
                                  float *out, double *work)                                    \
    {                                                                                          \
        const int64_t round_bits = bits_of(ROUND);                                             \
        const Py_ssize_t C = 2 * K - 1, top = n - 2 > 0 ? n - 2 : 0;                           \
        double *rows = work, *t = rows + R * BLOCK, *peak = t + BLOCK;                         \
        double *o = peak + BLOCK; /* K rows */                                                 \
        Py_ssize_t *low = (Py_ssize_t *)(o + K * BLOCK);                                       \
        for (Py_ssize_t start = 0; start < n_voxels; start += BLOCK) {                         \
            const Py_ssize_t nb = n_voxels - start < BLOCK ? n_voxels - start : BLOCK;         \
            const double *xb = x + start;                                                      \
            for (Py_ssize_t i = 0; i < nb; i++) {                                              \
                double p = (xb[i] - x0) / step;                                                \
                p = p < 0.0 ? 0.0 : (p > (double)(n - 1) ? (double)(n - 1) : p);              \
                Py_ssize_t l = (Py_ssize_t)p;                                                  \
                l = l < top ? l : top;                                                         \
                low[i] = l;                                                                    \
                t[i] = p - (double)l;                                                          \
            }                                                                                  \
            for (Py_ssize_t r = 0; r < R; r++) {                                               \
                const double *sr = slopes + r * n, *vr = values + r * n;                       \
                double *row = rows + r * nb;                                                   \
                for (Py_ssize_t i = 0; i < nb; i++) row[i] = sr[low[i]] * t[i] + vr[low[i]];   \
            }                                                                                  \
            for (Py_ssize_t i = 0; i < nb; i++) peak[i] = rows[i];                             \
            for (Py_ssize_t c = 1; c < C; c++) {                                               \
                const double *row = rows + c * nb;                                             \
                for (Py_ssize_t i = 0; i < nb; i++) peak[i] = row[i] > peak[i] ? row[i] : peak[i]; \
            }                                                                                  \
            for (Py_ssize_t c = 0; c < C; c++) {                                               \
                double *row = rows + c * nb;                                                   \
                for (Py_ssize_t i = 0; i < nb; i++)                                            \
                    row[i] = exp_nonpositive(row[i] - peak[i], round_bits);                    \
            }                                                                                  \
            if (q != NULL) {                                                                   \
                const QTYPE *qb = q + start * K;                                               \
                for (Py_ssize_t k = 0; k < K; k++) {                                           \
                    double *row = rows + k * nb;                                               \
                    for (Py_ssize_t i = 0; i < nb; i++) row[i] *= (double)qb[i * K + k] + floor_; \
                }                                                                              \
                for (Py_ssize_t m = 0; m < K - 1; m++) {                                       \
                    double *row = rows + (K + m) * nb;                                         \
                    for (Py_ssize_t i = 0; i < nb; i++) {                                      \
                        double prior = (double)qb[i * K + m] + (double)qb[i * K + m + 1];      \
                        prior *= 0.5;                                                          \
                        prior += floor_;                                                       \
                        row[i] *= prior;                                                       \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            double *total = peak; /* the sum over classes, in class order */                   \
            for (Py_ssize_t i = 0; i < nb; i++) total[i] = rows[i];                            \
            for (Py_ssize_t c = 1; c < C; c++) {                                               \
                const double *row = rows + c * nb;                                             \
                for (Py_ssize_t i = 0; i < nb; i++) total[i] += row[i];                        \
            }                                                                                  \
            for (Py_ssize_t c = 0; c < C; c++) {                                               \
                double *row = rows + c * nb;                                                   \
                for (Py_ssize_t i = 0; i < nb; i++) row[i] /= total[i];                        \
            }                                                                                  \
            memcpy(o, rows, (size_t)(K * nb) * sizeof(double));                                \
            for (Py_ssize_t m = 0; m < K - 1; m++) { /* the mixel's lower-class share */      \
                double *mixed = rows + (K + m) * nb, *om = o + m * nb;                         \
                const double *share = rows + (C + m) * nb;                                     \
                for (Py_ssize_t i = 0; i < nb; i++) {                                          \
                    const double first = mixed[i] * share[i];                                  \
                    om[i] += first;                                                            \
                    mixed[i] -= first;                                                         \
                }                                                                              \
            }                                                                                  \
            for (Py_ssize_t m = 0; m < K - 1; m++) {                                           \
                const double *mixed = rows + (K + m) * nb;                                     \
                double *om = o + (m + 1) * nb;                                                 \
                for (Py_ssize_t i = 0; i < nb; i++) om[i] += mixed[i];                         \
            }                                                                                  \
            float *ob = out + start * K;                                                       \
            for (Py_ssize_t k = 0; k < K; k++)                                                 \
                for (Py_ssize_t i = 0; i < nb; i++) ob[i * K + k] = (float)o[k * nb + i];      \
        }                                                                                      \
    }

DEFINE_TABLE_FRACTIONS(table_fractions_float, float)
DEFINE_TABLE_FRACTIONS(table_fractions_double, double)

/* ------------------------------------------------------------------ the mixed-voxel model's EM */

/* EM of the one-channel mixed-voxel model on weighted samples (a histogram).
 *
 * K pure classes (means mu, variances var) and, between classes k and k + 1, n_steps mixels
 * of fraction f[s]: mean f mu_k + (1 - f) mu_k+1, variance f var_k + (1 - f) var_k+1, prior
 * weight[K + k] / n_steps. Each iteration: the E-step over the C = K + (K - 1) n_steps
 * Gaussians, the mean log-likelihood per sample into trace (stop when it changed by less
 * than tol), then the M-step (mixel weights by class pair, means, variances floored). mu, var
 * and weight (2 K - 1) are updated in place; returns the number of trace values. work holds
 * N C + 4 C doubles. The numpy twin is segment._kernels._numpy_pve_em_1d (the same steps;
 * its sums and dot products may round differently). */
static Py_ssize_t pve_em_1d_run(const double *x, const double *w, Py_ssize_t N, const double *f,
                                Py_ssize_t n_steps, double *mu, double *var, double *weight,
                                Py_ssize_t K, double floor_, Py_ssize_t max_iter, double tol,
                                double *trace, double *work)
{
    const Py_ssize_t C = K + (K - 1) * n_steps;
    double *p = work, *means = p + N * C, *variances = means + C, *half_log = variances + C;
    double *log_prior = half_log + C;
    const int64_t round_bits = bits_of(ROUND);
    double total = 0.0;
    for (Py_ssize_t i = 0; i < N; i++) total += w[i];
    Py_ssize_t n_trace = 0;
    for (Py_ssize_t iteration = 0; iteration < max_iter; iteration++) {
        for (Py_ssize_t k = 0; k < K; k++) {
            means[k] = mu[k];
            variances[k] = var[k];
            log_prior[k] = log(weight[k]);
        }
        for (Py_ssize_t m = 0; m < K - 1; m++)
            for (Py_ssize_t s = 0; s < n_steps; s++) {
                const Py_ssize_t c = K + m * n_steps + s;
                means[c] = f[s] * mu[m] + (1.0 - f[s]) * mu[m + 1];
                variances[c] = f[s] * var[m] + (1.0 - f[s]) * var[m + 1];
                log_prior[c] = log(weight[K + m] / (double)n_steps);
            }
        for (Py_ssize_t c = 0; c < C; c++) half_log[c] = LOG_2PI + log(variances[c]);
        double log_likelihood = 0.0;
        for (Py_ssize_t i = 0; i < N; i++) {
            double *row = p + i * C, top = -INFINITY;
            for (Py_ssize_t c = 0; c < C; c++) {
                double d = x[i] - means[c];
                double v = d * d;
                v /= variances[c];
                v += half_log[c];
                v *= -0.5;
                v += log_prior[c];
                row[c] = v;
                top = v > top ? v : top;
            }
            double norm = 0.0;
            for (Py_ssize_t c = 0; c < C; c++) { /* 0 far down: exp(-inf) of a weight of 0 */
                const double t = row[c] - top;
                row[c] = t < MIN_EXPONENT ? 0.0 : exp_nonpositive(t, round_bits);
            }
            for (Py_ssize_t c = 0; c < C; c++) norm += row[c];
            log_likelihood += w[i] * (log(norm) + top);
            const double factor = w[i] / norm;
            for (Py_ssize_t c = 0; c < C; c++) row[c] *= factor; /* the weighted posteriors */
        }
        trace[n_trace++] = log_likelihood / total;
        if (n_trace > 1 && fabs(trace[n_trace - 1] - trace[n_trace - 2]) < tol) break;
        for (Py_ssize_t k = 0; k < K; k++) {
            double nk = 0.0, sx = 0.0;
            for (Py_ssize_t i = 0; i < N; i++) {
                nk += p[i * C + k];
                sx += x[i] * p[i * C + k];
            }
            weight[k] = nk / total;
            nk += 1e-10;
            mu[k] = sx / nk;
            double sq = 0.0;
            for (Py_ssize_t i = 0; i < N; i++) {
                const double d = x[i] - mu[k];
                sq += d * d * p[i * C + k];
            }
            sq /= nk;
            var[k] = sq > floor_ ? sq : floor_;
        }
        for (Py_ssize_t m = 0; m < K - 1; m++) {
            double sum = 0.0;
            for (Py_ssize_t i = 0; i < N; i++)
                for (Py_ssize_t s = 0; s < n_steps; s++) sum += p[i * C + K + m * n_steps + s];
            weight[K + m] = sum / total;
        }
    }
    return n_trace;
}

/* ------------------------------------------------------------------ the bias field's EM */

/* The E-step of one channel under the bias field and the field's per-cell sums, for the
 * voxels of a block of the sub-grid (segment.spatial.bias.em_sampled_block).
 *
 * Per voxel i (in order): b = log_b[voxels[i]] (float32), x = y exp(-b); per class
 * l_k = ((x - mu_k) p_k)^2 (-1/2) + c_k + log_w_k; responsibilities r_k = exp(l_k - max l) /
 * their sum (in class order); log_norm = log(sum) + max. Then into sums (S, n_cells), in voxel
 * order as np.bincount adds: slot 2 k gets r_k u log_y and 2 k + 1 gets r_k u (u = usable),
 * slot 2 K + 1 + 2 k gets log_y and 2 K + 2 + 2 k gets 1 for the voxel's class (the first
 * largest r_k) when usable, 0 otherwise. The float64 operations and libm's exp and log of the
 * numpy reference, in its order; writes x, the picked b, log_norm and r (K, n) for the moments
 * that numpy sums. */
static void bias_estep_1d_run(const double *y, Py_ssize_t n, const float *log_b,
                              const int64_t *voxels, const double *log_y, const uint8_t *usable,
                              const int64_t *cells, Py_ssize_t n_cells, Py_ssize_t K,
                              const double *mu, const double *p, const double *c,
                              const double *log_w, double *x, double *b, double *log_norm,
                              double *r, double *sums)
{
    /* a block of voxels at a time, one step after the other, so that the calls to exp and log
     * of different voxels overlap (one voxel's chain of them would wait on each in turn) */
    double total[BLOCK], peak[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const Py_ssize_t end = n - start < BLOCK ? n : start + BLOCK;
        for (Py_ssize_t i = start; i < end; i++) {
            b[i] = (double)log_b[voxels[i]];
            x[i] = y[i] * exp(-b[i]);
        }
        for (Py_ssize_t k = 0; k < K; k++) {
            double *rk = r + k * n;
            for (Py_ssize_t i = start; i < end; i++) {
                double v = (x[i] - mu[k]) * p[k];
                v = v * v;
                v *= -0.5;
                v += c[k];
                v += log_w[k];
                rk[i] = v;
                if (k == 0 || v > peak[i - start]) peak[i - start] = v;
            }
        }
        for (Py_ssize_t k = 0; k < K; k++) {
            double *rk = r + k * n;
            for (Py_ssize_t i = start; i < end; i++) {
                const double e = exp(rk[i] - peak[i - start]);
                rk[i] = e;
                total[i - start] = k == 0 ? e : total[i - start] + e;
            }
        }
        for (Py_ssize_t k = 0; k < K; k++) {
            double *rk = r + k * n;
            for (Py_ssize_t i = start; i < end; i++) rk[i] /= total[i - start];
        }
        for (Py_ssize_t i = start; i < end; i++)
            log_norm[i] = log(total[i - start]) + peak[i - start];
        for (Py_ssize_t i = start; i < end; i++) { /* the cell sums, in voxel order */
            Py_ssize_t label = 0;
            double best = 0.0;
            const double u = usable[i] ? 1.0 : 0.0, ly = log_y[i];
            double *cell = sums + cells[i];
            for (Py_ssize_t k = 0; k < K; k++) {
                const double rk = r[k * n + i];
                if (k == 0 || rk > best) {
                    best = rk;
                    label = k;
                }
                const double weight = rk * u;
                cell[(2 * k) * n_cells] += weight * ly;
                cell[(2 * k + 1) * n_cells] += weight;
            }
            for (Py_ssize_t k = 0; k < K; k++) {
                const int own = k == label && usable[i];
                cell[(2 * K + 1 + 2 * k) * n_cells] += own ? ly : 0.0;
                cell[(2 * K + 2 + 2 * k) * n_cells] += own ? 1.0 : 0.0;
            }
        }
    }
}

/* ------------------------------------------------------------------ Python bindings */

enum kind { FLOAT64, FLOAT32_OR_64 };

/* A C-contiguous, native-order float64 (or, with FLOAT32_OR_64, float32) buffer of obj;
 * *is_float32 tells which. Sets a Python error and returns -1 otherwise. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, int writable,
                      enum kind kind, int *is_float32)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *format = view->format ? view->format : "B";
    if (format[0] == '@' || format[0] == '=' || format[0] == '<') format++;
    int f32 = strcmp(format, "f") == 0 && view->itemsize == 4;
    int f64 = strcmp(format, "d") == 0 && view->itemsize == 8;
    if (!(f64 || (f32 && kind == FLOAT32_OR_64))) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous float%s array, got format '%s'",
                     name, kind == FLOAT64 ? "64" : "32 or float64", view->format);
        PyBuffer_Release(view);
        return -1;
    }
    if (is_float32 != NULL) *is_float32 = f32;
    return 0;
}

static Py_ssize_t count(const Py_buffer *view) { return view->len / view->itemsize; }

#define N_BUFFERS 8

static void release(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

static PyObject *size_error(Py_buffer *views, int n, const char *message)
{
    release(views, n);
    PyErr_SetString(PyExc_ValueError, message);
    return NULL;
}

PyDoc_STRVAR(statistics_1d_doc,
"statistics_1d(x, sample_weight, centers, inv_scale, offset, sums) -> float\n\n"
"One-channel E-step of a chunk reduced to weighted row sums, in one pass, without the GIL.\n\n"
"x: (N,) float32 or float64; sample_weight: (N,) float64, or (0,) for 1 per voxel;\n"
"centers, inv_scale, offset: (K,) float64; sums: (3, K) float64, accumulated into.\n"
"Returns sum_n w_n log p(x_n). See segment._em._compiled_statistics_1d.");

static PyObject *statistics_1d(PyObject *self, PyObject *args)
{
    PyObject *objects[6];
    Py_buffer views[6];
    int is_float32 = 0, n = 0;
    if (!PyArg_UnpackTuple(args, "statistics_1d", 6, 6, &objects[0], &objects[1], &objects[2],
                           &objects[3], &objects[4], &objects[5]))
        return NULL;
    static const char *names[6] = {"x", "sample_weight", "centers", "inv_scale", "offset", "sums"};
    for (; n < 6; n++) {
        if (get_buffer(objects[n], &views[n], names[n], n == 5, n == 0 ? FLOAT32_OR_64 : FLOAT64,
                       n == 0 ? &is_float32 : NULL) < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_ssize_t n_voxels = count(&views[0]), K = count(&views[2]);
    if (K < 1 || count(&views[3]) != K || count(&views[4]) != K || count(&views[5]) != 3 * K)
        return size_error(views, 6, "centers, inv_scale, offset need K values and sums 3 K");
    if (count(&views[1]) != 0 && count(&views[1]) != n_voxels)
        return size_error(views, 6, "sample_weight needs one value per voxel, or none");
    double *work = PyMem_RawMalloc((size_t)(2 * K + 2) * BLOCK * sizeof(double));
    if (work == NULL) {
        release(views, 6);
        return PyErr_NoMemory();
    }
    const double *weight = count(&views[1]) ? views[1].buf : NULL;
    double log_likelihood;
    Py_BEGIN_ALLOW_THREADS
    if (is_float32)
        log_likelihood = statistics_1d_float(views[0].buf, n_voxels, weight, K, views[2].buf,
                                             views[3].buf, views[4].buf, views[5].buf, work);
    else
        log_likelihood = statistics_1d_double(views[0].buf, n_voxels, weight, K, views[2].buf,
                                              views[3].buf, views[4].buf, views[5].buf, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, 6);
    return PyFloat_FromDouble(log_likelihood);
}

PyDoc_STRVAR(statistics_nd_doc,
"statistics_nd(X, sample_weight, means, precisions_chol, offset, sums0, sums1, sums2)"
" -> float\n\n"
"E-step of a chunk of D-channel voxels reduced to centred moments, in one pass, without the\n"
"GIL. X: (N, D) float32 or float64; sample_weight: (N,) float64, or (0,) for 1 per voxel;\n"
"means: (K, D); precisions_chol: (K, D, D); offset: (K,); sums0 (K,), sums1 (K, D) and\n"
"sums2 (K, D, D), lower triangle only, accumulated into; all float64.\n"
"Returns sum_n w_n log p(x_n). See segment._em._compiled_statistics_nd.");

static PyObject *statistics_nd(PyObject *self, PyObject *args)
{
    PyObject *objects[N_BUFFERS];
    Py_buffer views[N_BUFFERS];
    int is_float32 = 0, n = 0;
    if (!PyArg_UnpackTuple(args, "statistics_nd", N_BUFFERS, N_BUFFERS, &objects[0], &objects[1],
                           &objects[2], &objects[3], &objects[4], &objects[5], &objects[6],
                           &objects[7]))
        return NULL;
    static const char *names[N_BUFFERS] = {"X",      "sample_weight", "means", "precisions_chol",
                                           "offset", "sums0",         "sums1", "sums2"};
    for (; n < N_BUFFERS; n++) {
        if (get_buffer(objects[n], &views[n], names[n], n >= 5, n == 0 ? FLOAT32_OR_64 : FLOAT64,
                       n == 0 ? &is_float32 : NULL) < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_ssize_t K = count(&views[4]);
    const Py_ssize_t D = K > 0 ? count(&views[2]) / K : 0;
    if (K < 1 || D < 1 || count(&views[2]) != K * D || count(&views[3]) != K * D * D ||
        count(&views[5]) != K || count(&views[6]) != K * D || count(&views[7]) != K * D * D ||
        count(&views[0]) % D != 0)
        return size_error(views, N_BUFFERS, "inconsistent sizes of X, the parameters and sums");
    const Py_ssize_t n_voxels = count(&views[0]) / D;
    if (count(&views[1]) != 0 && count(&views[1]) != n_voxels)
        return size_error(views, N_BUFFERS, "sample_weight needs one value per voxel, or none");
    double *work = PyMem_RawMalloc((size_t)(2 * D + K + 4) * BLOCK * sizeof(double));
    if (work == NULL) {
        release(views, N_BUFFERS);
        return PyErr_NoMemory();
    }
    const double *weight = count(&views[1]) ? views[1].buf : NULL;
    double log_likelihood;
    Py_BEGIN_ALLOW_THREADS
    if (is_float32)
        log_likelihood = statistics_nd_float(views[0].buf, n_voxels, D, weight, K, views[2].buf,
                                             views[3].buf, views[4].buf, views[5].buf,
                                             views[6].buf, views[7].buf, work);
    else
        log_likelihood = statistics_nd_double(views[0].buf, n_voxels, D, weight, K, views[2].buf,
                                              views[3].buf, views[4].buf, views[5].buf,
                                              views[6].buf, views[7].buf, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, N_BUFFERS);
    return PyFloat_FromDouble(log_likelihood);
}

PyDoc_STRVAR(moments_1d_doc,
"moments_1d(x) -> (minimum, maximum, mean, m2)\n\n"
"Extremes, mean and centred sum of squares (float64) of a float32 or float64 array, in two\n"
"passes without the GIL. A NaN or an infinity gives NaN extremes (see\n"
"segment._em.chunk_moments, which then counts them in numpy).");

static PyObject *moments_1d(PyObject *self, PyObject *args)
{
    PyObject *object;
    Py_buffer view;
    int is_float32 = 0;
    double out[4];
    if (!PyArg_UnpackTuple(args, "moments_1d", 1, 1, &object)) return NULL;
    if (get_buffer(object, &view, "x", 0, FLOAT32_OR_64, &is_float32) < 0) return NULL;
    const Py_ssize_t n = count(&view);
    Py_BEGIN_ALLOW_THREADS
    if (is_float32)
        moments_1d_float(view.buf, n, out);
    else
        moments_1d_double(view.buf, n, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("(dddd)", out[0], out[1], out[2], out[3]);
}

PyDoc_STRVAR(histogram_1d_doc,
"histogram_1d(x, low, high, counts)\n\n"
"Add the counts of x (float32 or float64) in len(counts) equal bins over [low, high] (the\n"
"last bin closed) into counts (float64), without the GIL; other values are not counted.");

static PyObject *histogram_1d(PyObject *self, PyObject *args)
{
    PyObject *x_object, *counts_object;
    double low, high;
    Py_buffer views[2];
    int is_float32 = 0;
    if (!PyArg_ParseTuple(args, "OddO", &x_object, &low, &high, &counts_object)) return NULL;
    if (get_buffer(x_object, &views[0], "x", 0, FLOAT32_OR_64, &is_float32) < 0) return NULL;
    if (get_buffer(counts_object, &views[1], "counts", 1, FLOAT64, NULL) < 0) {
        release(views, 1);
        return NULL;
    }
    const Py_ssize_t n = count(&views[0]), n_bins = count(&views[1]);
    if (n_bins < 1 || !(high >= low))
        return size_error(views, 2, "need at least one bin and low <= high");
    Py_BEGIN_ALLOW_THREADS
    if (is_float32)
        histogram_1d_float(views[0].buf, n, low, high, n_bins, views[1].buf);
    else
        histogram_1d_double(views[0].buf, n, low, high, n_bins, views[1].buf);
    Py_END_ALLOW_THREADS
    release(views, 2);
    Py_RETURN_NONE;
}

/* A buffer of obj with ndim axes of the given type: 'B' uint8, '?' bool (or uint8), 'f'
 * float32, 'd' float64, 'q' int64; C-contiguous unless strided is set (an output that may be
 * a view). Sets a Python error and returns -1 otherwise. */
static int get_array(PyObject *obj, Py_buffer *view, const char *name, char type, int ndim,
                     int writable, int strided)
{
    int flags = (strided ? PyBUF_STRIDES : PyBUF_C_CONTIGUOUS) | PyBUF_FORMAT |
                (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *format = view->format ? view->format : "B";
    if (format[0] == '@' || format[0] == '=' || format[0] == '<') format++;
    char got = format[0] != '\0' && format[1] == '\0' ? format[0] : '\0';
    int ok;
    switch (type) {
    case '?': ok = (got == '?' || got == 'B') && view->itemsize == 1; break;
    case 'q': ok = (got == 'q' || got == 'l') && view->itemsize == 8; break;
    default: ok = got == type;
    }
    if (!ok || view->ndim != ndim) {
        PyErr_Format(PyExc_TypeError, "%s: expected a %d-D %s array with format '%c', got %d-D '%s'",
                     name, ndim, strided ? "strided" : "contiguous", type, view->ndim,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int has_shape(const Py_buffer *view, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c,
                     Py_ssize_t d)
{
    const Py_ssize_t want[4] = {a, b, c, d};
    for (int axis = 0; axis < view->ndim; axis++)
        if (view->shape[axis] != want[axis]) return 0;
    return 1;
}

static struct strided as_strided(const Py_buffer *view)
{
    struct strided s = {view->buf, count(view), {1, 1, 1, 1}, {0, 0, 0, 0}};
    for (int axis = 0; axis < view->ndim; axis++) {
        s.shape[axis] = view->shape[axis];
        s.strides[axis] = view->strides[axis];
    }
    return s;
}

PyDoc_STRVAR(mean_field_rows_doc,
"mean_field_rows(previous, corrected, mask, offsets, offset_weights, means, precisions_chol,\n"
"                log_norm, log_weights, prior_scale, i0, i1, j0, j1, mode, skip_settled,\n"
"                state_out, final_out, labels_out, counts)\n\n"
"One mean-field sweep of the MRF posterior over the rows [i0:i1, j0:j1] of a 3-D block of\n"
"n0 x n1 x n2 voxels, without the GIL; see segment._kernels.mean_field_rows for the arguments\n"
"and segment._kernels._numpy_mean_field_rows for the numpy twin.\n"
"previous: (n0, n1, n2, S >= K) uint8; corrected: (i1 - i0, j1 - j0, n2, D) float32; mask:\n"
"(n0, n1, n2) bool; offsets: (M, 3) int64; offset_weights: (M,); means: (K, D);\n"
"precisions_chol: (K, D, D); log_norm, log_weights: (K,), all float64 and C-contiguous.\n"
"mode: 0 state (state_out (n0, n1, n2, K + 1) uint8), 1 final (final_out (n0, n1, n2, K)\n"
"float32, labels_out (n0, n1, n2) uint8), 3 final reversed ((n2, n1, n0, K) and (n2, n1,\n"
"n0)), 2 final by component ((K, i1 - i0, n1, n2) and (i1 - i0, n1, n2)); outputs of size 1\n"
"are not written, and may be strided views. counts: (K,) float64, added to.");

#define N_SWEEP_BUFFERS 13

static PyObject *mean_field_rows(PyObject *self, PyObject *args)
{
    PyObject *o[N_SWEEP_BUFFERS];
    Py_buffer views[N_SWEEP_BUFFERS];
    struct sweep p;
    int n = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOdnnnninOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &o[7], &o[8], &p.prior_scale, &p.i0, &p.i1, &p.j0, &p.j1,
                          &p.mode, &p.skip_settled, &o[9], &o[10], &o[11], &o[12]))
        return NULL;
    static const char *names[N_SWEEP_BUFFERS] = {
        "previous", "corrected", "mask", "offsets", "offset_weights", "means", "precisions_chol",
        "log_norm", "log_weights", "state_out", "final_out", "labels_out", "counts"};
    static const char types[N_SWEEP_BUFFERS] = {'B', 'f', '?', 'q', 'd', 'd', 'd',
                                                'd', 'd', 'B', 'f', 'B', 'd'};
    static const int ndims[N_SWEEP_BUFFERS] = {4, 4, 3, 2, 1, 2, 3, 1, 1, 4, 4, 3, 1};
    for (; n < N_SWEEP_BUFFERS; n++) {
        if (get_array(o[n], &views[n], names[n], types[n], ndims[n], n >= 9, n >= 9 && n < 12) <
            0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_buffer *previous = &views[0], *mask = &views[2];
    p.n0 = mask->shape[0];
    p.n1 = mask->shape[1];
    p.n2 = mask->shape[2];
    p.n_slots = previous->shape[3];
    const Py_ssize_t n_offsets = views[3].shape[0];
    p.K = views[5].shape[0];
    p.D = views[5].shape[1];
    p.skip_settled = p.skip_settled && p.mode == STATE && p.prior_scale > 0;
    const Py_ssize_t K = p.K, D = p.D, ni = p.i1 - p.i0;
    if (!has_shape(previous, p.n0, p.n1, p.n2, p.n_slots) || p.n_slots < K + p.skip_settled)
        return size_error(views, n, "previous needs the mask's shape and K (+ 1) slots");
    if (!(0 <= p.i0 && p.i0 <= p.i1 && p.i1 <= p.n0 && 0 <= p.j0 && p.j0 <= p.j1 && p.j1 <= p.n1))
        return size_error(views, n, "need 0 <= i0 <= i1 <= n0 and 0 <= j0 <= j1 <= n1");
    if (!has_shape(&views[1], ni, p.j1 - p.j0, p.n2, D))
        return size_error(views, n, "corrected needs the shape (i1 - i0, j1 - j0, n2, D)");
    if (views[3].shape[1] != 3 || views[4].shape[0] != n_offsets)
        return size_error(views, n, "offsets need the shape (M, 3) and offset_weights (M,)");
    if (K < 1 || !has_shape(&views[6], K, D, D, 0) || views[7].shape[0] != K ||
        views[8].shape[0] != K || views[12].shape[0] != K)
        return size_error(views, n, "inconsistent sizes of the parameters and counts");
    if (p.mode < STATE || p.mode > FINAL_REVERSED)
        return size_error(views, n, "mode must be 0 (state), 1, 2 or 3 (final)");
    p.state = as_strided(&views[9]);
    p.final = as_strided(&views[10]);
    p.labels = as_strided(&views[11]);
    if (p.mode == STATE) {
        if (!has_shape(&views[9], p.n0, p.n1, p.n2, K + 1))
            return size_error(views, n, "state_out needs the shape (n0, n1, n2, K + 1)");
        p.final.size = p.labels.size = 0;
    } else {
        int maps_ok, labels_ok;
        if (p.mode == FINAL) {
            maps_ok = has_shape(&views[10], p.n0, p.n1, p.n2, K);
            labels_ok = has_shape(&views[11], p.n0, p.n1, p.n2, 0);
        } else if (p.mode == FINAL_REVERSED) {
            maps_ok = has_shape(&views[10], p.n2, p.n1, p.n0, K);
            labels_ok = has_shape(&views[11], p.n2, p.n1, p.n0, 0);
        } else {
            maps_ok = has_shape(&views[10], K, ni, p.n1, p.n2);
            labels_ok = has_shape(&views[11], ni, p.n1, p.n2, 0);
        }
        if ((p.final.size > 1 && !maps_ok) || (p.labels.size > 1 && !labels_ok))
            return size_error(views, n, "final_out or labels_out has the wrong shape for mode");
    }
    p.previous = previous->buf;
    p.corrected = views[1].buf;
    p.mask = mask->buf;
    p.means = views[5].buf;
    p.precisions_chol = views[6].buf;
    p.log_norm = views[7].buf;
    p.log_weights = views[8].buf;
    p.counts = views[12].buf;
    double *work = PyMem_RawMalloc(((size_t)(p.n_slots + D + 3 * K + 3) * (p.n2 + 1) +
                                    (size_t)(5 * n_offsets + 1)) * sizeof(double));
    if (work == NULL) {
        release(views, n);
        return PyErr_NoMemory();
    }
    /* the groups after the loop's buffers: (G, 2) int64 and (G, 3) float32, G <= M */
    int64_t *groups = (int64_t *)(work + (size_t)(p.n_slots + D + 3 * K + 3) * (p.n2 + 1));
    float *taps = (float *)(groups + 2 * n_offsets);
    p.n_groups = offset_groups(views[3].buf, views[4].buf, n_offsets, groups, taps);
    p.groups = groups;
    p.taps = taps;
    if (p.n_groups < 0) {
        PyMem_RawFree(work);
        return size_error(views, n, "offsets: the last coordinate must be -1, 0 or 1");
    }
    Py_BEGIN_ALLOW_THREADS
    mean_field_rows_run(&p, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(exp_nonpositive_doc,
"exp_nonpositive(t, out)\n\n"
"out[i] = exp(max(t[i], -708)) for t[i] <= 0, by the kernels' own exponential (for tests).\n"
"t and out: float64 arrays of one length.");

static PyObject *exp_nonpositive_py(PyObject *self, PyObject *args)
{
    PyObject *t_object, *out_object;
    Py_buffer views[2];
    if (!PyArg_UnpackTuple(args, "exp_nonpositive", 2, 2, &t_object, &out_object)) return NULL;
    if (get_buffer(t_object, &views[0], "t", 0, FLOAT64, NULL) < 0) return NULL;
    if (get_buffer(out_object, &views[1], "out", 1, FLOAT64, NULL) < 0) {
        release(views, 1);
        return NULL;
    }
    if (count(&views[0]) != count(&views[1]))
        return size_error(views, 2, "t and out need the same length");
    const double *t = views[0].buf;
    double *out = views[1].buf;
    const int64_t round_bits = bits_of(ROUND);
    for (Py_ssize_t i = 0; i < count(&views[0]); i++) out[i] = exp_nonpositive(t[i], round_bits);
    release(views, 2);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(interpolate_field_doc,
"interpolate_field(coarse, low0, w0, low1, w1, low2, w2, out, reverse)\n\n"
"Separable linear interpolation of a coarse 3-D grid at the voxels of a block, without the\n"
"GIL; see segment._kernels.interpolate_field for the arguments and\n"
"segment._kernels._numpy_interpolate_field for the numpy twin.\n"
"coarse: (c0, c1, c2, D) float64; low_a: (n_a,) int64 in [0, c_a - 2]; w_a: (n_a, 2)\n"
"float64; out: (n0, n1, n2, D) float32, or (n2, n1, n0, D) when reverse is true.");

static PyObject *interpolate_field(PyObject *self, PyObject *args)
{
    PyObject *o[8];
    Py_buffer views[8];
    int reverse, n = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOOOp", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &reverse))
        return NULL;
    static const char *names[8] = {"coarse", "low0", "w0", "low1", "w1", "low2", "w2", "out"};
    static const char types[8] = {'d', 'q', 'd', 'q', 'd', 'q', 'd', 'f'};
    static const int ndims[8] = {4, 1, 2, 1, 2, 1, 2, 4};
    for (; n < 8; n++) {
        if (get_array(o[n], &views[n], names[n], types[n], ndims[n], n == 7, 0) < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_buffer *coarse = &views[0];
    const Py_ssize_t D = coarse->shape[3];
    const int64_t *low[3];
    const double *w[3];
    Py_ssize_t shape[3];
    for (int axis = 0; axis < 3; axis++) {
        const Py_buffer *lv = &views[1 + 2 * axis], *wv = &views[2 + 2 * axis];
        shape[axis] = lv->shape[0];
        if (wv->shape[0] != shape[axis] || wv->shape[1] != 2)
            return size_error(views, n, "each w_a needs the shape (len(low_a), 2)");
        if (coarse->shape[axis] < 2)
            return size_error(views, n, "coarse needs at least 2 cells per axis");
        low[axis] = lv->buf;
        w[axis] = wv->buf;
        for (Py_ssize_t i = 0; i < shape[axis]; i++)
            if (low[axis][i] < 0 || low[axis][i] > coarse->shape[axis] - 2)
                return size_error(views, n, "low_a must be in [0, c_a - 2]");
    }
    const int ok = reverse ? has_shape(&views[7], shape[2], shape[1], shape[0], D)
                           : has_shape(&views[7], shape[0], shape[1], shape[2], D);
    if (!ok)
        return size_error(views, n, "out needs the shape (n0, n1, n2, D), reversed if asked");
    const size_t row = (size_t)coarse->shape[2] * (size_t)D;
    const size_t plane = (size_t)coarse->shape[1] * row;
    double *work = PyMem_RawMalloc(((size_t)shape[0] * (plane + row) + 1) * sizeof(double));
    if (work == NULL) {
        release(views, n);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    interpolate_field_run(coarse->buf, coarse->shape[1], coarse->shape[2], D, low, w, shape,
                          views[7].buf, reverse, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(table_fractions_doc,
"table_fractions(x, values, slopes, x0, step, posterior, floor, out)\n\n"
"Partial-volume fractions of one channel from a tabulated model, with the MRF prior, without\n"
"the GIL; see segment._kernels.table_fractions for the arguments and\n"
"segment._kernels._numpy_table_fractions for the numpy twin.\n"
"x: (N,) float64; values, slopes: (2 K - 1 + K - 1, n) float64 with n >= 1; x0, step > 0:\n"
"floats; posterior: (N, K) float32 or float64, or (0, K) for no prior; out: (N, K) float32.");

static PyObject *table_fractions(PyObject *self, PyObject *args)
{
    PyObject *o[5];
    Py_buffer views[5];
    double x0, step, floor_;
    int n = 0;
    if (!PyArg_ParseTuple(args, "OOOddOdO", &o[0], &o[1], &o[2], &x0, &step, &o[3], &floor_,
                          &o[4]))
        return NULL;
    static const char *names[5] = {"x", "values", "slopes", "posterior", "out"};
    static const char types[5] = {'d', 'd', 'd', 'd', 'f'};
    static const int ndims[5] = {1, 2, 2, 2, 2};
    int q_float32 = 0;
    for (; n < 5; n++) {
        int status;
        if (n == 3) { /* float32 or float64 */
            status = get_array(o[n], &views[n], names[n], 'f', 2, 0, 0);
            q_float32 = status == 0;
            if (status < 0) {
                PyErr_Clear();
                status = get_array(o[n], &views[n], names[n], 'd', 2, 0, 0);
            }
        } else {
            status = get_array(o[n], &views[n], names[n], types[n], ndims[n], n == 4, 0);
        }
        if (status < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_ssize_t N = views[0].shape[0], K = views[4].shape[1];
    const Py_ssize_t R = views[1].shape[0], n_points = views[1].shape[1];
    if (K < 1 || views[4].shape[0] != N || R != 3 * K - 2 || n_points < 1 ||
        views[2].shape[0] != R || views[2].shape[1] != n_points)
        return size_error(views, n, "values and slopes need 3 K - 2 rows of n points, out (N, K)");
    const Py_ssize_t n_q = views[3].shape[0];
    if ((n_q != 0 && n_q != N) || views[3].shape[1] != K)
        return size_error(views, n, "posterior needs the shape (N, K), or (0, K)");
    if (!(step > 0)) return size_error(views, n, "step must be positive");
    double *work = PyMem_RawMalloc((size_t)(R + K + 3) * BLOCK * sizeof(double));
    if (work == NULL) {
        release(views, n);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (q_float32 || n_q == 0)
        table_fractions_float(views[0].buf, N, views[1].buf, views[2].buf, n_points, R, x0, step,
                              n_q ? views[3].buf : NULL, floor_, K, views[4].buf, work);
    else
        table_fractions_double(views[0].buf, N, views[1].buf, views[2].buf, n_points, R, x0, step,
                               views[3].buf, floor_, K, views[4].buf, work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pve_em_1d_doc,
"pve_em_1d(x, w, f, mu, var, weight, floor, max_iter, tol, trace) -> int\n\n"
"EM of the one-channel mixed-voxel model on weighted samples, without the GIL; see\n"
"segment._kernels.pve_em_1d for the arguments and segment._kernels._numpy_pve_em_1d for the\n"
"numpy twin. x, w: (N,); f: (n_steps,); mu, var: (K,), updated; weight: (2 K - 1,),\n"
"updated; trace: (>= max_iter,), written; all float64. Returns the number of trace values.");

static PyObject *pve_em_1d(PyObject *self, PyObject *args)
{
    PyObject *o[7];
    Py_buffer views[7];
    double floor_, tol;
    Py_ssize_t max_iter;
    int n = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOdndO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &floor_,
                          &max_iter, &tol, &o[6]))
        return NULL;
    static const char *names[7] = {"x", "w", "f", "mu", "var", "weight", "trace"};
    for (; n < 7; n++) {
        if (get_array(o[n], &views[n], names[n], 'd', 1, n >= 3, 0) < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_ssize_t N = views[0].shape[0], n_steps = views[2].shape[0], K = views[3].shape[0];
    if (views[1].shape[0] != N || views[4].shape[0] != K || views[5].shape[0] != 2 * K - 1 ||
        K < 2 || n_steps < 1)
        return size_error(views, n, "need w of len(x), K >= 2 mu and var, 2 K - 1 weights");
    if (max_iter < 0 || views[6].shape[0] < max_iter)
        return size_error(views, n, "trace needs room for max_iter values");
    const Py_ssize_t C = K + (K - 1) * n_steps;
    double *work = PyMem_RawMalloc(((size_t)N * (size_t)C + 4 * (size_t)C + 1) * sizeof(double));
    if (work == NULL) {
        release(views, n);
        return PyErr_NoMemory();
    }
    Py_ssize_t n_trace;
    Py_BEGIN_ALLOW_THREADS
    n_trace = pve_em_1d_run(views[0].buf, views[1].buf, N, views[2].buf, n_steps, views[3].buf,
                            views[4].buf, views[5].buf, K, floor_, max_iter, tol, views[6].buf,
                            work);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(work);
    release(views, n);
    return PyLong_FromSsize_t(n_trace);
}

PyDoc_STRVAR(bias_estep_1d_doc,
"bias_estep_1d(y, log_b, voxels, log_y, usable, cells, means, p, c, log_w, x, b, log_norm,\n"
"              r, sums)\n\n"
"The one-channel E-step under the bias field and the field's cell sums of a block, without\n"
"the GIL; see segment.spatial.bias.em_sampled_block for the numpy reference.\n"
"y, log_y: (n,) float64; log_b: (m,) float32, the block's field; voxels, cells: (n,) int64\n"
"(in [0, m), [0, n_cells)); usable: (n,) bool; means, p, c, log_w: (K,) float64; outputs\n"
"x, b, log_norm: (n,) float64; r: (K, n) float64; sums: (2 K + 1 + 2 K, n_cells) float64,\n"
"added to (the slot 2 K of the voxel counts is not touched).");

static PyObject *bias_estep_1d(PyObject *self, PyObject *args)
{
    PyObject *o[15];
    Py_buffer views[15];
    int n = 0;
    if (!PyArg_UnpackTuple(args, "bias_estep_1d", 15, 15, &o[0], &o[1], &o[2], &o[3], &o[4],
                           &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13],
                           &o[14]))
        return NULL;
    static const char *names[15] = {"y",     "log_b", "voxels", "log_y", "usable",
                                    "cells", "means", "p",      "c",     "log_w",
                                    "x",     "b",     "log_norm", "r",   "sums"};
    static const char types[15] = {'d', 'f', 'q', 'd', '?', 'q', 'd', 'd',
                                   'd', 'd', 'd', 'd', 'd', 'd', 'd'};
    static const int ndims[15] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2};
    for (; n < 15; n++) {
        if (get_array(o[n], &views[n], names[n], types[n], ndims[n], n >= 10, 0) < 0) {
            release(views, n);
            return NULL;
        }
    }
    const Py_ssize_t N = views[0].shape[0], m = views[1].shape[0], K = views[6].shape[0];
    const Py_ssize_t n_cells = views[14].shape[1];
    const Py_ssize_t per_voxel[7] = {3, 4, 5, 10, 11, 12, 2};
    for (int j = 0; j < 7; j++)
        if (views[per_voxel[j]].shape[0] != N)
            return size_error(views, n, "the per-voxel arrays need the length of y");
    if (K < 1 || views[7].shape[0] != K || views[8].shape[0] != K || views[9].shape[0] != K ||
        views[13].shape[0] != K || views[13].shape[1] != N || views[14].shape[0] != 4 * K + 1)
        return size_error(views, n, "need K means, p, c, log_w; r (K, n); sums (4 K + 1, cells)");
    const int64_t *voxels = views[2].buf, *cells = views[5].buf;
    for (Py_ssize_t i = 0; i < N; i++)
        if (voxels[i] < 0 || voxels[i] >= m || cells[i] < 0 || cells[i] >= n_cells)
            return size_error(views, n, "voxels and cells must index log_b and sums");
    Py_BEGIN_ALLOW_THREADS
    bias_estep_1d_run(views[0].buf, N, views[1].buf, voxels, views[3].buf, views[4].buf, cells,
                      n_cells, K, views[6].buf, views[7].buf, views[8].buf, views[9].buf,
                      views[10].buf, views[11].buf, views[12].buf, views[13].buf, views[14].buf);
    Py_END_ALLOW_THREADS
    release(views, n);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"statistics_1d", statistics_1d, METH_VARARGS, statistics_1d_doc},
    {"statistics_nd", statistics_nd, METH_VARARGS, statistics_nd_doc},
    {"moments_1d", moments_1d, METH_VARARGS, moments_1d_doc},
    {"histogram_1d", histogram_1d, METH_VARARGS, histogram_1d_doc},
    {"exp_nonpositive", exp_nonpositive_py, METH_VARARGS, exp_nonpositive_doc},
    {"mean_field_rows", mean_field_rows, METH_VARARGS, mean_field_rows_doc},
    {"interpolate_field", interpolate_field, METH_VARARGS, interpolate_field_doc},
    {"table_fractions", table_fractions, METH_VARARGS, table_fractions_doc},
    {"pve_em_1d", pve_em_1d, METH_VARARGS, pve_em_1d_doc},
    {"bias_estep_1d", bias_estep_1d, METH_VARARGS, bias_estep_1d_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "segment._estep",
    "Compiled E-step statistics of one chunk of voxels (see _estep.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__estep(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 ||
                      PyModule_AddObject(m, "MIN_EXPONENT", PyFloat_FromDouble(MIN_EXPONENT)) < 0 ||
                      PyModule_AddObject(m, "SWEEP_NEGLIGIBLE", PyFloat_FromDouble(SWEEP_NEGLIGIBLE)) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
