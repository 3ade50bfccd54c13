/* Matmuls with the K-quant family (Q4_K, Q5_K, Q6_K) and Q4_1/Q5_1 weights, widened exactly at
 * load into "Q8S" blocks of 44 bytes: float scales for values 0-15 and 16-31, a float min,
 * then 32 int8 values; value i is scale * q[i] - min. Every one of those formats is such a
 * block: Q4_K/Q5_K sub-blocks of 32 have one scale (d * sc, exact in float) and a min
 * (dmin * m); Q6_K's sub-blocks of 16 have a scale each and no min; Q4_1/Q5_1 one scale and
 * an added min.
 *
 * Activations are llm_q8.h's blocks (with their sums). The fixed order, the same at every
 * SIMD level: lane l of 8 adds, block after block, float(sum of bytes 4l..4l+3's products)
 * times (its half's scale * activation scale), in one fused multiply-add as llm_q8.h's; a
 * separate sum adds, block after block, (min * activation scale) * float(the activation
 * block's sum), multiply then add; the result is the lanes' llm_q8_finish minus that sum.
 */
#ifndef LLM_Q8S_H
#define LLM_Q8S_H

#include "llm_q8.h"

#define LLM_Q8S_BLOCK 44  /* bytes: float scale_lo, scale_hi, min; 32 int8 */

static inline void llm_q8s_head(const uint8_t *blk, float *lo, float *hi, float *mn) {
    memcpy(lo, blk, 4);
    memcpy(hi, blk + 4, 4);
    memcpy(mn, blk + 8, 4);
}

static void llm_matmul_q8s_portable(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                                    const int32_t *xs, int n_rows, int n_in, const uint8_t *w,
                                    int n_out)
{
    const int nb = n_in / LLM_QK;
    for (int r = 0; r < n_rows; r++) {
        const int8_t *x = xq + (Py_ssize_t)r * n_in;
        const float *dx = xd + (Py_ssize_t)r * nb;
        const int32_t *sx = xs + (Py_ssize_t)r * nb;
        for (int j = 0; j < n_out; j++) {
            const uint8_t *wj = w + (Py_ssize_t)j * nb * LLM_Q8S_BLOCK;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, mins = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = wj + (Py_ssize_t)b * LLM_Q8S_BLOCK;
                float lo, hi, mn;
                llm_q8s_head(blk, &lo, &hi, &mn);
                const float s_lo = lo * dx[b], s_hi = hi * dx[b];
                for (int l = 0; l < 8; l++) {
                    const int8_t *wl = (const int8_t *)(blk + 12) + 4 * l, *xl = x + b * LLM_QK + 4 * l;
                    const int isum = wl[0] * xl[0] + wl[1] * xl[1] + wl[2] * xl[2] + wl[3] * xl[3];
                    acc[l] = fmaf((float)isum, l < 4 ? s_lo : s_hi, acc[l]);
                }
                mins = mins + (mn * dx[b]) * (float)sx[b];
            }
            out[(Py_ssize_t)r * os + j] = llm_q8_finish(acc) - mins;
        }
    }
}

#ifdef LLM_HAVE_Q8_X86
#define LLM_Q8S_BODY(DOT4)                                                                     \
    const int nb = n_in / LLM_QK;                                                              \
    for (int r = 0; r < n_rows; r += 4) {                                                      \
        const int rows = n_rows - r < 4 ? n_rows - r : 4;                                      \
        for (int j = 0; j < n_out; j++) {                                                      \
            const uint8_t *wj = w + (Py_ssize_t)j * nb * LLM_Q8S_BLOCK;                        \
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),    \
                             _mm256_setzero_ps()};                                             \
            float mins[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                          \
            for (int b = 0; b < nb; b++) {                                                     \
                const uint8_t *blk = wj + (Py_ssize_t)b * LLM_Q8S_BLOCK;                       \
                float lo, hi, mn;                                                              \
                llm_q8s_head(blk, &lo, &hi, &mn);                                              \
                const __m256 halves = _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi);          \
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 12));            \
                const __m256i aw = _mm256_sign_epi8(wv, wv);                                   \
                for (int k = 0; k < rows; k++) {                                               \
                    const Py_ssize_t row = (Py_ssize_t)(r + k);                                \
                    const __m256i xv = _mm256_loadu_si256(                                     \
                        (const __m256i *)(xq + row * n_in + b * LLM_QK));                      \
                    const __m256i lanes = DOT4(aw, _mm256_sign_epi8(xv, wv));                  \
                    const float d = xd[row * nb + b];                                          \
                    const __m256 s = _mm256_mul_ps(halves, _mm256_set1_ps(d));                 \
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), s, acc[k]);             \
                    mins[k] = mins[k] + (mn * d) * (float)xs[row * nb + b];                    \
                }                                                                              \
            }                                                                                  \
            for (int k = 0; k < rows; k++) {                                                   \
                float lane[8];                                                                 \
                _mm256_storeu_ps(lane, acc[k]);                                                \
                out[(Py_ssize_t)(r + k) * os + j] = llm_q8_finish(lane) - mins[k];             \
            }                                                                                  \
        }                                                                                      \
    }

__attribute__((target("avx2,fma,f16c")))
static void llm_matmul_q8s_avx2(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                                const int32_t *xs, int n_rows, int n_in, const uint8_t *w, int n_out)
{
    LLM_Q8S_BODY(llm_dot4_avx2)
}

__attribute__((target("avxvnni,fma,f16c")))
static void llm_matmul_q8s_vnni(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                                const int32_t *xs, int n_rows, int n_in, const uint8_t *w, int n_out)
{
    LLM_Q8S_BODY(llm_dot4_vnni)
}
#endif

static void llm_matmul_q8s(int level, float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                           const int32_t *xs, int n_rows, int n_in, const uint8_t *w, int n_out)
{
#ifdef LLM_HAVE_Q8_X86
    if (level >= 3) { llm_matmul_q8s_vnni(out, os, xq, xd, xs, n_rows, n_in, w, n_out); return; }
    if (level == 2) { llm_matmul_q8s_avx2(out, os, xq, xd, xs, n_rows, n_in, w, n_out); return; }
#endif
    llm_matmul_q8s_portable(out, os, xq, xd, xs, n_rows, n_in, w, n_out);
}

/* One row of a Q8S matrix back to floats (the embedding lookup): scale * q - min. */
static void llm_dequantize_row_q8s(const uint8_t *w, int n, float *out) {
    for (int b = 0; b < n / LLM_QK; b++) {
        const uint8_t *blk = w + (Py_ssize_t)b * LLM_Q8S_BLOCK;
        float lo, hi, mn;
        llm_q8s_head(blk, &lo, &hi, &mn);
        const int8_t *q = (const int8_t *)(blk + 12);
        for (int i = 0; i < LLM_QK; i++) out[b * LLM_QK + i] = (i < 16 ? lo : hi) * (float)q[i] - mn;
    }
}

#endif
