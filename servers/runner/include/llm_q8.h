/* Matmuls with 8-bit weights in GGUF's own Q8_0 blocks: 34 bytes, an f16 scale then 32 int8
 * values. A Q8_0 tensor is used where it lies in the memory-mapped file (no copy; every
 * runner shares the page cache); Q4_0 and Q5_0 widen to Q8_0 blocks exactly (same scale,
 * values in a narrower range).
 *
 * Activations are quantised per row into the same blocks, as llama.cpp does for these types
 * (scale amax/127, used rounded to f16; values round-half-even(x / scale)), so a block's dot
 * product is an exact integer. The float part has one fixed order, the same at every SIMD
 * level: 8 lanes, lane l adding, block after block, float(sum of bytes 4l..4l+3's products)
 * times (weight scale * activation scale) in one fused multiply-add (fmaf in the portable
 * code: the same single rounding as the vector instruction); then the lanes add as
 * llm_hsum does. Integer sums are exact in any order, so the portable code, AVX2's
 * maddubs/madd and VNNI's dpbusd give the same lanes and so the same bits; tests check this.
 * A row's result depends on that row alone (batch invariance).
 */
#ifndef LLM_Q8_H
#define LLM_Q8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LLM_QK 32
#define LLM_Q8_BLOCK 34  /* bytes: f16 scale, 32 int8 */

/* An f16 value, exactly, as a float. */
static inline float llm_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {             /* zero or subnormal: man * 2**-24, exact in float */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static inline float llm_q8_scale(const uint8_t *block) {
    uint16_t h;
    memcpy(&h, block, 2);
    return llm_f16_to_f32(h);
}

/* x rounded to the nearest half-precision value (ties to even), back in float. */
static inline float llm_round_f16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    if (a >= 0x477ff000u) {            /* rounds to >= 65520: inf (or stays NaN/inf) */
        u = a > 0x7f800000u ? u : sign | 0x7f800000u;
    } else if (a < 0x38800000u) {      /* f16 subnormal range: multiples of 2**-24 */
        const float t = nearbyintf(fabsf(x) * 16777216.0f) / 16777216.0f;
        memcpy(&u, &t, 4);
        u |= sign;
    } else {                           /* normal: keep 10 of 23 mantissa bits, ties to even */
        const uint32_t lsb = (a >> 13) & 1u;
        u = sign | ((a + 0x0fffu + lsb) & ~0x1fffu);
    }
    memcpy(&x, &u, 4);
    return x;
}

/* One row of n floats (n a multiple of 32) -> q[n], d[n / 32], and each block's sum of q
   in sums[n / 32] (the min term of llm_q8s.h's blocks needs it). */
static void llm_quantize_row_q8(const float *x, int n, int8_t *q, float *d, int32_t *sums) {
    for (int b = 0; b < n / LLM_QK; b++) {
        const float *xb = x + b * LLM_QK;
        float amax = 0.0f;
        for (int i = 0; i < LLM_QK; i++) {
            const float v = fabsf(xb[i]);
            amax = v > amax ? v : amax;
        }
        const float scale = amax / 127.0f;
        const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;  /* as llama.cpp's x86 code */
        int32_t sum = 0;
        for (int i = 0; i < LLM_QK; i++) {
            q[b * LLM_QK + i] = (int8_t)nearbyintf(xb[i] * inv);
            sum += q[b * LLM_QK + i];
        }
        d[b] = llm_round_f16(scale);
        sums[b] = sum;
    }
}

/* The fixed end of every row's sum: lanes 0-3 plus 4-7, then a pairwise tree. */
static inline float llm_q8_finish(const float acc[8]) {
    const float s0 = acc[0] + acc[4], s1 = acc[1] + acc[5], s2 = acc[2] + acc[6], s3 = acc[3] + acc[7];
    return (s0 + s1) + (s2 + s3);
}

/* out[r*os + j] = row r of (xq, xd) . row j of the Q8_0 matrix w, for r < n_rows,
   j < n_out; a weight row is n_in / 32 blocks. */
