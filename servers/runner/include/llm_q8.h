/* 8-bit weights and activations: the packed weight layouts, the activations' blocks, and
 * rows of a packed matrix back to floats. The matmuls are in llm_q8_gemm.h.
 *
 * Weights (servers/runner/q8.py packs them at load, exactly):
 * - Q8_0 (GGUF's Q8_0; Q4_0 and Q5_0 widen to it: same scale, narrower values): a value is
 *   scale * q, one f16 scale per block of 32.
 * - Q8S (the K-quants and Q4_1/Q5_1): a value is (scale_lo for values 0-15, scale_hi for
 *   16-31) * q - min, float scales and min per block of 32.
 * Both are packed in groups of 16 output rows (the last group padded with zeros), block by
 * block: a group-block is a head of floats, 16 per field (Q8_0: the scales; Q8S: scale_lo,
 * scale_hi, min), then 8 rows of 64 bytes, row t holding values 4t..4t+3 of each of the 16
 * outputs in turn, each stored as q + 128 (unsigned). One vector load then holds 4 values of
 * 16 (or 8) outputs, and one dpbusd against 4 activation bytes broadcast adds each output's
 * products into its own lane: a lane ends a block holding that output's whole integer sum.
 *
 * Activations are quantised per row as llama.cpp quantises them for the same weights, so the
 * integer sums are llama.cpp's: blocks of 32 (scale amax/127, used rounded to f16; values
 * round-half-even(x / scale)) for Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1; blocks of 256 with a float
 * scale for the K-quants (its Q8_K). Values are in -127..127; each block's sums are kept, as
 * the kernels use them (llm_act_sums).
 */
#ifndef LLM_Q8_H
#define LLM_Q8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LLM_QK 32            /* values per block */
#define LLM_GROUP 16         /* output rows per packed group */
#define LLM_PACKED_VALUES 512 /* 8 rows of 16 outputs x 4 values */
#define LLM_Q8P_HEAD 64      /* Q8_0: 16 float scales */
#define LLM_Q8SP_HEAD 192    /* Q8S: 16 scale_lo, 16 scale_hi, 16 min */
#define LLM_Q8P_BLOCK (LLM_Q8P_HEAD + LLM_PACKED_VALUES)
#define LLM_Q8SP_BLOCK (LLM_Q8SP_HEAD + LLM_PACKED_VALUES)

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

/* x rounded to the nearest integer, ties to even, for |x| <= 2**22: adding 1.5 * 2**23 leaves
   no fraction bits, so the float addition itself rounds (as llama.cpp's nearest_int). Plain
   float operations, unlike a call to nearbyintf, so the loops below vectorise (setup.py
   builds with -ffp-contract=off: no multiply before it is fused into the addition). */
static inline float llm_round_even(float x) {
    return (x + 12582912.0f) - 12582912.0f;
}

/* What the kernels need of an activation block's sums, ready to broadcast: the +128 of the
   packed weights adds 128 * sum(x) to a dot product, so an integer sum starts at `all` (or at
   `lo`, `hi` for the halves); a Q8S block's min term is min * dsum. */
typedef struct {
    int32_t all, lo, hi;  /* -128 * the sum of the block's values, of values 0-15, of 16-31 */
    float dsum;           /* the block's scale * float(the sum of its values) */
} llm_act_sums;

static inline void llm_set_sums(llm_act_sums *a, int32_t lo, int32_t hi, float d) {
    a->all = -128 * (lo + hi);
    a->lo = -128 * lo;
    a->hi = -128 * hi;
    a->dsum = d * (float)(lo + hi);
}

/* One row of n floats (n a multiple of 32) -> q[n], d[n / 32] and sums[n / 32]. */
static void llm_quantize_row_q8(const float *x, int n, int8_t *q, float *d, llm_act_sums *sums) {
    for (int b = 0; b < n / LLM_QK; b++) {
        const float *xb = x + b * LLM_QK;
        float amax = 0.0f;
        for (int i = 0; i < LLM_QK; i++) {
            const float v = fabsf(xb[i]);
            amax = v > amax ? v : amax;
        }
        const float scale = amax / 127.0f;
        const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;  /* as llama.cpp's x86 code */
        int32_t sum[2] = {0, 0};
        for (int i = 0; i < LLM_QK; i++) {
            q[b * LLM_QK + i] = (int8_t)llm_round_even(xb[i] * inv);
            sum[i / 16] += q[b * LLM_QK + i];
        }
        d[b] = llm_round_f16(scale);
        llm_set_sums(&sums[b], sum[0], sum[1], d[b]);
    }
}

/* The same for K-quant weights, as llama.cpp quantises activations for them (its Q8_K):
   blocks of 256 with one float scale, from the value of largest magnitude m: iscale =
   -127 / m, values nearest(iscale * x) (ties to even), scale 1 / iscale. n is a multiple of
   256 (a K-quant's rows are); d gets the scale once per block of 32, like the others. */
static void llm_quantize_row_q8k(const float *x, int n, int8_t *q, float *d, llm_act_sums *sums) {
    for (int s = 0; s < n / 256; s++) {
        const float *xs = x + s * 256;
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < 256; i++) {
            const float a = fabsf(xs[i]);
            if (a > amax) { amax = a; max = xs[i]; }
        }
        const float iscale = amax != 0.0f ? -127.0f / max : 0.0f;
        const float scale = amax != 0.0f ? 1.0f / iscale : 0.0f;
        for (int b = 0; b < 8; b++) {
            int32_t half[2] = {0, 0};
            for (int i = 32 * b; i < 32 * b + 32; i++) {
                const float v = llm_round_even(iscale * xs[i]);
                q[s * 256 + i] = (int8_t)(v > 127.0f ? 127.0f : v);
                half[(i / 16) & 1] += q[s * 256 + i];
            }
            d[s * 8 + b] = scale;
            llm_set_sums(&sums[s * 8 + b], half[0], half[1], scale);
        }
    }
}

/* Value i of output o in a packed group-block's values: its q. */
static inline int llm_packed_q(const uint8_t *values, int o, int i) {
    return (int)values[(i / 4) * 64 + o * 4 + i % 4] - 128;
}

/* Row `row` of a packed matrix of n columns back to floats (the embedding lookup): exact.
   q8s: 0 for Q8_0, 1 for Q8S. */
static void llm_dequantize_packed_row(const uint8_t *w, int q8s, int row, int n, float *out) {
    const int nb = n / LLM_QK, o = row % LLM_GROUP;
    const int block = q8s ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK, head = q8s ? LLM_Q8SP_HEAD : LLM_Q8P_HEAD;
    const uint8_t *g = w + (Py_ssize_t)(row / LLM_GROUP) * nb * block;
    for (int b = 0; b < nb; b++) {
        const uint8_t *p = g + (Py_ssize_t)b * block;
        float f[3] = {0, 0, 0};
        for (int k = 0; k < (q8s ? 3 : 1); k++) memcpy(&f[k], p + (16 * k + o) * 4, 4);
        for (int i = 0; i < LLM_QK; i++) {
            const float q = (float)llm_packed_q(p + head, o, i);
            out[b * LLM_QK + i] = q8s ? (i < 16 ? f[0] : f[1]) * q - f[2] : f[0] * q;
        }
    }
}

#endif
