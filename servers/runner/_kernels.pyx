# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Batch-invariant forward pass (every family in architectures.py) over a paged KV pool, in C
loops without the GIL; the C is in include/ (llm_kernels.h: float kernels, attention, the
thread dispatch; llm_q8.h, llm_q8_gemm.h: 8-bit weights; llm_pool.h: the threads).

Runs inside a runner process. Owns only its scratch buffers; it reads weights the caller
keeps alive and writes the KV pages and logits rows the caller names. It never allocates KV,
never checks its inputs (model.py validates before the call) and never raises under nogil.
Every row (one token of one sequence) runs the same sequence of float operations whatever
the batch, the chunking or prefill vs decode, so its results are bit-identical in any batch.
"""

import numpy as np

from libc.math cimport sqrtf
from libc.string cimport memcpy

cdef extern from "llm_kernels.h":
    ctypedef struct llm_act_sums:  # an activation block's sums (llm_q8.h): 4 x 4 bytes
        pass
    void llm_matmul(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                    const float *w, int n_rows, int n_in, int n_out) noexcept nogil
    int llm_simd_level
    int llm_detect_simd() noexcept nogil
    int llm_simd_supported(int level) noexcept nogil
    void llm_matmul_w(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs, int n_rows, int n_real, int n_in,
                      int n_out, const float *w, const unsigned char *wq, int kind, signed char *xq,
                      float *xd, llm_act_sums *xsum, int *acts) noexcept nogil
    void llm_embedding_row(int kind, const float *wf, const unsigned char *wq, int token, int dim,
                           float *out) noexcept nogil
    int llm_threads
    int LLM_MAX_THREADS
    void llm_matmul_par(float *out, Py_ssize_t os, const float *x, Py_ssize_t xs,
                        const float *w, int n_rows, int n_in, int n_out) noexcept nogil
    void llm_attend_rows(float *out, Py_ssize_t os, const float *q, int qd, const void *layer,
                         const int *bt, int bt_width, const int *row_seq, const int *positions,
                         int n, int window, Py_ssize_t block_stride, int bs, int n_kv, int group,
                         int hs, float *att, int att_stride, int att_rows, int threads, int f16) noexcept nogil
    float llm_sumsq(const float *x, int n) noexcept nogil
    void llm_swiglu(float *hb, const float *hb2, int n) noexcept nogil
    void llm_geglu(float *hb, const float *hb2, int n) noexcept nogil
    void llm_write_kv(void *page, const float *k, const float *v, int slot, int bs,
                      int n_kv, int hs, int f16) noexcept nogil


# Slot order of _kernels.pxd's W_* enum; the last seven may be None (a family without them).
LAYER_FIELDS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                "q_norm", "k_norm", "post_att_norm", "post_ffn_norm", "bq", "bk", "bv")

# "vnni": AVX-VNNI (256 bits); "avx512": AVX-512 with VNNI; "amx": AVX-512 and AMX tiles.
SIMD_LEVELS = ("sse", "avx", "avx2", "vnni", "avx512", "amx")
llm_simd_level = llm_detect_simd()


def simd_level() -> str:
    """The widest instruction set the kernels use in this process (one of SIMD_LEVELS)."""
    return SIMD_LEVELS[llm_simd_level]


def supported_simd_levels() -> tuple[str, ...]:
    """The levels this CPU can run (a CPU may have AVX-512 VNNI and not AVX-VNNI)."""
    return tuple(name for i, name in enumerate(SIMD_LEVELS) if llm_simd_supported(i))


def threads() -> int:
    """Threads a step uses in this process."""
    return llm_threads


def set_threads(n: int) -> None:
    """Use ``n`` threads per step (results are the same bits for every ``n``)."""
    global llm_threads
    if not 1 <= n <= LLM_MAX_THREADS:
        raise ValueError(f"threads must be in [1, {LLM_MAX_THREADS}], got {n}")
    llm_threads = n


def set_simd_level(level: str) -> None:
    """Force a matmul instruction set (tests: both must give the same bits)."""
    global llm_simd_level
    wanted = SIMD_LEVELS.index(level)
    if not llm_simd_supported(wanted):
        raise ValueError(f"this CPU has no {level}")
    llm_simd_level = wanted


cdef const float *_ptr(object array, list keep) except? NULL:
    # None (a tensor the family does not have) is NULL; the forward pass skips it.
    if array is None:
        return NULL
    cdef const float[::1] mv = array.reshape(-1)
    keep.append(mv)
    return &mv[0]


def q8_matmul(const float[:, ::1] x, matrix):
    """x @ W.T for W an 8-bit matrix (q8.py's Q8Matrix or Q8SMatrix): the runner's 8-bit
    matmul on its own, for tests. Returns float32 (len(x), rows of W)."""
    cdef int n = x.shape[0], n4 = (x.shape[0] + 3) & ~3, cols = matrix.cols, n_out = matrix.rows
    if x.shape[1] != cols:
        raise ValueError(f"x has {x.shape[1]} columns; the matrix {cols}")
    cdef const unsigned char[::1] blocks = matrix.blocks.reshape(-1)
    padded = np.zeros((n4, cols), np.float32)
    padded[:n] = x
    out = np.empty((n4, n_out), np.float32)
    xq = np.zeros((n4 + 16, cols), np.int8)  # 16 rows of room: AMX reads whole tiles
    xd = np.empty((n4, cols // 32 + 1), np.float32)
    xs = np.empty((n4, (cols // 32 + 1) * 4), np.int32)  # llm_act_sums per block
    cdef float[:, ::1] p = padded, o = out, d = xd
    cdef signed char[:, ::1] q = xq
    cdef int[:, ::1] sums = xs
    cdef int kind = matrix.KIND, acts = -1
    with nogil:
        llm_matmul_w(&o[0, 0], n_out, &p[0, 0], cols, n4, n, cols, n_out, NULL, &blocks[0], kind,
                     &q[0, 0], &d[0, 0], <llm_act_sums *>&sums[0, 0], &acts)
    return out[:n]


cdef int _kind(object matrix):
    # 0: float32 (or absent), 1: packed Q8_0, 2: packed Q8S (servers/runner/q8.py).
    return getattr(matrix, "KIND", 0)


cdef const unsigned char *_q8_ptr(object matrix, list keep) except? NULL:
    # An 8-bit matrix's packed blocks; None or a float matrix: NULL.
    if matrix is None or not hasattr(matrix, "blocks"):
        return NULL
    cdef const unsigned char[::1] mv = matrix.blocks.reshape(-1)
    keep.append(mv)
    return &mv[0]


cdef const float *_f32_ptr(object matrix, list keep) except? NULL:
    if hasattr(matrix, "blocks"):
        return NULL
    return _ptr(matrix, keep)


cdef inline void _add_bias(float *y, const float *b, int n_rows, int width) noexcept nogil:
    cdef int r, i
    if b == NULL:
        return
    for r in range(n_rows):
        for i in range(width):
            y[r * width + i] += b[i]


cdef inline void _head_norms(float *y, const float *w, int n_heads, int hs, float eps) noexcept nogil:
    # Per-head RMSNorm in place (qwen3's and gemma3's q/k norms): each head its own row.
    cdef int h
    if w == NULL:
        return
    for h in range(n_heads):
        _rmsnorm(y + h * hs, y + h * hs, w, hs, eps)


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


cdef class Engine:
    """Weight pointers and scratch for one model; ``forward`` runs one batched step."""

    # Fields are declared in _kernels.pxd.

    def __init__(self, config, weights, rope_cos, rope_sin, kv_f16=False):
        if config.n_layers > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers")
        if config.head_size > MAX_HEAD:
            raise ValueError(f"head_size at most {MAX_HEAD}")
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
        self.gelu = 1 if config.activation == "gelu_tanh" else 0
        self.embed_scale = <float>config.embed_scale
        self.query_scale = <float>config.scale_of_queries
        self.kv_f16 = 1 if kv_f16 else 0
        self.keep = []
        self.emb = _f32_ptr(weights.tok_embeddings, self.keep)
        self.emb_q8 = _q8_ptr(weights.tok_embeddings, self.keep)
        self.emb_kind = _kind(weights.tok_embeddings)
        self.rms_final = _ptr(weights.rms_final, self.keep)
        self.wcls = _f32_ptr(weights.wcls, self.keep)
        self.wcls_q8 = _q8_ptr(weights.wcls, self.keep)
        self.wcls_kind = _kind(weights.wcls)
        cdef int l, f
        for l in range(self.n_layers):
            layer = weights.layers[l]
            for f in range(W_PER_LAYER):
                self.layer_ptrs[l * W_PER_LAYER + f] = _f32_ptr(getattr(layer, LAYER_FIELDS[f]), self.keep)
                self.layer_q8[l * W_PER_LAYER + f] = _q8_ptr(getattr(layer, LAYER_FIELDS[f]), self.keep)
                self.layer_kind[l * W_PER_LAYER + f] = _kind(getattr(layer, LAYER_FIELDS[f]))
            # A local layer reads the last `sliding_window` positions, with rope table 1.
            local = config.is_local(l)
            self.layer_window[l] = config.sliding_window if local else 0
            self.layer_rope[l] = 1 if local else 0
        if rope_cos.ndim != 3 or rope_cos.shape[0] < (2 if config.swa_pattern else 1):
            raise ValueError("rope tables must be (n_tables, seq_len, head_size // 2)")
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
        # Quantised activation rows for Q8_0 matmuls: the widest input any matmul has.
        widest = max(self.dim, self.q_dim, self.hidden_dim)
        self.xq = z((rows + 16, widest), np.int8)  # 16 rows of room: AMX reads whole tiles
        self.xd = z((rows, widest // 32 + 1), np.float32)
        self.xs = z((rows, (widest // 32 + 1) * 4), np.int32)  # llm_act_sums per block
        self.att = z((self.n_heads // self.n_kv_heads, self.seq_len), np.float32)
        self.scratch_rows = rows

    def forward(self, const int[::1] tokens, const int[::1] positions, const int[::1] row_seq,
                const int[:, ::1] block_tables, unsigned char[::1] kv, int block_tokens,
                const int[::1] logit_rows, float[:, ::1] logits_out):
        """Run every layer for ``len(tokens)`` rows, writing their K/V into ``kv``.

        Row r is token ``tokens[r]`` at position ``positions[r]`` of the sequence whose
        block table is ``block_tables[row_seq[r]]``. ``kv`` is the pool's bytes, of shape
        (num_blocks, n_layers, 2, n_kv_heads, head_size * block_tokens) in float32 (float16 when
        the engine was made with ``kv_f16``). The final-norm logits of row
        ``logit_rows[m]`` go to ``logits_out[m]``. All of it is validated by the caller.
        """
        cdef int n = tokens.shape[0]
        cdef int m_rows = logit_rows.shape[0]
        self._grow(max(n, m_rows))
        # Scores: each thread needs one row per query head of a KV group. The count is read
        # once here, so the buffer always matches what the kernels are told.
        cdef int threads = llm_threads
        cdef int group_rows = self.n_heads // self.n_kv_heads
        if self.att.shape[0] < threads * group_rows:
            self.att = np.zeros((threads * group_rows, self.seq_len), np.float32)
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
        cdef unsigned char *kvp = &kv[0]
        cdef int f16 = self.kv_f16
        cdef Py_ssize_t esize = 2 if f16 else 4
        cdef const int *bt = &block_tables[0, 0]
        cdef const float **w
        cdef const unsigned char **w8
        cdef signed char *xq = &self.xq[0, 0]
        cdef float *xd = &self.xd[0, 0]
        cdef llm_act_sums *xs = <llm_act_sums *>&self.xs[0, 0]
        cdef const int *wk
        cdef int r, l, i, pos, blk, acts = -1
        cdef float *att = &self.att[0, 0]
        # Floats between one block and the next, and between one layer and the next.
        cdef Py_ssize_t block_stride = <Py_ssize_t>n_layers * 2 * block_tokens * kvd
        cdef Py_ssize_t layer_off = <Py_ssize_t>2 * block_tokens * kvd
        cdef int window, tab
        cdef float escale = self.embed_scale, qscale = self.query_scale
        with nogil:
            for r in range(n):
                llm_embedding_row(self.emb_kind, self.emb, self.emb_q8, tokens[r], dim, x + r * dim)
                if escale != <float>1.0:
                    for i in range(dim):
                        x[r * dim + i] = x[r * dim + i] * escale
            for l in range(n_layers):
                w = &self.layer_ptrs[l * W_PER_LAYER]
                w8 = &self.layer_q8[l * W_PER_LAYER]
                wk = &self.layer_kind[l * W_PER_LAYER]
                window = self.layer_window[l]
                tab = self.layer_rope[l]
                for r in range(n):
                    _rmsnorm(xb + r * xbs, x + r * dim, w[W_RMS_ATT], dim, eps)
                acts = -1  # new rows in xb: the projections quantise them once
                llm_matmul_w(q, qd, xb, xbs, n4, n, dim, qd, w[W_Q], w8[W_Q], wk[W_Q], xq, xd, xs, &acts)
                llm_matmul_w(k, kvd, xb, xbs, n4, n, dim, kvd, w[W_K], w8[W_K], wk[W_K], xq, xd, xs, &acts)
                llm_matmul_w(v, kvd, xb, xbs, n4, n, dim, kvd, w[W_V], w8[W_V], wk[W_V], xq, xd, xs, &acts)
                _add_bias(q, w[W_BQ], n, qd)
                _add_bias(k, w[W_BK], n, kvd)
                _add_bias(v, w[W_BV], n, kvd)
                # Every row's K/V is in the pool before any row attends: a prefill chunk's
                # row t then reads rows < t of the same chunk exactly as a decode would.
                for r in range(n):
                    pos = positions[r]
                    _head_norms(q + r * qd, w[W_Q_NORM], n_heads, hs, eps)
                    _head_norms(k + r * kvd, w[W_K_NORM], n_kv, hs, eps)
                    _rope(q + r * qd, n_heads, hs, self.halves,
                          &self.rope_cos[tab, pos, 0], &self.rope_sin[tab, pos, 0])
                    _rope(k + r * kvd, n_kv, hs, self.halves,
                          &self.rope_cos[tab, pos, 0], &self.rope_sin[tab, pos, 0])
                    # Fold the score scale into the query once.
                    for i in range(qd):
                        q[r * qd + i] = q[r * qd + i] * qscale
                    blk = bt[row_seq[r] * bt_width + pos // block_tokens]
                    llm_write_kv(kvp + (blk * block_stride + l * layer_off) * esize, k + r * kvd,
                                 v + r * kvd, pos % block_tokens, block_tokens, n_kv, hs, f16)
                llm_attend_rows(xb, xbs, q, qd, kvp + layer_off * l * esize, bt, bt_width, &row_seq[0],
                                &positions[0], n, window, block_stride, block_tokens, n_kv, group,
                                hs, att, self.seq_len, group_rows, threads, f16)
                acts = -1
                llm_matmul_w(xb2, dim, xb, xbs, n4, n, qd, dim, w[W_O], w8[W_O], wk[W_O], xq, xd, xs, &acts)
                for r in range(n):
                    if w[W_POST_ATT] != NULL:
                        _rmsnorm(xb2 + r * dim, xb2 + r * dim, w[W_POST_ATT], dim, eps)
                    for i in range(dim):
                        x[r * dim + i] += xb2[r * dim + i]
                    _rmsnorm(xb + r * xbs, x + r * dim, w[W_RMS_FFN], dim, eps)
                acts = -1
                llm_matmul_w(hb, hidden, xb, xbs, n4, n, dim, hidden, w[W_1], w8[W_1], wk[W_1], xq, xd, xs, &acts)
                llm_matmul_w(hb2, hidden, xb, xbs, n4, n, dim, hidden, w[W_3], w8[W_3], wk[W_3], xq, xd, xs, &acts)
                for r in range(n):
                    if self.gelu:
                        llm_geglu(hb + r * hidden, hb2 + r * hidden, hidden)
                    else:
                        llm_swiglu(hb + r * hidden, hb2 + r * hidden, hidden)
                acts = -1
                llm_matmul_w(xb2, dim, hb, hidden, n4, n, hidden, dim, w[W_2], w8[W_2], wk[W_2], xq, xd, xs, &acts)
                for r in range(n):
                    if w[W_POST_FFN] != NULL:
                        _rmsnorm(xb2 + r * dim, xb2 + r * dim, w[W_POST_FFN], dim, eps)
                    for i in range(dim):
                        x[r * dim + i] += xb2[r * dim + i]
            # Classifier only for the rows that asked: gather their normed states first.
            for i in range(m_rows):
                _rmsnorm(xb + i * xbs, x + logit_rows[i] * dim, self.rms_final, dim, eps)
            acts = -1
            if m_rows and self.wcls_kind:  # 8-bit: no padding rows, so straight into logits_out
                llm_matmul_w(&logits_out[0, 0], vocab, xb, xbs, m_rows, m_rows, dim, vocab, NULL,
                             self.wcls_q8, self.wcls_kind, xq, xd, xs, &acts)
            elif m_rows:
                llm_matmul_w(lg, vocab, xb, xbs, m4, m_rows, dim, vocab, self.wcls, NULL, 0, xq, xd, xs, &acts)
                for i in range(m_rows):
                    memcpy(&logits_out[i, 0], lg + i * vocab, vocab * sizeof(float))


cdef int _copy_ints(object values, long long *out, Py_ssize_t n) except -1:
    # ndarrays through a typed view (no per-element Python objects); sequences item by item.
    cdef const long long[::1] view
    cdef Py_ssize_t j
    if isinstance(values, np.ndarray):
        view = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
        if view.shape[0] < n:
            raise ValueError("sequence shorter than its length")
        for j in range(n):
            out[j] = view[j]
    else:
        for j in range(n):
            out[j] = values[j]
    return 0


def pack_chunks(list chunks, int block_tokens, int num_blocks, int vocab_size, int seq_len):
    """Flatten a step's chunks into the arrays ``Engine.forward`` takes, validating them.

    Returns (tokens, positions, row_seq, tables, logit_rows, wants): int32 arrays, where
    ``tables`` holds, per chunk, the block-table entries its positions need (the only ones
    the kernel reads) and ``wants`` the indices of the chunks that asked for logits.

    Raises:
        ValueError: an empty chunk, a token or block id out of range, a position outside
            the context, a block table too short, or two rows writing the same KV slot.
    """
    cdef Py_ssize_t n_chunks = len(chunks), i, j, r, n, start, need, n_rows = 0, width = 1
    cdef Py_ssize_t n_wants = 0
    cdef object ch
    for i in range(n_chunks):
        ch = chunks[i]
        n = len(ch.token_ids)
        start = ch.start_pos
        if n <= 0:
            raise ValueError("every chunk needs at least one token")
        if start < 0 or start + n > seq_len:
            raise ValueError(f"positions must lie in [0, {seq_len}): chunk {i} covers "
                             f"[{start}, {start + n})")
        need = (start + n - 1) // block_tokens + 1
        if len(ch.block_table) < need:
            raise ValueError(f"a block table is too short for its chunk's positions (chunk {i})")
        n_rows += n
        width = max(width, need)
        if ch.wants_logits:
            n_wants += 1
    tokens_a = np.empty(n_rows, np.int32)
    positions_a = np.empty(n_rows, np.int32)
    row_seq_a = np.empty(n_rows, np.int32)
    tables_a = np.zeros((n_chunks, width), np.int32)
    logit_rows_a = np.empty(n_wants, np.int32)
    wants_a = np.empty(n_wants, np.intp)
    slots_a = np.empty(n_rows, np.int64)
    scratch_a = np.empty(max(n_rows, width), np.int64)
    cdef int[::1] tokens = tokens_a, positions = positions_a, row_seq = row_seq_a
    cdef int[::1] logit_rows = logit_rows_a
    cdef Py_ssize_t[::1] wants = wants_a
    cdef int[:, ::1] tables = tables_a
    cdef long long[::1] slots = slots_a, scratch = scratch_a
    cdef long long value
    r = 0
    n_wants = 0
    for i in range(n_chunks):
        ch = chunks[i]
        n = len(ch.token_ids)
        start = ch.start_pos
        need = (start + n - 1) // block_tokens + 1
        _copy_ints(ch.block_table, &scratch[0], need)
        for j in range(need):
            value = scratch[j]
            if value < 0 or value >= num_blocks:
                raise ValueError(f"block ids must lie in [0, {num_blocks}), got {value}")
            tables[i, j] = <int>value
        _copy_ints(ch.token_ids, &scratch[0], n)
        for j in range(n):
            value = scratch[j]
            if value < 0 or value >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {value}")
            tokens[r] = <int>value
            positions[r] = <int>(start + j)
            row_seq[r] = <int>i
            slots[r] = <long long>tables[i, (start + j) // block_tokens] * block_tokens + (start + j) % block_tokens
            r += 1
        if ch.wants_logits:
            logit_rows[n_wants] = <int>(r - 1)
            wants[n_wants] = i
            n_wants += 1
    slots_a.sort()
    for r in range(1, n_rows):
        if slots[r] == slots[r - 1]:
            raise ValueError("two rows of the step write the same KV slot")
    return tokens_a, positions_a, row_seq_a, tables_a, logit_rows_a, wants_a