static void llm_matmul_q8_portable(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                                   int n_rows, int n_in, const uint8_t *w, int n_out)
{
    const int nb = n_in / LLM_QK;
    for (int r = 0; r < n_rows; r++) {
        const int8_t *x = xq + (Py_ssize_t)r * n_in;
        const float *dx = xd + (Py_ssize_t)r * nb;
        for (int j = 0; j < n_out; j++) {
            const uint8_t *wj = w + (Py_ssize_t)j * nb * LLM_Q8_BLOCK;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = wj + (Py_ssize_t)b * LLM_Q8_BLOCK;
                const float s = llm_q8_scale(blk) * dx[b];
                for (int l = 0; l < 8; l++) {
                    const int8_t *wl = (const int8_t *)(blk + 2) + 4 * l, *xl = x + b * LLM_QK + 4 * l;
                    const int isum = wl[0] * xl[0] + wl[1] * xl[1] + wl[2] * xl[2] + wl[3] * xl[3];
                    acc[l] = fmaf((float)isum, s, acc[l]);
                }
            }
            out[(Py_ssize_t)r * os + j] = llm_q8_finish(acc);
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LLM_HAVE_Q8_X86 1

/* Tiles of four rows by two outputs: each weight block's load and absolute value serve four
   rows, each activation block's load two outputs. The sign of each weight moves onto the
   activation, so maddubs (u8 x s8) or dpbusd sums exact products. An odd last output runs
   as its own pair (its twin's sums are computed and dropped). Each output's sums are the
   same operations in the same order whatever its tile: the bits do not depend on tiling. */
/* One tile: `rows` (1-4, a constant where it is inlined, so the accumulators stay in
   registers) by two outputs starting at w0 (w1: the second output's row, or w0 again). */
#define LLM_Q8_TILE(NAME, DOT4, TARGET)                                                        \
    __attribute__((target(TARGET), always_inline)) static inline void NAME(                   \
        float *out, Py_ssize_t os, const int8_t *xq, const float *xd, int n_in,               \
        const uint8_t *w0, const uint8_t *w1, int outs, const int rows)                       \
    {                                                                                          \
        const int nb = n_in / LLM_QK;                                                          \
        __m256 acc[4][2];                                                                      \
        for (int k = 0; k < rows; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();            \
        for (int b = 0; b < nb; b++) {                                                         \
            const uint8_t *b0 = w0 + (Py_ssize_t)b * LLM_Q8_BLOCK;                             \
            const uint8_t *b1 = w1 + (Py_ssize_t)b * LLM_Q8_BLOCK;                             \
            uint16_t h0, h1;                                                                   \
            memcpy(&h0, b0, 2);                                                                \
            memcpy(&h1, b1, 2);                                                                \
            const float d0 = _cvtsh_ss(h0), d1 = _cvtsh_ss(h1); /* F16C: exact */              \
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(b0 + 2));                  \
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(b1 + 2));                  \
            const __m256i a0 = _mm256_sign_epi8(v0, v0), a1 = _mm256_sign_epi8(v1, v1);        \
            const __m256 s0 = _mm256_set1_ps(d0), s1 = _mm256_set1_ps(d1);                     \
            for (int k = 0; k < rows; k++) {                                                   \
                const __m256i xv = _mm256_loadu_si256(                                         \
                    (const __m256i *)(xq + (Py_ssize_t)k * n_in + b * LLM_QK));                \
                const __m256 dx = _mm256_set1_ps(xd[(Py_ssize_t)k * nb + b]);                  \
                const __m256i l0 = DOT4(a0, _mm256_sign_epi8(xv, v0));                         \
                const __m256i l1 = DOT4(a1, _mm256_sign_epi8(xv, v1));                         \
                acc[k][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l0), _mm256_mul_ps(s0, dx), acc[k][0]); \
                acc[k][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l1), _mm256_mul_ps(s1, dx), acc[k][1]); \
            }                                                                                  \
        }                                                                                      \
        for (int k = 0; k < rows; k++)                                                         \
            for (int o = 0; o < outs; o++) {                                                   \
                float lane[8];                                                                 \
                _mm256_storeu_ps(lane, acc[k][o]);                                             \
                out[(Py_ssize_t)k * os + o] = llm_q8_finish(lane);                             \
            }                                                                                  \
    }

