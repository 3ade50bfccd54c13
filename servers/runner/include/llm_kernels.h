/* The C of servers/runner/_kernels.pyx: the batch-invariant float kernels (matmul, attention,
 * softmax, norms, activations), their SIMD variants, and the dispatch that splits a step over
 * threads (llm_pool.h) and sends 8-bit weights to llm_q8_gemm.h. Included by _kernels.pyx only.
 * Python.h (Py_ssize_t) comes first, from Cython.
 */
#ifndef LLM_KERNELS_H
#define LLM_KERNELS_H

/* Batch invariance: a row's sums never depend on how many rows share the step or
   where in the step it sits. Each dot product, softmax and weighted sum has one fixed
   order (documented at each function). Where code comes in several widths (SSE, AVX,
   AVX2; 8, 4 or 1 slot at a time), each lane performs the same IEEE operations in
   the same order as the narrow code, and no path fuses a multiply-add (no FMA target,
   no fast-math), so every path gives the same bits; tests check this. exp is our own
   polynomial, not a libm variant picked at run time, so an x86-64 machine with or
   without AVX computes the same logits. */

typedef float llm_v4 __attribute__((vector_size(16)));
typedef float llm_v4u __attribute__((vector_size(16), aligned(4)));
typedef int llm_v4i __attribute__((vector_size(16)));

static inline llm_v4 llm_ld(const float *p) { return *(const llm_v4u *)p; }
static inline void llm_st(float *p, llm_v4 v) { *(llm_v4u *)p = v; }
static inline llm_v4 llm_splat(float x) { llm_v4 v = {x, x, x, x}; return v; }

