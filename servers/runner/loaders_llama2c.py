"""llama2.c checkpoints (legacy, v1 and v2 headers) -> (ModelConfig, Plan).

Runs inside a runner process, once at start-up; never writes the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llmos.servers.runner.weights import Fill, ModelConfig, Plan

# llama2.c's export.py: b"ak42" read as a little-endian uint32, then a version number.
LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_HEADER_BYTES = 256  # versioned headers are zero-padded to this size


def llama2c_plan(path: Path) -> tuple[ModelConfig, Plan]:
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if len(head) < 28:
        raise ValueError(f"{path}: model file is truncated")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == LLAMA2C_MAGIC:
        if len(head) < LLAMA2C_HEADER_BYTES:
            raise ValueError(f"{path}: model file is truncated")
        (version,) = struct.unpack_from("<i", head, 4)
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        if version == 1:
            return _llama2c_v1(mm, dims, shared)
        if version == 2:
            (group_size,) = struct.unpack_from("<i", head, 37)
            return _llama2c_v2(mm, dims, shared, group_size)
        raise ValueError(f"{path}: unsupported llama2.c checkpoint version {version}")
    return _llama2c_legacy(mm, struct.unpack_from("<7i", head, 0))


def _llama2c_config(dims: tuple[int, ...], shared: bool) -> ModelConfig:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = dims
    # A header no model has (text, say): each size in a sane range, heads that divide.
    if (min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or max(dim, hidden, vocab) > 1 << 20
            or max(n_layers, n_heads, n_kv) > 4096 or seq_len > 1 << 24 or dim % n_heads or n_heads % n_kv):
        raise ValueError(f"not a model file: neither GGUF nor a llama2.c checkpoint (header {dims})")
    return ModelConfig(
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        seq_len=seq_len,
        head_size=dim // n_heads,
        shared_classifier=shared,
    )


class _Cursor:
    """Walks float32 (or int8) arrays laid end to end in a memory map."""

    def __init__(self, mm: np.ndarray, offset: int) -> None:
        self.mm = mm
        self.offset = offset

    def take(self, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        n = int(np.prod(shape)) * itemsize
        if self.offset + n > self.mm.size:
            raise ValueError("model file is truncated")
        a: np.ndarray = self.mm[self.offset : self.offset + n].view(dtype).reshape(shape)
        self.offset += n
        return a


def _per_layer(plan: Plan, name: str, stacked: np.ndarray) -> None:
    for i in range(stacked.shape[0]):
        plan.add_ready(f"{i}.{name}", stacked[i])


def _llama2c_legacy(mm: np.ndarray, dims: tuple[int, ...]) -> tuple[ModelConfig, Plan]:
    # A negative vocab_size flags an unshared classifier at the end of the file (run.c).
    shared = dims[5] > 0
    config = _llama2c_config((*dims[:5], abs(dims[5]), dims[6]), shared)
    c, cur, plan = config, _Cursor(mm, 28), Plan()
    L = c.n_layers
    plan.add_ready("tok_embeddings", cur.take((c.vocab_size, c.dim)))
    _per_layer(plan, "rms_att", cur.take((L, c.dim)))
    _per_layer(plan, "wq", cur.take((L, c.q_dim, c.dim)))
    _per_layer(plan, "wk", cur.take((L, c.kv_dim, c.dim)))
    _per_layer(plan, "wv", cur.take((L, c.kv_dim, c.dim)))
    _per_layer(plan, "wo", cur.take((L, c.dim, c.q_dim)))
    _per_layer(plan, "rms_ffn", cur.take((L, c.dim)))
    _per_layer(plan, "w1", cur.take((L, c.hidden_dim, c.dim)))
    _per_layer(plan, "w2", cur.take((L, c.dim, c.hidden_dim)))
    _per_layer(plan, "w3", cur.take((L, c.hidden_dim, c.dim)))
    plan.add_ready("rms_final", cur.take((c.dim,)))
    cur.take((c.seq_len * c.head_size,))  # freq_cis_real and _imag: unused, RoPE is computed
    if not shared:
        plan.add_ready("wcls", cur.take((c.vocab_size, c.dim)))
    return config, plan


def _llama2c_v1(mm: np.ndarray, dims: tuple[int, ...], shared: bool) -> tuple[ModelConfig, Plan]:
    # export.py version1_export: all norms first, then the float32 matrices per kind.
    config = _llama2c_config(dims, shared)
    c, cur, plan = config, _Cursor(mm, LLAMA2C_HEADER_BYTES), Plan()
    L = c.n_layers
    _per_layer(plan, "rms_att", cur.take((L, c.dim)))
    _per_layer(plan, "rms_ffn", cur.take((L, c.dim)))
    plan.add_ready("rms_final", cur.take((c.dim,)))
    plan.add_ready("tok_embeddings", cur.take((c.vocab_size, c.dim)))
    for name, shape in _llama2c_matrices(c):
        _per_layer(plan, name, cur.take((L, *shape)))
    if not shared:
        plan.add_ready("wcls", cur.take((c.vocab_size, c.dim)))
    return config, plan


def _llama2c_matrices(c: ModelConfig) -> list[tuple[str, tuple[int, int]]]:
    return [
        ("wq", (c.q_dim, c.dim)),
        ("wk", (c.kv_dim, c.dim)),
        ("wv", (c.kv_dim, c.dim)),
        ("wo", (c.dim, c.q_dim)),
        ("w1", (c.hidden_dim, c.dim)),
        ("w2", (c.dim, c.hidden_dim)),
        ("w3", (c.hidden_dim, c.dim)),
    ]


def _q8_filler(q: np.ndarray, scales: np.ndarray, group_size: int) -> Fill:
    def fill(out: np.ndarray) -> None:
        flat = out.reshape(-1, group_size)
        np.multiply(q.reshape(-1, group_size), scales.reshape(-1, 1), out=flat, casting="unsafe")

    return fill


def _llama2c_v2(
    mm: np.ndarray, dims: tuple[int, ...], shared: bool, group_size: int
) -> tuple[ModelConfig, Plan]:
    # export.py version2_export: float32 norms, then each matrix as int8 values followed by
    # one float32 scale per group (llama2.c's "Q8_0" with a per-file group size).
    config = _llama2c_config(dims, shared)
    c, cur, plan = config, _Cursor(mm, LLAMA2C_HEADER_BYTES), Plan()
    L = c.n_layers
    if group_size <= 0:
        raise ValueError(f"bad group size {group_size}")
    _per_layer(plan, "rms_att", cur.take((L, c.dim)))
    _per_layer(plan, "rms_ffn", cur.take((L, c.dim)))
    plan.add_ready("rms_final", cur.take((c.dim,)))

    def quantised(name: str, shape: tuple[int, ...]) -> None:
        n = int(np.prod(shape))
        if n % group_size:
            raise ValueError(f"tensor {name}: {n} values are not a multiple of group {group_size}")
        q = cur.take((n,), np.int8)
        s = cur.take((n // group_size,))
        plan.add_deferred(name, shape, _q8_filler(q, s, group_size))

    quantised("tok_embeddings", (c.vocab_size, c.dim))
    for name, shape in _llama2c_matrices(c):
        for i in range(L):
            quantised(f"{i}.{name}", shape)
    if not shared:
        quantised("wcls", (c.vocab_size, c.dim))
    return config, plan
