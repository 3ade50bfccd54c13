/* Matmuls with packed 8-bit weights (llm_q8.h's layouts) and quantised activation rows.
 *
 * The fixed order, the same at every SIMD level: for output j of row r, blocks in order,
 *   Q8_0: acc = fma(float(isum), scale * dx, acc)               (isum: the block's 32 products)
 *   Q8S:  lo = fma(float(isum_lo), scale_lo * dx, lo)           (isum_lo: values 0-15)
 *         hi = fma(float(isum_hi), scale_hi * dx, hi)           (isum_hi: values 16-31)
 *         mins = fma(min, dx * float(sum of the activation block), mins)
 *         and the result is (lo + hi) - mins,
 * where dx is the activation block's scale, every product of two floats is rounded before the
 * fma, and the fma rounds once (fmaf in the portable code). Integer sums are exact in any
 * order, so the portable loop, AVX2's maddubs/madd and VNNI's dpbusd give the same bits;
 * tests check this on every level the CPU has. A row's result depends on that row alone
 * (batch invariance), and on no tiling: each output's sums are the same operations wherever
 * its tile falls.
 */
#ifndef LLM_Q8_GEMM_H
#define LLM_Q8_GEMM_H

#include "llm_q8.h"

/* The reference: one output at a time. xa: the rows' block sums (llm_quantize_row_q8). */
static void llm_gemm_portable(int q8s, float *out, Py_ssize_t os, const int8_t *xq, const float *xd,
                              const llm_act_sums *xa, int n_rows, int n_in, const uint8_t *w, int n_out)
{
    const int nb = n_in / LLM_QK;
    const int block = q8s ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK, head = q8s ? LLM_Q8SP_HEAD : LLM_Q8P_HEAD;
    for (int r = 0; r < n_rows; r++) {
        const int8_t *x = xq + (Py_ssize_t)r * n_in;
        for (int j = 0; j < n_out; j++) {
            const uint8_t *g = w + (Py_ssize_t)(j / LLM_GROUP) * nb * block;
            const int o = j % LLM_GROUP;
            float lo = 0.0f, hi = 0.0f, mins = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *p = g + (Py_ssize_t)b * block;
                int32_t isum[2] = {0, 0};
                for (int i = 0; i < LLM_QK; i++) isum[i / 16] += llm_packed_q(p + head, o, i) * x[b * LLM_QK + i];
                const float dx = xd[(Py_ssize_t)r * nb + b];
                float f[3];
                for (int k = 0; k < (q8s ? 3 : 1); k++) memcpy(&f[k], p + (16 * k + o) * 4, 4);
                if (!q8s) {
                    const float s = f[0] * dx;
                    lo = fmaf((float)(isum[0] + isum[1]), s, lo);
                } else {
                    const float s_lo = f[0] * dx, s_hi = f[1] * dx;
                    const float dsum = xa[(Py_ssize_t)r * nb + b].dsum;
                    lo = fmaf((float)isum[0], s_lo, lo);
                    hi = fmaf((float)isum[1], s_hi, hi);
                    mins = fmaf(f[2], dsum, mins);
                }
            }
            const float sum = lo + hi;
            out[(Py_ssize_t)r * os + j] = q8s ? sum - mins : lo;
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LLM_HAVE_Q8_X86 1

/* One tile: `rows` (1-4) activation rows by LANES outputs of one packed group (`half` picks
   which LANES of its 16 when a vector holds 8), `outs` of them stored. Written once for every
   level: VI/VF the integer and float vectors, and per level PREP (the weight vector as the
   dot wants it), INIT (an integer lane's start: VNNI's unsigned weights need -128 times the
   activations' sum, llm_act_sums), DOT (adds 4 products per lane). rows and q8s are constants where it is
   inlined, so the accumulators stay in registers. */
#define LLM_GEMM_TILE(NAME, TARGET, VI, VF, LANES, LOADI, PREP_A, PREP_B, INIT, DOT, BCAST,      \
                      CVT, ADDI, LOADF, SET1F, MULF, FMAF, ADDF, SUBF, STOREF, ZEROF)                   \
    __attribute__((target(TARGET), always_inline)) static inline void NAME(                    \
        float *out, Py_ssize_t os, const int8_t *xq, const float *xd, const llm_act_sums *xa,        \
        int n_in, const uint8_t *wg, int half, int outs, const int rows, const int q8s)         \
    {                                                                                           \
        const int nb = n_in / LLM_QK;                                                           \
        const int block = q8s ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK;                                 \
        const int head = q8s ? LLM_Q8SP_HEAD : LLM_Q8P_HEAD;                                    \
        VF lo[4], hi[4], mn[4];                                                                 \
        for (int k = 0; k < rows; k++) lo[k] = hi[k] = mn[k] = ZEROF();                         \
        for (int b = 0; b < nb; b++) {                                                          \
            const uint8_t *p = wg + (Py_ssize_t)b * block;                                      \
            const float *f = (const float *)p + half * LANES;                                   \
            VI wa[8], wb[8]; /* wb: only AVX2 reads it */                                      \
            for (int t = 0; t < 8; t++) {                                                       \
                const VI raw = LOADI(p + head + t * 64 + half * LANES * 4);                     \
                wa[t] = PREP_A(raw);                                                            \
                wb[t] = PREP_B(raw);                                                            \
            }                                                                                   \
            (void)wb;                                                                           \
            const VF s0 = LOADF(f);                                                             \
            const VF s1 = q8s ? LOADF(f + 16) : s0, s2 = q8s ? LOADF(f + 32) : s0;              \
            for (int k = 0; k < rows; k++) {                                                    \
                const int8_t *x = xq + (Py_ssize_t)k * n_in + b * LLM_QK;                       \
                const float dx = xd[(Py_ssize_t)k * nb + b];                                    \
                const llm_act_sums *a = xa + (Py_ssize_t)k * nb + b;                            \
                const VF sdx = SET1F(dx);                                                       \
                /* Two chains of four (the halves): exact, and half the latency of one. */      \
                VI a0 = INIT(a->lo), a1 = INIT(a->hi);                                          \
                for (int t = 0; t < 4; t++) {                                                   \
                    a0 = DOT(a0, wa[t], wb[t], BCAST(x + 4 * t));                               \
                    a1 = DOT(a1, wa[t + 4], wb[t + 4], BCAST(x + 4 * t + 16));                  \
                }                                                                               \
                if (!q8s) {                                                                     \
                    lo[k] = FMAF(CVT(ADDI(a0, a1)), MULF(s0, sdx), lo[k]);                      \
                } else {                                                                        \
                    lo[k] = FMAF(CVT(a0), MULF(s0, sdx), lo[k]);                                \
                    hi[k] = FMAF(CVT(a1), MULF(s1, sdx), hi[k]);                                \
                    mn[k] = FMAF(s2, SET1F(a->dsum), mn[k]);                                    \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int k = 0; k < rows; k++) {                                                        \
            const VF res = q8s ? SUBF(ADDF(lo[k], hi[k]), mn[k]) : lo[k];                       \
            if (outs == LANES) {                                                                \
                STOREF(out + (Py_ssize_t)k * os, res);                                          \
            } else {                                                                            \
                float lane[LANES];                                                              \
                STOREF(lane, res);                                                              \
                memcpy(out + (Py_ssize_t)k * os, lane, (size_t)outs * sizeof(float));           \
            }                                                                                   \
        }                                                                                       \
    }

/* Every row tile by every group of n_out outputs (w: the first group). */
#define LLM_GEMM_FN(NAME, TARGET, TILE, LANES, Q8S)                                             \
    __attribute__((target(TARGET))) static void NAME(                                           \
        float *out, Py_ssize_t os, const int8_t *xq, const float *xd, const llm_act_sums *xa,        \
        int n_rows, int n_in, const uint8_t *w, int n_out)                                      \
    {                                                                                           \
        const int nb = n_in / LLM_QK;                                                           \
        const Py_ssize_t group_bytes = (Py_ssize_t)nb * (Q8S ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK); \
        for (int r = 0; r < n_rows; r += 4) {                                                   \
            const int rows = n_rows - r < 4 ? n_rows - r : 4;                                   \
            const int8_t *x = xq + (Py_ssize_t)r * n_in;                                        \
            const float *d = xd + (Py_ssize_t)r * nb;                                           \
            const llm_act_sums *h = xa + (Py_ssize_t)r * nb;                                    \
            for (int j = 0; j < n_out; j += LLM_GROUP) {                                        \
                const uint8_t *wg = w + (Py_ssize_t)(j / LLM_GROUP) * group_bytes;              \
                for (int half = 0; half * LANES < LLM_GROUP && j + half * LANES < n_out; half++) { \
                    const int left = n_out - j - half * LANES;                                  \
                    const int outs = left < LANES ? left : LANES;                               \
                    float *o = out + (Py_ssize_t)r * os + j + half * LANES;                     \
                    switch (rows) {                                                             \
                    case 4: TILE(o, os, x, d, h, n_in, wg, half, outs, 4, Q8S); break;          \
                    case 3: TILE(o, os, x, d, h, n_in, wg, half, outs, 3, Q8S); break;          \
                    case 2: TILE(o, os, x, d, h, n_in, wg, half, outs, 2, Q8S); break;          \
                    default: TILE(o, os, x, d, h, n_in, wg, half, outs, 1, Q8S);                \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

static inline int32_t llm_load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* AVX2: maddubs wants unsigned x signed bytes, and pairs of (q + 128) * x could overflow
   its 16 bits, so the weight goes back to signed (q), its absolute value is the unsigned
   side and its sign moves onto the activation; |q| <= 128 and |x| <= 127 keep pairs exact. */
#define LLM_AVX2_TARGET "avx2,fma,f16c"
#define llm_a2_signed(v) _mm256_xor_si256((v), _mm256_set1_epi8((char)0x80))
#define llm_a2_abs(v) _mm256_sign_epi8(llm_a2_signed(v), llm_a2_signed(v))
#define llm_a2_init(s) _mm256_setzero_si256()
#define llm_a2_dot(acc, a, s, x)                                                                \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((a), _mm256_sign_epi8((x), (s))), \
                                              _mm256_set1_epi16(1)))
#define llm_bcast256(p) _mm256_set1_epi32(llm_load_i32(p))
#define llm_loadi256(p) _mm256_loadu_si256((const __m256i *)(p))
#define llm_same(v) (v)
/* The float part of a tile, the same operations at each width (LLM_GEMM_TILE's last ten). */
#define LLM_FLOAT_OPS_256 _mm256_cvtepi32_ps, _mm256_add_epi32, _mm256_loadu_ps, _mm256_set1_ps,  \
                          _mm256_mul_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_sub_ps,         \
                          _mm256_storeu_ps, _mm256_setzero_ps
#define LLM_FLOAT_OPS_512 _mm512_cvtepi32_ps, _mm512_add_epi32, _mm512_loadu_ps, _mm512_set1_ps,  \
                          _mm512_mul_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_sub_ps,         \
                          _mm512_storeu_ps, _mm512_setzero_ps
/* Arguments expanded before LLM_GEMM_TILE counts them, so an ops list counts as its ten. */
#define LLM_GEMM_TILE_OF(...) LLM_GEMM_TILE(__VA_ARGS__)

LLM_GEMM_TILE_OF(llm_tile_avx2, LLM_AVX2_TARGET, __m256i, __m256, 8, llm_loadi256, llm_a2_abs,
                 llm_a2_signed, llm_a2_init, llm_a2_dot, llm_bcast256, LLM_FLOAT_OPS_256)

/* VNNI: dpbusd sums (q + 128) * x; the lane starts at -128 * sum(x), so it ends at sum(q * x). */
#define LLM_VNNI_TARGET "avxvnni,avx2,fma,f16c"
#define llm_v2_init(s) _mm256_set1_epi32(s)
#define llm_v2_dot(acc, a, s, x) _mm256_dpbusd_avx_epi32((acc), (a), (x))
LLM_GEMM_TILE_OF(llm_tile_vnni, LLM_VNNI_TARGET, __m256i, __m256, 8, llm_loadi256, llm_same,
                 llm_same, llm_v2_init, llm_v2_dot, llm_bcast256, LLM_FLOAT_OPS_256)

#define LLM_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
#define llm_v5_init(s) _mm512_set1_epi32(s)
#define llm_v5_dot(acc, a, s, x) _mm512_dpbusd_epi32((acc), (a), (x))
#define llm_bcast512(p) _mm512_set1_epi32(llm_load_i32(p))
#define llm_loadi512(p) _mm512_loadu_si512((const void *)(p))
LLM_GEMM_TILE_OF(llm_tile_avx512, LLM_AVX512_TARGET, __m512i, __m512, 16, llm_loadi512, llm_same,
                 llm_same, llm_v5_init, llm_v5_dot, llm_bcast512, LLM_FLOAT_OPS_512)

LLM_GEMM_FN(llm_gemm_q8_avx2, LLM_AVX2_TARGET, llm_tile_avx2, 8, 0)
LLM_GEMM_FN(llm_gemm_q8s_avx2, LLM_AVX2_TARGET, llm_tile_avx2, 8, 1)
LLM_GEMM_FN(llm_gemm_q8_vnni, LLM_VNNI_TARGET, llm_tile_vnni, 8, 0)
LLM_GEMM_FN(llm_gemm_q8s_vnni, LLM_VNNI_TARGET, llm_tile_vnni, 8, 1)
LLM_GEMM_FN(llm_gemm_q8_avx512, LLM_AVX512_TARGET, llm_tile_avx512, 16, 0)
LLM_GEMM_FN(llm_gemm_q8s_avx512, LLM_AVX512_TARGET, llm_tile_avx512, 16, 1)

/* AMX (level 5): a tile instruction multiplies 16 activation rows by 16 outputs over a whole
   block (Q8S: a half-block) into 16 x 16 exact int32 sums, the same integers the vector code
   makes; the packed values are already the B tile's layout (4 values of each of 16 outputs
   per 64-byte row). The float part is the AVX-512 code's, lane for lane, so the bits are the
   same. A tile of fewer rows (at least LLM_AMX_MIN_ROWS) still loads 16 activation rows, the
   rest of them whatever the buffer holds past the step's rows (llm_matmul_w's callers leave
   16 rows of room), and keeps the sums of its own rows only; fewer rows take the AVX-512
   code. */
#define LLM_AMX_MIN_ROWS 4
#define LLM_AMX_TARGET "amx-tile,amx-int8," LLM_AVX512_TARGET

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} llm_tile_config;

/* Tiles 0, 1: sums (16 x 16 int32); 2, 3: activations (16 rows of k bytes); 4, 5: weights
   (k / 4 rows of 64 bytes). k = 32 for Q8_0 (one tile of each), 16 for Q8S's halves. */
__attribute__((target(LLM_AMX_TARGET))) static void llm_amx_configure(int k) {
    llm_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.rows[t] = 16; c.colsb[t] = 64;
        c.rows[2 + t] = 16; c.colsb[2 + t] = (uint16_t)k;
        c.rows[4 + t] = (uint8_t)(k / 4); c.colsb[4 + t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Blocks whose sums one pass of tile products leaves for the float pass (in L1). */
#define LLM_AMX_CHUNK 16

/* `rows` (<= 16; x: the first, d, a: their scales and sums) by one group of 16 outputs. The
   tile products of a chunk of blocks run first, alternating two sets of sum tiles so one
   block's product overlaps the previous one's store; then the float pass reads them. */
__attribute__((target(LLM_AMX_TARGET), always_inline)) static inline void llm_amx_tile(
    float *out, Py_ssize_t os, const int8_t *xq, const float *xd, const llm_act_sums *xa, int n_in,
    const uint8_t *wg, int outs, int rows, const int q8s)
{
    const int nb = n_in / LLM_QK;
    const int block = q8s ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK, head = q8s ? LLM_Q8SP_HEAD : LLM_Q8P_HEAD;
    int32_t sums[LLM_AMX_CHUNK][2][16 * 16] __attribute__((aligned(64)));
    __m512 lo[16], hi[16], mn[16];
    for (int k = 0; k < 16; k++) lo[k] = hi[k] = mn[k] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += LLM_AMX_CHUNK) {
        const int n = nb - b0 < LLM_AMX_CHUNK ? nb - b0 : LLM_AMX_CHUNK;
        for (int i = 0; i < n; i++) {
            const uint8_t *p = wg + (Py_ssize_t)(b0 + i) * block + head;
            const int8_t *x = xq + (b0 + i) * LLM_QK;
            if (!q8s) {  /* sums in tile 0 or 1; activations 2 or 3; weights 4 or 5 */
                if (i & 1) {
                    _tile_zero(1); _tile_loadd(3, x, n_in); _tile_loadd(5, p, 64);
                    _tile_dpbsud(1, 3, 5); _tile_stored(1, sums[i][0], 64);
                } else {
                    _tile_zero(0); _tile_loadd(2, x, n_in); _tile_loadd(4, p, 64);
                    _tile_dpbsud(0, 2, 4); _tile_stored(0, sums[i][0], 64);
                }
            } else {     /* halves: sums 0 and 1, activations 2 and 3, weights 4 and 5 */
                _tile_zero(0); _tile_zero(1);
                _tile_loadd(2, x, n_in); _tile_loadd(3, x + 16, n_in);
                _tile_loadd(4, p, 64); _tile_loadd(5, p + 256, 64);
                _tile_dpbsud(0, 2, 4); _tile_dpbsud(1, 3, 5);
                _tile_stored(0, sums[i][0], 64); _tile_stored(1, sums[i][1], 64);
            }
        }
        for (int i = 0; i < n; i++) {
            const int b = b0 + i;
            const float *f = (const float *)(wg + (Py_ssize_t)b * block);
            const __m512 s0 = _mm512_loadu_ps(f);
            const __m512 s1 = q8s ? _mm512_loadu_ps(f + 16) : s0, s2 = q8s ? _mm512_loadu_ps(f + 32) : s0;
            for (int k = 0; k < 16; k++) {
                if (k >= rows) break;
                const float dx = xd[(Py_ssize_t)k * nb + b];
                const llm_act_sums *a = xa + (Py_ssize_t)k * nb + b;
                const __m512 sdx = _mm512_set1_ps(dx);
                /* The tile summed (q + 128) * x: add the -128 * sum(x) the vector code starts at. */
                const __m512i c0 = _mm512_load_si512((const void *)(sums[i][0] + 16 * k));
                if (!q8s) {
                    const __m512i isum = _mm512_add_epi32(c0, _mm512_set1_epi32(a->all));
                    lo[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s0, sdx), lo[k]);
                } else {
                    const __m512i c1 = _mm512_load_si512((const void *)(sums[i][1] + 16 * k));
                    const __m512i i0 = _mm512_add_epi32(c0, _mm512_set1_epi32(a->lo));
                    const __m512i i1 = _mm512_add_epi32(c1, _mm512_set1_epi32(a->hi));
                    lo[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(s0, sdx), lo[k]);
                    hi[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(s1, sdx), hi[k]);
                    mn[k] = _mm512_fmadd_ps(s2, _mm512_set1_ps(a->dsum), mn[k]);
                }
            }
        }
    }
    for (int k = 0; k < rows; k++) {
        const __m512 res = q8s ? _mm512_sub_ps(_mm512_add_ps(lo[k], hi[k]), mn[k]) : lo[k];
        float lane[16];
        _mm512_storeu_ps(lane, res);
        memcpy(out + (Py_ssize_t)k * os, lane, (size_t)outs * sizeof(float));
    }
}

#define LLM_AMX_FN(NAME, Q8S, REST)                                                              \
    __attribute__((target(LLM_AMX_TARGET))) static void NAME(                                   \
        float *out, Py_ssize_t os, const int8_t *xq, const float *xd, const llm_act_sums *xa,        \
        int n_rows, int n_in, const uint8_t *w, int n_out)                                      \
    {                                                                                           \
        const int nb = n_in / LLM_QK, tail = n_rows % 16;                                      \
        const int tiled = tail >= LLM_AMX_MIN_ROWS ? n_rows : n_rows - tail;                    \
        const Py_ssize_t group_bytes = (Py_ssize_t)nb * (Q8S ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK); \
        if (tiled) {                                                                            \
            llm_amx_configure(Q8S ? 16 : 32);                                                   \
            for (int r = 0; r < tiled; r += 16)                                                 \
                for (int j = 0; j < n_out; j += LLM_GROUP)                                      \
                    llm_amx_tile(out + (Py_ssize_t)r * os + j, os, xq + (Py_ssize_t)r * n_in,   \
                                 xd + (Py_ssize_t)r * nb, xa + (Py_ssize_t)r * nb, n_in,        \
                                 w + (Py_ssize_t)(j / LLM_GROUP) * group_bytes,                 \
                                 n_out - j < LLM_GROUP ? n_out - j : LLM_GROUP,                 \
                                 tiled - r < 16 ? tiled - r : 16, Q8S);                         \
            _tile_release();                                                                    \
        }                                                                                       \
        if (tiled < n_rows)                                                                     \
            REST(out + (Py_ssize_t)tiled * os, os, xq + (Py_ssize_t)tiled * n_in,               \
                 xd + (Py_ssize_t)tiled * nb, xa + (Py_ssize_t)tiled * nb, n_rows - tiled,      \
                 n_in, w, n_out);                                                               \
    }

LLM_AMX_FN(llm_gemm_q8_amx, 0, llm_gemm_q8_avx512)
LLM_AMX_FN(llm_gemm_q8s_amx, 1, llm_gemm_q8s_avx512)
#endif

/* level (llm_kernels.h's): 5 AMX, 4 AVX-512 VNNI, 3 AVX-VNNI, 2 AVX2 + FMA + F16C, below that the
   portable loop (the caller checked the CPU). n_out outputs from the group at w. */
static void llm_gemm_q8(int level, int q8s, float *out, Py_ssize_t os, const int8_t *xq,
                        const float *xd, const llm_act_sums *xa, int n_rows, int n_in,
                        const uint8_t *w, int n_out)
{
#ifdef LLM_HAVE_Q8_X86
    typedef void (*gemm)(float *, Py_ssize_t, const int8_t *, const float *, const llm_act_sums *, int,
                         int, const uint8_t *, int);
    static const gemm by_level[4][2] = {{llm_gemm_q8_avx2, llm_gemm_q8s_avx2},
                                        {llm_gemm_q8_vnni, llm_gemm_q8s_vnni},
                                        {llm_gemm_q8_avx512, llm_gemm_q8s_avx512},
                                        {llm_gemm_q8_amx, llm_gemm_q8s_amx}};
    if (level >= 2) {
        by_level[(level > 5 ? 5 : level) - 2][q8s](out, os, xq, xd, xa, n_rows, n_in, w, n_out);
        return;
    }
#endif
    llm_gemm_portable(q8s, out, os, xq, xd, xa, n_rows, n_in, w, n_out);
}

#endif