/* The fixed reduction every long dot product ends with: 8 lanes -> 4 -> a pairwise tree. */
static inline float llm_hsum(llm_v4 a, llm_v4 b) {
    llm_v4 s = a + b;
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* Lanes of a where mask is set (all ones), else lanes of b. */
static inline llm_v4 llm_select(llm_v4i mask, llm_v4 a, llm_v4 b) {
    llm_v4i ai, bi, ri;
    llm_v4 r;
    __builtin_memcpy(&ai, &a, sizeof a);
    __builtin_memcpy(&bi, &b, sizeof b);
    ri = (ai & mask) | (bi & ~mask);
    __builtin_memcpy(&r, &ri, sizeof r);
    return r;
}

/* exp of 4 lanes: Cephes expf (range reduction by ln 2 in two parts, degree-5
   polynomial, 2**n through the exponent bits); within 2 ulp of exp on [-87, 88], and a
   pure function of its input on every machine (no libm variant chosen at run time). */
/* The body of llm_exp4 and llm_exp8, written once: V/VI the float and int vectors, SPLAT
   and SELECT their helpers; the same operations in the same order at either width. */
#define LLM_EXP_BODY(V, VI, SPLAT, SELECT, x)                                      \
    const V hi = SPLAT(88.0f), lo = SPLAT(-87.0f);                                \
    x = SELECT(x > hi, hi, x);                                                    \
    x = SELECT(x < lo, lo, x);                                                    \
    V fx = x * SPLAT(1.44269504088896341f) + SPLAT(0.5f);                         \
    VI n = __builtin_convertvector(fx, VI);   /* truncates toward zero */         \
    V nf = __builtin_convertvector(n, V);                                         \
    VI too_big = nf > fx;                     /* -1 where trunc > floor */        \
    n = n + too_big;                                                              \
    nf = __builtin_convertvector(n, V);                                           \
    V r = x - nf * SPLAT(0.693359375f) - nf * SPLAT(-2.12194440e-4f);             \
    V p = SPLAT(1.9875691500e-4f);                                                \
    p = p * r + SPLAT(1.3981999507e-3f);                                          \
    p = p * r + SPLAT(8.3334519073e-3f);                                          \
    p = p * r + SPLAT(4.1665795894e-2f);                                          \
    p = p * r + SPLAT(1.6666665459e-1f);                                          \
    p = p * r + SPLAT(5.0000001201e-1f);                                          \
    V y = p * (r * r) + r + SPLAT(1.0f);                                          \
    VI bits = (n + 127) << 23;                                                    \
    V scale;                                                                      \
    __builtin_memcpy(&scale, &bits, sizeof scale);                                \
    return y * scale;

static inline llm_v4 llm_exp4(llm_v4 x) {
    LLM_EXP_BODY(llm_v4, llm_v4i, llm_splat, llm_select, x)
}

/* out[r*os + j] = dot(x[r*xs ...], w[j*n_in ...]) for r < n_rows (a multiple of 4).
   Lane l of a row's two accumulators sums elements 8k+l in order of k; a 4-wide tail
   adds into the low accumulator; a scalar tail sums in order; then llm_hsum. Rows are
   blocked by four only to share the weight loads: no row ever reads another's sums,
   so the bits of a row do not depend on its block-mates. */
static void llm_matmul_sse(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                           const float *w, int n_rows, int n_in, int n_out)
{
    const int n8 = n_in & ~7;
    const int n4 = (n_in - n8) >= 4 ? n8 + 4 : n8;
    for (int r = 0; r < n_rows; r += 4) {
        const float *x0 = x + (Py_ssize_t)r * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
        float *o = out + (Py_ssize_t)r * os;
        for (int j = 0; j < n_out; j++) {
            const float *wj = w + (Py_ssize_t)j * n_in;
            llm_v4 a0 = {0, 0, 0, 0}, b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
            for (int i = 0; i < n8; i += 8) {
                llm_v4 wl = llm_ld(wj + i), wh = llm_ld(wj + i + 4);
                a0 += wl * llm_ld(x0 + i); b0 += wh * llm_ld(x0 + i + 4);
                a1 += wl * llm_ld(x1 + i); b1 += wh * llm_ld(x1 + i + 4);
                a2 += wl * llm_ld(x2 + i); b2 += wh * llm_ld(x2 + i + 4);
                a3 += wl * llm_ld(x3 + i); b3 += wh * llm_ld(x3 + i + 4);
            }
            if (n4 > n8) {
                llm_v4 wl = llm_ld(wj + n8);
                a0 += wl * llm_ld(x0 + n8); a1 += wl * llm_ld(x1 + n8);
                a2 += wl * llm_ld(x2 + n8); a3 += wl * llm_ld(x3 + n8);
            }
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
            for (int i = n4; i < n_in; i++) {
                t0 += wj[i] * x0[i]; t1 += wj[i] * x1[i];
                t2 += wj[i] * x2[i]; t3 += wj[i] * x3[i];
            }
            o[j] = llm_hsum(a0, b0) + t0;
            o[os + j] = llm_hsum(a1, b1) + t1;
            o[2 * os + j] = llm_hsum(a2, b2) + t2;
            o[3 * os + j] = llm_hsum(a3, b3) + t3;
        }
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LLM_HAVE_AVX 1
#include <immintrin.h>  /* F16C: float16 KV pages (llm_kv8) */
typedef float llm_v8 __attribute__((vector_size(32)));
typedef float llm_v8u __attribute__((vector_size(32), aligned(4)));

/* The same sums as llm_matmul_sse, bit for bit: 8-lane accumulators are the SSE
   version's two 4-lane ones side by side, the 4-wide tail still adds into lanes 0-3,
   and the reduction is llm_hsum. AVX (not FMA: no fused rounding) only does the work
   of two SSE instructions in one, and two outputs share each x load. */
__attribute__((target("avx")))
static void llm_dot_tail_avx(float *o, llm_v8 acc, const float *wj, const float *xr,
                             int n8, int n4, int n_in) {
    llm_v4 a, b;
    __builtin_memcpy(&a, &acc, sizeof a);
    __builtin_memcpy(&b, (const char *)&acc + sizeof a, sizeof b);
    if (n4 > n8) a += llm_ld(wj + n8) * llm_ld(xr + n8);
    float t = 0.0f;
    for (int i = n4; i < n_in; i++) t += wj[i] * xr[i];
    *o = llm_hsum(a, b) + t;
}

__attribute__((target("avx")))
static void llm_matmul_avx(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                           const float *w, int n_rows, int n_in, int n_out)
{
    const int n8 = n_in & ~7;
    const int n4 = (n_in - n8) >= 4 ? n8 + 4 : n8;
    for (int r = 0; r < n_rows; r += 4) {
        const float *xr[4] = {x + (Py_ssize_t)r * xs, x + (Py_ssize_t)(r + 1) * xs,
                              x + (Py_ssize_t)(r + 2) * xs, x + (Py_ssize_t)(r + 3) * xs};
        float *o = out + (Py_ssize_t)r * os;
        int j = 0;
        for (; j + 2 <= n_out; j += 2) {
            const float *w0 = w + (Py_ssize_t)j * n_in, *w1 = w0 + n_in;
            llm_v8 z = {0, 0, 0, 0, 0, 0, 0, 0};
            llm_v8 a0 = z, a1 = z, a2 = z, a3 = z, c0 = z, c1 = z, c2 = z, c3 = z;
            for (int i = 0; i < n8; i += 8) {
                llm_v8 u = *(const llm_v8u *)(w0 + i), v = *(const llm_v8u *)(w1 + i);
                llm_v8 x0 = *(const llm_v8u *)(xr[0] + i), x1 = *(const llm_v8u *)(xr[1] + i);
                llm_v8 x2 = *(const llm_v8u *)(xr[2] + i), x3 = *(const llm_v8u *)(xr[3] + i);
                a0 += u * x0; a1 += u * x1; a2 += u * x2; a3 += u * x3;
                c0 += v * x0; c1 += v * x1; c2 += v * x2; c3 += v * x3;
            }
            llm_dot_tail_avx(o + j, a0, w0, xr[0], n8, n4, n_in);
            llm_dot_tail_avx(o + os + j, a1, w0, xr[1], n8, n4, n_in);
            llm_dot_tail_avx(o + 2 * os + j, a2, w0, xr[2], n8, n4, n_in);
            llm_dot_tail_avx(o + 3 * os + j, a3, w0, xr[3], n8, n4, n_in);
            llm_dot_tail_avx(o + j + 1, c0, w1, xr[0], n8, n4, n_in);
            llm_dot_tail_avx(o + os + j + 1, c1, w1, xr[1], n8, n4, n_in);
            llm_dot_tail_avx(o + 2 * os + j + 1, c2, w1, xr[2], n8, n4, n_in);
            llm_dot_tail_avx(o + 3 * os + j + 1, c3, w1, xr[3], n8, n4, n_in);
        }
        for (; j < n_out; j++) {
            const float *w0 = w + (Py_ssize_t)j * n_in;
            for (int k = 0; k < 4; k++) {
                llm_v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int i = 0; i < n8; i += 8)
                    acc += *(const llm_v8u *)(w0 + i) * *(const llm_v8u *)(xr[k] + i);
                llm_dot_tail_avx(o + k * os + j, acc, w0, xr[k], n8, n4, n_in);
            }
        }
    }
}
#endif

/* 5: AMX, 4: AVX-512 VNNI and 3: AVX-VNNI (8-bit matmuls), 2: AVX2 (attention 8 lanes wide, 8-bit
   matmuls), 1: AVX (float matmul), 0: SSE; the best is chosen once per process. Every level
   gives the same bits. */
static int llm_simd_level = -1;

#ifdef LLM_HAVE_AVX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
/* AMX needs the CPU's tiles (CPUID leaf 7: AMX-TILE, AMX-INT8) and, on Linux, the kernel's
   leave to use their 8 KiB of state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), asked
   once per process (children inherit it). */
static int llm_amx_permitted(void) {
    static int answer = -1;
    if (answer >= 0) return answer;
    unsigned a, b, c, d;
    answer = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 25))) {
#if defined(__linux__) && defined(SYS_arch_prctl)
        answer = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#endif
    }
    return answer;
}
#endif

