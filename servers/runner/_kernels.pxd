# cython: language_level=3
# Declarations for _kernels.pyx: the weight-slot numbering and the Engine's fields.

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
    W_Q_NORM = 9
    W_K_NORM = 10
    W_POST_ATT = 11
    W_POST_FFN = 12
    W_BQ = 13
    W_BK = 14
    W_BV = 15
    W_PER_LAYER = 16
    MAX_LAYERS = 256
    MAX_HEAD = 256  # LLM_MAX_HEAD in the C of _kernels.pyx


cdef class Engine:
    # Set once in __init__ from the ModelConfig.
    cdef int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_size, vocab_size, seq_len
    cdef int q_dim, kv_dim, halves, gelu, kv_f16
    cdef float eps, embed_scale, query_scale
    # Weights: raw pointers into arrays the engine keeps alive through `keep`.
    cdef const float *emb
    cdef const float *rms_final
    cdef const float *wcls
    # Q8_0 blocks where a matrix is 8-bit (its float pointer is then NULL, and vice versa).
    cdef const unsigned char *emb_q8
    cdef const unsigned char *wcls_q8
    cdef const unsigned char *layer_q8[W_PER_LAYER * MAX_LAYERS]
    cdef int emb_kind, wcls_kind  # 0 float, 1 Q8_0, 2 Q8S
    cdef int layer_kind[W_PER_LAYER * MAX_LAYERS]
    cdef const float *layer_ptrs[W_PER_LAYER * MAX_LAYERS]  # NULL: the family has no such tensor
    cdef int layer_window[MAX_LAYERS]  # 0: every position; else the sliding window's length
    cdef int layer_rope[MAX_LAYERS]  # which rope table: 0 global, 1 local (sliding-window) layers
    cdef float[:, :, ::1] rope_cos  # (n_tables, seq_len, head_size // 2)
    cdef float[:, :, ::1] rope_sin
    cdef list keep
    # Scratch, grown by _grow; rows padded to a multiple of 4 for llm_matmul.
    cdef int scratch_rows
    cdef float[:, ::1] x, xb, xb2, q, k, v, hb, hb2, att, logits, xd
    cdef signed char[:, ::1] xq
    cdef int[:, ::1] xs