/* Tiles of four rows by two outputs: each weight block's load and absolute value serve four
   rows, each activation block's load two outputs. The sign of each weight moves onto the
   activation, so maddubs (u8 x s8) or dpbusd sums exact products. An odd last output runs
   as its own pair (its twin's sums are computed and dropped). Each output's sums are the
   same operations in the same order whatever its tile: the bits do not depend on tiling. */
#define LLM_Q8_BODY(TILE)                                                                      \
    const int nb = n_in / LLM_QK;                                                              \
    const Py_ssize_t row_bytes = (Py_ssize_t)nb * LLM_Q8_BLOCK;                                \
    for (int r = 0; r < n_rows; r += 4) {                                                      \
        const int rows = n_rows - r < 4 ? n_rows - r : 4;                                      \
        const int8_t *x = xq + (Py_ssize_t)r * n_in;                                           \
        const float *d = xd + (Py_ssize_t)r * nb;                                              \
        for (int j = 0; j < n_out; j += 2) {                                                   \
            const int outs = n_out - j < 2 ? n_out - j : 2;                                    \
            const uint8_t *w0 = w + (Py_ssize_t)j * row_bytes;                                 \
            const uint8_t *w1 = outs == 2 ? w0 + row_bytes : w0;                               \
            float *o = out + (Py_ssize_t)r * os + j;                                           \
            switch (rows) {                                                                    \
            case 4: TILE(o, os, x, d, n_in, w0, w1, outs, 4); break;                           \
            case 3: TILE(o, os, x, d, n_in, w0, w1, outs, 3); break;                           \
            case 2: TILE(o, os, x, d, n_in, w0, w1, outs, 2); break;                           \
            default: TILE(o, os, x, d, n_in, w0, w1, outs, 1);                                 \
            }                                                                                  \
        }                                                                                      \
    }

__attribute__((target("avx2,fma,f16c")))
static inline __m256i llm_dot4_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

__attribute__((target("avxvnni,fma,f16c")))
static inline __m256i llm_dot4_vnni(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
}

LLM_Q8_TILE(llm_q8_tile_avx2, llm_dot4_avx2, "avx2,fma,f16c")
LLM_Q8_TILE(llm_q8_tile_vnni, llm_dot4_vnni, "avxvnni,fma,f16c")

__attribute__((target("avx2,fma,f16c")))
static void llm_matmul_q8_avx2(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                               int n_rows, int n_in, const uint8_t *w, int n_out)
{
    LLM_Q8_BODY(llm_q8_tile_avx2)
}

__attribute__((target("avxvnni,fma,f16c")))
static void llm_matmul_q8_vnni(float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                               int n_rows, int n_in, const uint8_t *w, int n_out)
{
    LLM_Q8_BODY(llm_q8_tile_vnni)
}
#endif

/* level: 0-1 portable, 2 AVX2 + FMA + F16C, 3 AVX-VNNI + FMA + F16C (the caller checked the CPU). */
static void llm_matmul_q8(int level, float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                          int n_rows, int n_in, const uint8_t *w, int n_out)
{
#ifdef LLM_HAVE_Q8_X86
    if (level >= 3) { llm_matmul_q8_vnni(out, os, xq, xd, n_rows, n_in, w, n_out); return; }
    if (level == 2) { llm_matmul_q8_avx2(out, os, xq, xd, n_rows, n_in, w, n_out); return; }
#endif
    llm_matmul_q8_portable(out, os, xq, xd, n_rows, n_in, w, n_out);
}

/* One row of a Q8_0 matrix back to floats (the embedding lookup): exact. */
static void llm_dequantize_row_q8(const uint8_t *w, int n, float *out) {
    for (int b = 0; b < n / LLM_QK; b++) {
        const uint8_t *blk = w + (Py_ssize_t)b * LLM_Q8_BLOCK;
        const float d = llm_q8_scale(blk);
        for (int i = 0; i < LLM_QK; i++) out[b * LLM_QK + i] = d * (float)((const int8_t *)(blk + 2))[i];
    }
}

#endif