/* Whether this CPU runs level `level`'s code. The 8-bit kernels read f16 scales with F16C and
   sum with FMA (every AVX2 CPU has both; checked anyway). */
static int llm_simd_supported(int level) {
#ifdef LLM_HAVE_AVX
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                     __builtin_cpu_supports("fma");
    switch (level) {
    case 0: return 1;
    case 1: return __builtin_cpu_supports("avx");
    case 2: return avx2;
    case 3: return avx2 && __builtin_cpu_supports("avxvnni");
    case 4: return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case 5: return llm_simd_supported(4) && llm_amx_permitted();
    default: return 0;
    }
#else
    return level == 0;
#endif
}

static int llm_detect_simd(void) {
    for (int level = 5; level > 0; level--)
        if (llm_simd_supported(level)) return level;
    return 0;
}

static void llm_matmul(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                       const float *w, int n_rows, int n_in, int n_out)
{
#ifdef LLM_HAVE_AVX
    if (llm_simd_level > 0) {
        llm_matmul_avx(out, os, x, xs, w, n_rows, n_in, n_out);
        return;
    }
#endif
    llm_matmul_sse(out, os, x, xs, w, n_rows, n_in, n_out);
}

/* A short dot product (one attention head): 4 lanes over chunks of 4, scalar tail. */
static inline float llm_dot_head(const float *a, const float *b, int n) {
    const int n4 = n & ~3;
    llm_v4 acc = {0, 0, 0, 0};
    for (int i = 0; i < n4; i += 4) acc += llm_ld(a + i) * llm_ld(b + i);
    float t = 0.0f;
    for (int i = n4; i < n; i++) t += a[i] * b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + t;
}

/* Sum of squares for RMSNorm, with the same lane structure as llm_matmul. */
static inline float llm_sumsq(const float *x, int n) {
    const int n8 = n & ~7;
    llm_v4 a = {0, 0, 0, 0}, b = a;
    for (int i = 0; i < n8; i += 8) {
        llm_v4 l = llm_ld(x + i), h = llm_ld(x + i + 4);
        a += l * l; b += h * h;
    }
    float t = 0.0f;
    for (int i = n8; i < n; i++) t += x[i] * x[i];
    return llm_hsum(a, b) + t;
}

/* f(x[i]) for i < n in groups of 4 lanes; the last partial group goes through the same
   lane code with padding (lanes beyond n are computed and dropped). */
#define LLM_MAP4(x, n, F)                                                      \
    do {                                                                       \
        int i_ = 0;                                                            \
        for (; i_ + 4 <= (n); i_ += 4) llm_st((x) + i_, F(llm_ld((x) + i_)));  \
        if (i_ < (n)) {                                                        \
            float t_[4] = {0.0f, 0.0f, 0.0f, 0.0f};                            \
            for (int j_ = i_; j_ < (n); j_++) t_[j_ - i_] = (x)[j_];           \
            llm_v4 r_ = F(llm_ld(t_));                                         \
            for (int j_ = i_; j_ < (n); j_++) (x)[j_] = r_[j_ - i_];           \
        }                                                                      \
    } while (0)

static inline llm_v4 llm_silu4(llm_v4 v) {
    return v * (llm_splat(1.0f) / (llm_splat(1.0f) + llm_exp4(-v)));
}

/* hb[i] = silu(hb[i]) * hb2[i], SwiGLU as llama2.c writes it. */
static void llm_swiglu(float *hb, const float *hb2, int n) {
    LLM_MAP4(hb, n, llm_silu4);
    for (int i = 0; i < n; i++) hb[i] = hb[i] * hb2[i];
}

/* GELU, tanh form: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), which
   is x * sigmoid(2u): the silu code path with our exp, no libm tanh. */
static inline llm_v4 llm_gelu_tanh4(llm_v4 v) {
    llm_v4 u2 = llm_splat(1.5957691216057308f) * v * (llm_splat(1.0f) + llm_splat(0.044715f) * v * v);
    return v * (llm_splat(1.0f) / (llm_splat(1.0f) + llm_exp4(-u2)));
}

/* hb[i] = gelu_tanh(hb[i]) * hb2[i], GeGLU as Gemma computes it. */
static void llm_geglu(float *hb, const float *hb2, int n) {
    LLM_MAP4(hb, n, llm_gelu_tanh4);
    for (int i = 0; i < n; i++) hb[i] = hb[i] * hb2[i];
}

