# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Batch-invariant Llama forward pass over a paged KV pool, in C loops without the GIL.

Runs inside a runner process. Owns only its scratch buffers; it reads weights the caller
keeps alive and writes the KV pages and logits rows the caller names. It never allocates KV,
never checks its inputs (model.py validates before the call) and never raises under nogil.
Every row (one token of one sequence) runs the same sequence of float operations whatever
the batch, the chunking or prefill vs decode, so its results are bit-identical in any batch.
"""

import numpy as np

from libc.math cimport expf, sqrtf
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    /* Contraction of a*b+c into an FMA would let the compiler round one code path
       differently from another; keep every multiply and add separately rounded. */
    #if defined(__clang__)
    #pragma STDC FP_CONTRACT OFF
    #elif defined(__GNUC__)
    #pragma GCC push_options
    #pragma GCC optimize ("fp-contract=off")
    #endif

    typedef float llm_v4 __attribute__((vector_size(16)));
    typedef float llm_v4u __attribute__((vector_size(16), aligned(4)));

    static inline llm_v4 llm_ld(const float *p) { return *(const llm_v4u *)p; }

    /* The fixed reduction every dot product ends with: 8 lanes -> 4 -> a pairwise tree. */
    static inline float llm_hsum(llm_v4 a, llm_v4 b) {
        llm_v4 s = a + b;
        return (s[0] + s[1]) + (s[2] + s[3]);
    }

    /* out[r*os + j] = dot(x[r*xs ...], w[j*n_in ...]) for r < n_rows (a multiple of 4).
       Lane l of a row's two accumulators sums elements 8k+l in order of k; a 4-wide tail
       adds into the low accumulator; a scalar tail sums in order; then llm_hsum. Rows are
       blocked by four only to share the weight loads: no row ever reads another's sums,
       so the bits of a row do not depend on its block-mates. */
    static void llm_matmul(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
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

    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC pop_options
    #endif
    """
    void llm_matmul(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                    const float *w, int n_rows, int n_in, int n_out) noexcept nogil
    float llm_dot_head(const float *a, const float *b, int n) noexcept nogil
    float llm_sumsq(const float *x, int n) noexcept nogil

# Slots of one layer's weight pointers in Engine.layer_ptrs (order of LAYER_FIELDS).
cdef enum:
    W_RMS_ATT = 0
    W_Q = 1
    W_K = 2
    W_V = 3
    W_O = 4
    W_RMS_FFN = 5
    W_1 = 6
    W_2 = 7
    W_3 = 8
    W_PER_LAYER = 9
    MAX_LAYERS = 256

LAYER_FIELDS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")


cdef const float *_ptr(object array, list keep) except NULL:
    cdef const float[::1] mv = array.reshape(-1)
    keep.append(mv)
    return &mv[0]


cdef inline void _rmsnorm(float *out, const float *x, const float *w, int n, float eps) noexcept nogil:
    # llama2.c's order: ss/n + eps, then 1/sqrt, then w * (ss * x).
    cdef float ss = llm_sumsq(x, n) / <float>n + eps
    ss = <float>1.0 / sqrtf(ss)
    cdef int j
    for j in range(n):
        out[j] = w[j] * (ss * x[j])


cdef inline void _rope(float *vec, int n_heads, int head_size, int halves,
                       const float *cos_row, const float *sin_row) noexcept nogil:
    cdef int h, j, i0, i1
    cdef int half = head_size // 2
    cdef float v0, v1, c, s
    cdef float *hv
    for h in range(n_heads):
        hv = vec + h * head_size
        for j in range(half):
            if halves:
                i0 = j
                i1 = j + half
            else:
                i0 = 2 * j
                i1 = 2 * j + 1
            c = cos_row[j]
            s = sin_row[j]
            v0 = hv[i0]
            v1 = hv[i1]
            hv[i0] = v0 * c - v1 * s
            hv[i1] = v0 * s + v1 * c


cdef inline void _softmax(float *x, int n) noexcept nogil:
    cdef int i
    cdef float m = x[0]
    for i in range(1, n):
        if x[i] > m:
            m = x[i]
    cdef float total = 0.0
    for i in range(n):
        x[i] = expf(x[i] - m)
        total += x[i]
    for i in range(n):
        x[i] = x[i] / total