/* Softmax's shared parts. The maximum is exact in any order: take it four lanes at a
   time. The finish exps from element i on by lanes of 4 (padding lanes add exact zeros)
   into acc, then adds the lanes in a fixed tree and divides: every SIMD level calls the
   same code, so their results agree bit for bit. */
static inline float llm_row_max(const float *x, int n) {
    llm_v4 vmax = llm_splat(x[0]);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        llm_v4 v = llm_ld(x + i);
        vmax = llm_select(v > vmax, v, vmax);
    }
    float m = vmax[0];
    for (int l = 1; l < 4; l++) if (vmax[l] > m) m = vmax[l];
    for (; i < n; i++) if (x[i] > m) m = x[i];
    return m;
}

static inline void llm_softmax_finish(float *x, int n, int i, float m, llm_v4 acc) {
    const llm_v4 vm = llm_splat(m);
    for (; i + 4 <= n; i += 4) {
        llm_v4 e = llm_exp4(llm_ld(x + i) - vm);
        llm_st(x + i, e);
        acc += e;
    }
    if (i < n) {
        float t[4] = {m, m, m, m};
        for (int j = i; j < n; j++) t[j - i] = x[j];
        llm_v4 e = llm_exp4(llm_ld(t) - vm);
        for (int j = i; j < 4 + i; j++) {
            if (j < n) x[j] = e[j - i]; else e[j - i] = 0.0f;
        }
        acc += e;
    }
    const float total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int j = 0; j < n; j++) x[j] = x[j] / total;
}

/* Softmax in place. exp by lanes of 4; lane l sums t = 4k + l in order of k (padding
   lanes add exact zeros); then the fixed tree; then one division per element. */
static void llm_softmax(float *x, int n) {
    const float m = llm_row_max(x, n);
    const llm_v4 vm = llm_splat(m);
    llm_v4 acc = {0, 0, 0, 0};
    int i = 0;
    /* Two independent exps per iteration for the CPU to overlap; acc still adds them
       in order of t. */
    for (; i + 8 <= n; i += 8) {
        llm_v4 e0 = llm_exp4(llm_ld(x + i) - vm);
        llm_v4 e1 = llm_exp4(llm_ld(x + i + 4) - vm);
        llm_st(x + i, e0);
        llm_st(x + i + 4, e1);
        acc += e0;
        acc += e1;
    }
    llm_softmax_finish(x, n, i, m, acc);
}

/* KV pages hold float32, or float16 (kv_f16): each K or V element rounded to the nearest
   half (ties to even) when written, and read back exactly, so every row still reads the same
   values whatever its batch; the attention's sums are the float32 code's, on those values. */
static inline float llm_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {             /* zero or subnormal: man * 2**-24, exact in float */
        f = (float)man * 5.9604644775390625e-8f;
        __builtin_memcpy(&u, &f, 4);
        u |= sign;
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t llm_float_to_half(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;         /* rounds to 65520 or more: inf */
    if (a < 0x38800000u) {                               /* a half subnormal: x * 2**24, rounded */
        float f;
        __builtin_memcpy(&f, &a, 4);
        const float m = (f * 16777216.0f + 12582912.0f) - 12582912.0f;  /* ties to even */
        return sign | (uint16_t)m;                       /* 1024: the least normal, as it should */
    }
    const uint32_t lsb = (a >> 13) & 1u;                 /* normal: 23 -> 10 mantissa bits */
    return sign | (uint16_t)(((a + 0x0fffu + lsb) >> 13) - (112u << 10));
}

/* Element i from p, and the address of element i, in the page's element type. */
static inline float llm_kv1(const void *p, Py_ssize_t i, const int f16) {
    return f16 ? llm_half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline const void *llm_kv_at(const void *p, Py_ssize_t i, const int f16) {
    return (const char *)p + i * (f16 ? 2 : 4);
}
static inline llm_v4 llm_kv4(const void *p, Py_ssize_t i, const int f16) {
    if (!f16) return llm_ld((const float *)p + i);
    const uint16_t *h = (const uint16_t *)p + i;
    llm_v4 v = {llm_half_to_float(h[0]), llm_half_to_float(h[1]), llm_half_to_float(h[2]),
                llm_half_to_float(h[3])};
    return v;
}

/* Page layout, per block and layer: [2][n_kv][head_size * block_size] elements; the K
   of head g stores dimension d of slot s at d * bs + s (so four slots' scores are four
   lanes), the V stores it at s * hs + d (so a weighted sum runs along d). */
static void llm_write_kv(void *page, const float *k, const float *v, int slot,
                         int bs, int n_kv, int hs, int f16)
{
    const Py_ssize_t head = (Py_ssize_t)hs * bs, values = (Py_ssize_t)n_kv * head;
    for (int g = 0; g < n_kv; g++)
        for (int d = 0; d < hs; d++) {
            const Py_ssize_t at_k = g * head + (Py_ssize_t)d * bs + slot, at_v = values + g * head + (Py_ssize_t)slot * hs + d;
            if (f16) {
                ((uint16_t *)page)[at_k] = llm_float_to_half(k[g * hs + d]);
                ((uint16_t *)page)[at_v] = llm_float_to_half(v[g * hs + d]);
            } else {
                ((float *)page)[at_k] = k[g * hs + d];
                ((float *)page)[at_v] = v[g * hs + d];
            }
        }
}


#define LLM_MAX_HEAD 256  /* model.py refuses larger heads */

static inline __attribute__((always_inline))
void llm_attend_impl(float *out, const float *q, const void *layer, const int *bt,
                     int first_pos, int n_pos, Py_ssize_t block_stride, int bs, int n_kv,
                     int group, const int hs, float *att, int att_stride, const int f16)
{
    const Py_ssize_t head = (Py_ssize_t)hs * bs;
    const int hs4 = hs & ~3;
    for (int g = 0; g < n_kv; g++) {
        for (int h = 0; h < group; h++) {
            const float *qh = q + (Py_ssize_t)(g * group + h) * hs;
            float *ah = att + (Py_ssize_t)h * att_stride;
            for (int b = first_pos / bs, t = first_pos; t < n_pos; b++) {
                const void *kt = llm_kv_at(layer, (Py_ssize_t)bt[b] * block_stride + g * head, f16);
                float *ab = ah + b * bs - first_pos;  /* score of slot s is ab[s] */
                const int m = n_pos - b * bs < bs ? n_pos - b * bs : bs;
                int s = t - b * bs;
                for (; s + 4 <= m; s += 4) {
                    llm_v4 acc = llm_splat(qh[0]) * llm_kv4(kt, s, f16);
                    for (int d = 1; d < hs; d++)
                        acc += llm_splat(qh[d]) * llm_kv4(kt, (Py_ssize_t)d * bs + s, f16);
                    llm_st(ab + s, acc);
                }
                for (; s < m; s++) {
                    float acc = qh[0] * llm_kv1(kt, s, f16);
                    for (int d = 1; d < hs; d++) acc += qh[d] * llm_kv1(kt, (Py_ssize_t)d * bs + s, f16);
                    ab[s] = acc;
                }
                t = b * bs + m;
            }
            llm_softmax(ah, n_pos - first_pos);
            /* out[d] = sum over t, in order, of p_t * V[t][d]; accumulators stay in
               registers when hs is a compile-time constant (see llm_attend). */
            llm_v4 acc[LLM_MAX_HEAD / 4];
            float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int d = 0; d < hs4; d += 4) acc[d / 4] = llm_splat(0.0f);
            for (int b = first_pos / bs, t = first_pos; t < n_pos; b++) {
                const void *vb = llm_kv_at(layer, (Py_ssize_t)bt[b] * block_stride
                                           + (Py_ssize_t)n_kv * head + g * head, f16);
                const int m = n_pos - b * bs < bs ? n_pos - b * bs : bs;
                for (int s = t - b * bs; s < m; s++, t++) {
                    const void *vp = llm_kv_at(vb, (Py_ssize_t)s * hs, f16);
                    const float a = ah[t - first_pos];
                    const llm_v4 va = llm_splat(a);
                    for (int d = 0; d < hs4; d += 4) acc[d / 4] += va * llm_kv4(vp, d, f16);
                    for (int d = hs4; d < hs; d++) tail[d - hs4] += a * llm_kv1(vp, d, f16);
                }
            }
            float *o = out + (Py_ssize_t)(g * group + h) * hs;
            for (int d = 0; d < hs4; d += 4) llm_st(o + d, acc[d / 4]);
            for (int d = hs4; d < hs; d++) o[d] = tail[d - hs4];
        }
    }
}

/* Common head sizes get their own copy of IMPL with hs a constant, which changes the speed
   only (the accumulators of a head stay in registers). */
#define LLM_ATTEND_BY_HEAD_SIZE(IMPL, F16)                                                     \
    switch (hs) {                                                                              \
    case 8: IMPL(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, 8, att, att_stride, F16); break;     \
    case 64: IMPL(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, 64, att, att_stride, F16); break;   \
    case 128: IMPL(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, 128, att, att_stride, F16); break; \
    case 256: IMPL(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, 256, att, att_stride, F16); break; \
    default: IMPL(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, hs, att, att_stride, F16);          \
    }
/* Each element type gets its own copy too (f16 a constant in each). */
#define LLM_ATTEND_BY_TYPE(IMPL)                                                               \
    if (f16) { LLM_ATTEND_BY_HEAD_SIZE(IMPL, 1) } else { LLM_ATTEND_BY_HEAD_SIZE(IMPL, 0) }

#ifdef LLM_HAVE_AVX
/* The attention above with 8 lanes where it had 4 (AVX2): each lane performs the same
   operations in the same order as before, so the bits are those of the SSE code. */
typedef int llm_v8i __attribute__((vector_size(32)));
#define LLM_AVX2 __attribute__((target("avx2,f16c"), always_inline)) static inline

LLM_AVX2 llm_v8 llm_ld8(const float *p) { return *(const llm_v8u *)p; }
LLM_AVX2 void llm_st8(float *p, llm_v8 v) { *(llm_v8u *)p = v; }
LLM_AVX2 llm_v8 llm_splat8(float x) { llm_v8 v = {x, x, x, x, x, x, x, x}; return v; }
/* 8 elements from p + i as floats: a float16 page through F16C (exact, as llm_half_to_float). */
__attribute__((target("avx2,f16c"), always_inline)) static inline llm_v8 llm_kv8(const void *p, Py_ssize_t i,
                                                                              const int f16) {
    if (!f16) return llm_ld8((const float *)p + i);
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    llm_v8 r;
    __builtin_memcpy(&r, &v, sizeof r);
    return r;
}
LLM_AVX2 llm_v4 llm_lo4(llm_v8 v) { llm_v4 r; __builtin_memcpy(&r, &v, sizeof r); return r; }
LLM_AVX2 llm_v4 llm_hi4(llm_v8 v) {
    llm_v4 r; __builtin_memcpy(&r, (const char *)&v + sizeof r, sizeof r); return r;
}
LLM_AVX2 llm_v8 llm_select8(llm_v8i mask, llm_v8 a, llm_v8 b) {
    llm_v8i ai, bi, ri;
    llm_v8 r;
    __builtin_memcpy(&ai, &a, sizeof a);
    __builtin_memcpy(&bi, &b, sizeof b);
    ri = (ai & mask) | (bi & ~mask);
    __builtin_memcpy(&r, &ri, sizeof r);
    return r;
}

/* llm_exp4 on 8 lanes, operation for operation. */
LLM_AVX2 llm_v8 llm_exp8(llm_v8 x) {
    LLM_EXP_BODY(llm_v8, llm_v8i, llm_splat8, llm_select8, x)
}

/* llm_softmax: the 8-element steps add their low then high half into the 4-lane sum,
   as the SSE code adds e0 then e1. */
LLM_AVX2 void llm_softmax_avx2(float *x, int n) {
    const float m = llm_row_max(x, n);
    const llm_v8 vm8 = llm_splat8(m);
    llm_v4 acc = {0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        llm_v8 e = llm_exp8(llm_ld8(x + i) - vm8);
        llm_st8(x + i, e);
        acc += llm_lo4(e);
        acc += llm_hi4(e);
    }
    llm_softmax_finish(x, n, i, m, acc);
}

LLM_AVX2 void llm_attend_avx2_impl(float *out, const float *q, const void *layer,
                                  const int *bt, int first_pos, int n_pos, Py_ssize_t block_stride,
                                  int bs, int n_kv, int group, const int hs,
                                  float *att, int att_stride, const int f16)
{
    const Py_ssize_t head = (Py_ssize_t)hs * bs;
    const int hs8 = hs & ~7;
    const int hs4 = hs & ~3;
    for (int g = 0; g < n_kv; g++) {
        for (int h = 0; h < group; h++) {
            const float *qh = q + (Py_ssize_t)(g * group + h) * hs;
            float *ah = att + (Py_ssize_t)h * att_stride;
            for (int b = first_pos / bs, t = first_pos; t < n_pos; b++) {
                const void *kt = llm_kv_at(layer, (Py_ssize_t)bt[b] * block_stride + g * head, f16);
                float *ab = ah + b * bs - first_pos;
                const int m = n_pos - b * bs < bs ? n_pos - b * bs : bs;
                int s = t - b * bs;
                for (; s + 8 <= m; s += 8) {
                    llm_v8 acc = llm_splat8(qh[0]) * llm_kv8(kt, s, f16);
                    for (int d = 1; d < hs; d++)
                        acc += llm_splat8(qh[d]) * llm_kv8(kt, (Py_ssize_t)d * bs + s, f16);
                    llm_st8(ab + s, acc);
                }
                for (; s + 4 <= m; s += 4) {
                    llm_v4 acc = llm_splat(qh[0]) * llm_kv4(kt, s, f16);
                    for (int d = 1; d < hs; d++)
                        acc += llm_splat(qh[d]) * llm_kv4(kt, (Py_ssize_t)d * bs + s, f16);
                    llm_st(ab + s, acc);
                }
                for (; s < m; s++) {
                    float acc = qh[0] * llm_kv1(kt, s, f16);
                    for (int d = 1; d < hs; d++) acc += qh[d] * llm_kv1(kt, (Py_ssize_t)d * bs + s, f16);
                    ab[s] = acc;
                }
                t = b * bs + m;
            }
            llm_softmax_avx2(ah, n_pos - first_pos);
            llm_v8 acc8[LLM_MAX_HEAD / 8];
            llm_v4 acc4 = llm_splat(0.0f);
            float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int d = 0; d < hs8; d += 8) acc8[d / 8] = llm_splat8(0.0f);
            for (int b = first_pos / bs, t = first_pos; t < n_pos; b++) {
                const void *vb = llm_kv_at(layer, (Py_ssize_t)bt[b] * block_stride
                                           + (Py_ssize_t)n_kv * head + g * head, f16);
                const int m = n_pos - b * bs < bs ? n_pos - b * bs : bs;
                for (int s = t - b * bs; s < m; s++, t++) {
                    const void *vp = llm_kv_at(vb, (Py_ssize_t)s * hs, f16);
                    const float a = ah[t - first_pos];
                    const llm_v8 va = llm_splat8(a);
                    for (int d = 0; d < hs8; d += 8) acc8[d / 8] += va * llm_kv8(vp, d, f16);
                    if (hs4 > hs8) acc4 += llm_splat(a) * llm_kv4(vp, hs8, f16);
                    for (int d = hs4; d < hs; d++) tail[d - hs4] += a * llm_kv1(vp, d, f16);
                }
            }
            float *o = out + (Py_ssize_t)(g * group + h) * hs;
            for (int d = 0; d < hs8; d += 8) llm_st8(o + d, acc8[d / 8]);
            if (hs4 > hs8) llm_st(o + hs8, acc4);
            for (int d = hs4; d < hs; d++) o[d] = tail[d - hs4];
        }
    }
}