cdef class Engine:
    """Weight pointers and scratch for one model; ``forward`` runs one batched step."""

    cdef int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_size, vocab_size, seq_len
    cdef int q_dim, kv_dim, halves
    cdef float eps
    cdef const float *emb
    cdef const float *rms_final
    cdef const float *wcls
    cdef const float *layer_ptrs[W_PER_LAYER * MAX_LAYERS]
    cdef float[:, ::1] rope_cos
    cdef float[:, ::1] rope_sin
    cdef list keep  # the memoryviews behind every pointer above, kept alive with the engine
    cdef object scratch_rows  # capacity of the scratch arrays, in rows
    cdef float[:, ::1] x, xb, xb2, q, k, v, hb, hb2, att, logits

    def __init__(self, config, weights, rope_cos, rope_sin):
        if config.n_layers > MAX_LAYERS:
            raise ValueError("at most 256 layers")
        self.dim = config.dim
        self.hidden_dim = config.hidden_dim
        self.n_layers = config.n_layers
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_size = config.head_size
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len
        self.q_dim = config.q_dim
        self.kv_dim = config.kv_dim
        self.halves = 1 if config.rope_layout == "halves" else 0
        self.eps = <float>config.norm_eps
        self.keep = []
        self.emb = _ptr(weights.tok_embeddings, self.keep)
        self.rms_final = _ptr(weights.rms_final, self.keep)
        self.wcls = _ptr(weights.wcls, self.keep)
        cdef int l, f
        for l in range(self.n_layers):
            layer = weights.layers[l]
            for f in range(W_PER_LAYER):
                self.layer_ptrs[l * W_PER_LAYER + f] = _ptr(getattr(layer, LAYER_FIELDS[f]), self.keep)
        self.rope_cos = rope_cos
        self.rope_sin = rope_sin
        self.scratch_rows = 0
        self._grow(4)

    def _grow(self, int rows):
        # Rows are padded to a multiple of 4 for llm_matmul; pad rows stay finite (zeros).
        rows = (rows + 3) & ~3
        if rows <= self.scratch_rows:
            return
        rows = max(rows, 2 * self.scratch_rows)
        z = np.zeros
        self.x = z((rows, self.dim), np.float32)
        self.xb = z((rows, max(self.dim, self.q_dim)), np.float32)
        self.xb2 = z((rows, self.dim), np.float32)
        self.q = z((rows, self.q_dim), np.float32)
        self.k = z((rows, self.kv_dim), np.float32)
        self.v = z((rows, self.kv_dim), np.float32)
        self.hb = z((rows, self.hidden_dim), np.float32)
        self.hb2 = z((rows, self.hidden_dim), np.float32)
        self.logits = z((rows, self.vocab_size), np.float32)
        self.att = z((self.n_heads, self.seq_len), np.float32)
        self.scratch_rows = rows

    def forward(self, const int[::1] tokens, const int[::1] positions, const int[::1] row_seq,
                const int[:, ::1] block_tables, float[::1] kv, int block_size,
                const int[::1] logit_rows, float[:, ::1] logits_out):
        """Run every layer for ``len(tokens)`` rows, writing their K/V into ``kv``.

        Row r is token ``tokens[r]`` at position ``positions[r]`` of the sequence whose
        block table is ``block_tables[row_seq[r]]``. ``kv`` is the flattened pool of shape
        (num_blocks, n_layers, 2, block_size, kv_dim). The final-norm logits of row
        ``logit_rows[m]`` go to ``logits_out[m]``. All of it is validated by the caller.
        """
        cdef int n = tokens.shape[0]
        cdef int m_rows = logit_rows.shape[0]
        self._grow(max(n, m_rows))
        cdef int n4 = (n + 3) & ~3
        cdef int m4 = (m_rows + 3) & ~3
        cdef int dim = self.dim, hidden = self.hidden_dim, qd = self.q_dim, kvd = self.kv_dim
        cdef int hs = self.head_size, n_layers = self.n_layers, vocab = self.vocab_size
        cdef int n_heads = self.n_heads, n_kv = self.n_kv_heads, group = n_heads // n_kv
        cdef int bt_width = block_tables.shape[1]
        cdef float eps = self.eps
        cdef float *x = &self.x[0, 0]
        cdef float *xb = &self.xb[0, 0]
        cdef float *xb2 = &self.xb2[0, 0]
        cdef float *q = &self.q[0, 0]
        cdef float *k = &self.k[0, 0]
        cdef float *v = &self.v[0, 0]
        cdef float *hb = &self.hb[0, 0]
        cdef float *hb2 = &self.hb2[0, 0]
        cdef float *lg = &self.logits[0, 0]
        cdef int xbs = self.xb.shape[1]
        cdef float *kvp = &kv[0]
        cdef const int *bt = &block_tables[0, 0]
        cdef const float **w
        cdef int r, l, i, pos, blk
        cdef Py_ssize_t off
        cdef float val
        with nogil:
            for r in range(n):
                memcpy(x + r * dim, self.emb + <Py_ssize_t>tokens[r] * dim, dim * sizeof(float))
            for l in range(n_layers):
                w = &self.layer_ptrs[l * W_PER_LAYER]
                for r in range(n):
                    _rmsnorm(xb + r * xbs, x + r * dim, w[W_RMS_ATT], dim, eps)
                llm_matmul(q, qd, xb, xbs, w[W_Q], n4, dim, qd)
                llm_matmul(k, kvd, xb, xbs, w[W_K], n4, dim, kvd)
                llm_matmul(v, kvd, xb, xbs, w[W_V], n4, dim, kvd)
                # Every row's K/V is in the pool before any row attends: a prefill chunk's
                # row t then reads rows < t of the same chunk exactly as a decode would.
                for r in range(n):
                    pos = positions[r]
                    _rope(q + r * qd, n_heads, hs, self.halves,
                          &self.rope_cos[pos, 0], &self.rope_sin[pos, 0])
                    _rope(k + r * kvd, n_kv, hs, self.halves,
                          &self.rope_cos[pos, 0], &self.rope_sin[pos, 0])
                    blk = bt[row_seq[r] * bt_width + pos // block_size]
                    off = ((<Py_ssize_t>blk * n_layers + l) * 2 * block_size + pos % block_size) * kvd
                    memcpy(kvp + off, k + r * kvd, kvd * sizeof(float))
                    memcpy(kvp + off + block_size * kvd, v + r * kvd, kvd * sizeof(float))
                for r in range(n):
                    self._attend(xb + r * xbs, q + r * qd, kvp, bt + row_seq[r] * bt_width,
                                 positions[r], l, block_size, group)
                llm_matmul(xb2, dim, xb, xbs, w[W_O], n4, qd, dim)
                for r in range(n):
                    for i in range(dim):
                        x[r * dim + i] += xb2[r * dim + i]
                    _rmsnorm(xb + r * xbs, x + r * dim, w[W_RMS_FFN], dim, eps)
                llm_matmul(hb, hidden, xb, xbs, w[W_1], n4, dim, hidden)
                llm_matmul(hb2, hidden, xb, xbs, w[W_3], n4, dim, hidden)
                for r in range(n):
                    for i in range(hidden):
                        # SwiGLU as llama2.c writes it: silu(w1 x) * (w3 x)
                        val = hb[r * hidden + i]
                        val = val * (<float>1.0 / (<float>1.0 + expf(-val)))
                        hb[r * hidden + i] = val * hb2[r * hidden + i]
                llm_matmul(xb2, dim, hb, hidden, w[W_2], n4, hidden, dim)
                for r in range(n):
                    for i in range(dim):
                        x[r * dim + i] += xb2[r * dim + i]
            # Classifier only for the rows that asked: gather their normed states first.
            for i in range(m_rows):
                _rmsnorm(xb + i * xbs, x + logit_rows[i] * dim, self.rms_final, dim, eps)
            if m_rows:
                llm_matmul(lg, vocab, xb, xbs, self.wcls, m4, dim, vocab)
            for i in range(m_rows):
                memcpy(&logits_out[i, 0], lg + i * vocab, vocab * sizeof(float))

    cdef void _attend(self, float *out, const float *q, const float *kvp, const int *bt,
                      int pos, int layer, int block_size, int group) noexcept nogil:
        # Per KV head: scores for its `group` query heads in order t = 0..pos, a softmax
        # per head, then the weighted sum of V in the same order.
        cdef int hs = self.head_size, kvd = self.kv_dim, n_layers = self.n_layers
        cdef int S = self.seq_len
        cdef float *att = &self.att[0, 0]
        cdef float scale = sqrtf(<float>hs)
        cdef int g, h, t, i
        cdef Py_ssize_t off
        cdef const float *kp
        cdef const float *vp
        cdef float *o
        cdef float a
        for g in range(self.n_kv_heads):
            for t in range(pos + 1):
                off = ((<Py_ssize_t>bt[t // block_size] * n_layers + layer) * 2 * block_size
                       + t % block_size) * kvd + g * hs
                kp = kvp + off
                for h in range(group):
                    att[h * S + t] = llm_dot_head(q + (g * group + h) * hs, kp, hs) / scale
            for h in range(group):
                _softmax(att + h * S, pos + 1)
            memset(out + g * group * hs, 0, group * hs * sizeof(float))
            for t in range(pos + 1):
                off = ((<Py_ssize_t>bt[t // block_size] * n_layers + layer) * 2 * block_size
                       + block_size + t % block_size) * kvd + g * hs
                vp = kvp + off
                for h in range(group):
                    a = att[h * S + t]
                    o = out + (g * group + h) * hs
                    for i in range(hs):
                        o[i] += a * vp[i]