__attribute__((target("avx2,f16c")))
static void llm_attend_avx2(float *out, const float *q, const void *layer, const int *bt,
                            int first_pos, int n_pos, Py_ssize_t block_stride, int bs, int n_kv,
                            int group, int hs, float *att, int att_stride, int f16)
{
    LLM_ATTEND_BY_TYPE(llm_attend_avx2_impl)
}
#endif

/* One row's attention at one layer. q holds the row's query heads, already scaled;
   layer points at this layer's page in block 0, and block b's page is bt[b] *
   block_stride floats further. Per query head: scores for t = first_pos..n_pos-1 (a
   sliding window starts after 0; a row's window depends only on its position)
   (score t sums d = 0..hs-1 in order; slots go 8 (AVX2) or 4 to a vector and the rest
   through a scalar loop, all performing the same operations per score), a softmax,
   then V weighted and summed in order of t. */
static void llm_attend(float *out, const float *q, const void *layer, const int *bt,
                       int first_pos, int n_pos, Py_ssize_t block_stride, int bs, int n_kv,
                       int group, int hs, float *att, int att_stride, int f16)
{
#ifdef LLM_HAVE_AVX
    if (llm_simd_level > 1) {
        llm_attend_avx2(out, q, layer, bt, first_pos, n_pos, block_stride, bs, n_kv, group, hs, att, att_stride,
                        f16);
        return;
    }
#endif
    LLM_ATTEND_BY_TYPE(llm_attend_impl)
}

/* Threads inside a step (llm_pool.h). Each output of a matmul is computed by exactly
   one thread with the code one thread would run (columns [j0, j1) per thread, a fixed
   partition), and each row's attention by one thread into its own scratch, so results
   never depend on the thread count. Small products stay on the calling thread: waking
   others costs more than they save. */
#include "llm_pool.h"
#define LLM_PAR_MIN_MACS (1 << 18)
static int llm_threads = 1;

typedef struct {
    float *out; Py_ssize_t os; const float *x; Py_ssize_t xs; const float *w;
    int n_rows, n_in, n_out;
} llm_matmul_job;

/* Outputs per panel: a thread walks its share of the outputs a panel at a time, and every
   row tile of the step reads that panel's weights, so a matrix streams from memory once a
   step, not once per four rows (prefill and batched decode are then compute-bound). About
   32 KiB of weights, a multiple of 8 outputs. Only the order of whole outputs changes:
   each output's sums are the same bits. */
static inline int llm_panel(Py_ssize_t row_bytes) {
    Py_ssize_t outs = (32 * 1024) / (row_bytes > 0 ? row_bytes : 1);
    outs = outs < 8 ? 8 : outs & ~(Py_ssize_t)7;
    return (int)outs;
}

static void llm_matmul_share(void *p, int t, int n) {
    const llm_matmul_job *j = (const llm_matmul_job *)p;
    const int j0 = (int)((long long)j->n_out * t / n) & ~7;
    const int j1 = t == n - 1 ? j->n_out : (int)((long long)j->n_out * (t + 1) / n) & ~7;
    const int panel = llm_panel(j->n_in * (Py_ssize_t)sizeof(float));
    for (int p0 = j0; p0 < j1; p0 += panel) {
        const int width = j1 - p0 < panel ? j1 - p0 : panel;
        llm_matmul(j->out + p0, j->os, j->x, j->xs, j->w + (Py_ssize_t)p0 * j->n_in,
                   j->n_rows, j->n_in, width);
    }
}

static void llm_matmul_par(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                           const float *w, int n_rows, int n_in, int n_out)
{
    const int nt = llm_threads;
    llm_matmul_job job = {out, os, x, xs, w, n_rows, n_in, n_out};
    if (nt <= 1 || n_out < 16 * nt || (double)n_rows * n_in * n_out < LLM_PAR_MIN_MACS)
        llm_matmul_share(&job, 0, 1);
    else
        llm_parallel(llm_matmul_share, &job, nt);
}

typedef struct {
    float *out; Py_ssize_t os; const float *q; int qd; const void *layer; const int *bt;
    int bt_width; const int *row_seq; const int *positions; int n, window;
    Py_ssize_t block_stride; int bs, n_kv, group, hs; float *att; int att_stride, att_rows, f16;
} llm_attend_job;

/* Thread t takes rows t, t + n, ...; its scores go to att + t * att_rows * att_stride. */
static void llm_attend_share(void *p, int t, int n) {
    const llm_attend_job *j = (const llm_attend_job *)p;
    float *att = j->att + (Py_ssize_t)t * j->att_rows * j->att_stride;
    for (int r = t; r < j->n; r += n) {
        const int pos = j->positions[r];
        const int first = j->window && pos >= j->window ? pos + 1 - j->window : 0;
        llm_attend(j->out + r * j->os, j->q + (Py_ssize_t)r * j->qd, j->layer,
                   j->bt + j->row_seq[r] * j->bt_width, first, pos + 1, j->block_stride,
                   j->bs, j->n_kv, j->group, j->hs, att, j->att_stride, j->f16);
    }
}

/* Every row's attention at one layer; a row at position p reads positions from
   p + 1 - window on (0: all). att holds `threads` sets of att_rows score rows. layer: the
   layer's first element in the pool (float32, or float16 with f16). */
static void llm_attend_rows(float *out, Py_ssize_t os, const float *q, int qd,
                            const void *layer, const int *bt, int bt_width,
                            const int *row_seq, const int *positions, int n, int window,
                            Py_ssize_t block_stride, int bs, int n_kv, int group, int hs,
                            float *att, int att_stride, int att_rows, int threads, int f16)
{
    llm_attend_job job = {out, os, q, qd, layer, bt, bt_width, row_seq, positions, n, window,
                          block_stride, bs, n_kv, group, hs, att, att_stride, att_rows, f16};
    const int nt = threads < n ? threads : n;
    if (nt <= 1)
        llm_attend_share(&job, 0, 1);
    else
        llm_parallel(llm_attend_share, &job, nt);
}

/* 8-bit weights: packed Q8_0 or Q8S groups (llm_q8.h, llm_q8_gemm.h). The step's activation
   rows are quantised once per matmul, then each thread takes a fixed share of the outputs,
   a panel at a time, as for float weights. */
#include "llm_q8_gemm.h"

#define LLM_W_F32 0
#define LLM_W_Q8_0 1  /* packed Q8_0 */
#define LLM_W_Q8S 2   /* packed Q8S from Q4_1/Q5_1: activations in blocks of 32 */
#define LLM_W_Q8K 3   /* packed Q8S from a K-quant: activations in blocks of 256 */

typedef struct {
    float *out; Py_ssize_t os; const int8_t *xq; const float *xd; const llm_act_sums *xs;
    int n_rows, n_in; const uint8_t *w; int n_out, kind;
} llm_q8_job;

static void llm_q8_share(void *p, int t, int n) {
    const llm_q8_job *j = (const llm_q8_job *)p;
    const int j0 = (int)((long long)j->n_out * t / n) & ~(LLM_GROUP - 1);
    const int j1 = t == n - 1 ? j->n_out : (int)((long long)j->n_out * (t + 1) / n) & ~(LLM_GROUP - 1);
    const int q8s = j->kind != LLM_W_Q8_0;
    const Py_ssize_t group_bytes = (Py_ssize_t)(j->n_in / LLM_QK) * (q8s ? LLM_Q8SP_BLOCK : LLM_Q8P_BLOCK);
    const int panel = (llm_panel(group_bytes / LLM_GROUP) + LLM_GROUP - 1) & ~(LLM_GROUP - 1);
    for (int p0 = j0; p0 < j1; p0 += panel) {
        const int width = j1 - p0 < panel ? j1 - p0 : panel;
        llm_gemm_q8(llm_simd_level, q8s, j->out + p0, j->os, j->xq, j->xd, j->xs, j->n_rows,
                    j->n_in, j->w + (Py_ssize_t)(p0 / LLM_GROUP) * group_bytes, width);
    }
}

/* Rows of activations quantised for the 8-bit matmuls (llm_q8.h's blocks, with their sums),
   in blocks of 256 for K-quant weights. */
static void llm_quantize_rows(const float *x, Py_ssize_t xs, int n_rows, int n_in, int k_quant,
                              int8_t *xq, float *xd, llm_act_sums *xsum)
{
    const int nb = n_in / LLM_QK;
    for (int r = 0; r < n_rows; r++) {
        const float *row = x + r * xs;
        int8_t *q = xq + (Py_ssize_t)r * n_in;
        float *d = xd + (Py_ssize_t)r * nb;
        llm_act_sums *a = xsum + (Py_ssize_t)r * nb;
        if (k_quant)
            llm_quantize_row_q8k(row, n_in, q, d, a);
        else
            llm_quantize_row_q8(row, n_in, q, d, a);
    }
}

/* out = x . W for W in float32 (w, kind LLM_W_F32) or packed 8-bit blocks (wq, of `kind`).
   xq, xd, xsum hold the first n_real rows of x quantised as *acts says (-1: not yet; 0: in
   blocks of 32; 1: of 256): quantised here when this kind wants another form, so matmuls that
   read the same rows (q, k and v; gate and up) share one quantisation; the caller sets *acts
   to -1 when x changes. xq has room for 16 rows past n_real (AMX reads whole tiles). n_rows is padded to a multiple of 4 for the float kernel; the 8-bit
   ones compute only the first n_real rows (a lone decode row costs one row, not four) and
   zero the padding's outputs. */
static void llm_matmul_w(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                         int n_rows, int n_real, int n_in, int n_out, const float *w,
                         const uint8_t *wq, int kind, int8_t *xq, float *xd, llm_act_sums *xsum,
                         int *acts)
{
    if (kind == LLM_W_F32) {
        llm_matmul_par(out, os, x, xs, w, n_rows, n_in, n_out);
        return;
    }
    const int want = kind == LLM_W_Q8K;
    if (*acts != want) {
        llm_quantize_rows(x, xs, n_real, n_in, want, xq, xd, xsum);
        *acts = want;
    }
    for (int r = n_real; r < n_rows; r++) memset(out + (Py_ssize_t)r * os, 0, n_out * sizeof(float));
    llm_q8_job job = {out, os, xq, xd, xsum, n_real, n_in, wq, n_out, kind};
    const int nt = llm_threads;
    if (nt <= 1 || n_out < 16 * nt || (double)n_real * n_in * n_out < LLM_PAR_MIN_MACS)
        llm_q8_share(&job, 0, 1);
    else
        llm_parallel(llm_q8_share, &job, nt);
}

/* Row `token` of the embedding table, in floats, however the table is held. */
static void llm_embedding_row(int kind, const float *wf, const uint8_t *wq, int token, int dim,
                              float *out)
{
    if (kind == LLM_W_F32)
        memcpy(out, wf + (Py_ssize_t)token * dim, dim * sizeof(float));
    else
        llm_dequantize_packed_row(wq, kind != LLM_W_Q8_0, token, dim, out);
}

#endif
