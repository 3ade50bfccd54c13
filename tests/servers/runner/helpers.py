"""Shared test helpers for the runner: the built-in model as a GGUF file, and model files written at test
time (GGUF with other tensor types, llama2.c versioned headers) from the shipped weights."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmos.servers.runner.loaders import LLAMA2C_HEADER_BYTES, LLAMA2C_MAGIC, LoadedModel

REPO = Path(__file__).resolve().parents[3]
# The built-in model's weights and tokenizer as a GGUF file (tests/fixtures/ORIGIN.md).
STORIES_GGUF = REPO / "tests" / "fixtures" / "stories260K-f32.gguf"

EXPECTED_FROM_BOS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the"
    " park. One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)
EXPECTED_ZOO = "Zoo was a little girl named Lily. She loved to play outside in the park."


# Chooses the GGUF type of one tensor from its name and float32 data.
Choose = Callable[[str, np.ndarray], int]


def rewrite_gguf(
    src: Path,
    dst: Path,
    choose: Choose,
    transform: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Copy a llama GGUF's metadata and tensors into ``dst``, storing each tensor as the type
    ``choose`` names (F32, F16 or a quantised type) after an optional ``transform`` (which
    drops a tensor by returning None)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    f = lambda key: gguf_field(r, key)  # noqa: E731
    w.add_name(f"{f('general.name')}-test")
    w.add_context_length(f("llama.context_length"))
    w.add_embedding_length(f("llama.embedding_length"))
    w.add_block_count(f("llama.block_count"))
    w.add_feed_forward_length(f("llama.feed_forward_length"))
    w.add_head_count(f("llama.attention.head_count"))
    w.add_head_count_kv(f("llama.attention.head_count_kv"))
    w.add_rope_dimension_count(f("llama.rope.dimension_count"))
    w.add_layer_norm_rms_eps(f("llama.attention.layer_norm_rms_epsilon"))
    w.add_tokenizer_model("llama")
    w.add_token_list(f("tokenizer.ggml.tokens"))
    w.add_token_scores(f("tokenizer.ggml.scores"))
    w.add_token_types(f("tokenizer.ggml.token_type"))
    w.add_bos_token_id(f("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(f("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(f("tokenizer.ggml.unknown_token_id"))
    for t in r.tensors:
        data = np.array(t.data, dtype=np.float32)
        if transform is not None:
            data = transform(t.name, data)
            if data is None:  # dropped
                continue
        qtype = gguf.GGMLQuantizationType(choose(t.name, data))
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(t.name, data.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def f16_everywhere(name: str, data: np.ndarray) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType.F16 if data.ndim == 2 else gguf.GGMLQuantizationType.F32)


def q8_where_possible(name: str, data: np.ndarray) -> int:
    """Q8_0 for matrices whose rows are a multiple of 32 wide, F16 for the 172-wide FFN
    down projection, F32 for the norm vectors: the mix docs/design.md describes."""
    import gguf

    if data.ndim != 2:
        return int(gguf.GGMLQuantizationType.F32)
    if data.shape[1] % 32 == 0:
        return int(gguf.GGMLQuantizationType.Q8_0)
    return int(gguf.GGMLQuantizationType.F16)


def _matrices(m: LoadedModel) -> list[tuple[str, np.ndarray]]:
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    return [(n, np.stack([getattr(lw, n) for lw in m.weights.layers])) for n in names]


def _header(m: LoadedModel, version: int, shared: bool, extra: bytes = b"") -> bytes:
    c = m.config
    head = (
        struct.pack(
            "<Ii7iB",
            LLAMA2C_MAGIC,
            version,
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size,
            c.seq_len,
            int(shared),
        )
        + extra
    )
    return head + b"\0" * (LLAMA2C_HEADER_BYTES - len(head))


def _norms(m: LoadedModel) -> bytes:
    w = m.weights
    parts = [lw.rms_att for lw in w.layers] + [lw.rms_ffn for lw in w.layers] + [w.rms_final]
    return b"".join(np.asarray(p, np.float32).tobytes() for p in parts)


def write_llama2c_v1(m: LoadedModel, dst: Path, wcls: np.ndarray | None = None) -> Path:
    """llama2.c export.py version 1: float32, norms first; ``wcls`` makes it unshared."""
    body = [_header(m, 1, wcls is None), _norms(m), m.weights.tok_embeddings.tobytes()]
    body += [a.tobytes() for _, a in _matrices(m)]
    if wcls is not None:
        body.append(wcls.astype(np.float32).tobytes())
    dst.write_bytes(b"".join(body))
    return dst


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """export.py's quantize_q80: symmetric int8 per group of ``group_size`` values."""
    groups = w.reshape(-1, group_size).astype(np.float32)
    scale = np.abs(groups).max(axis=1) / np.float32(127.0)
    q = np.round(groups / scale[:, None]).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32)


def write_llama2c_v2(m: LoadedModel, dst: Path, group_size: int) -> Path:
    """llama2.c export.py version 2: float32 norms, then int8 + scales per matrix."""
    body = [_header(m, 2, True, struct.pack("<i", group_size)), _norms(m)]
    tensors = [m.weights.tok_embeddings] + [
        a[i] for _, a in _matrices(m) for i in range(a.shape[0])
    ]
    for t in tensors:
        q, s = quantize_q80(np.asarray(t), group_size)
        body += [q.tobytes(), s.tobytes()]
    dst.write_bytes(b"".join(body))
    return dst


def write_legacy_unshared(src: Path, dst: Path, wcls: np.ndarray) -> Path:
    """The legacy header with a negative vocab_size and ``wcls`` appended, as run.c reads."""
    data = bytearray(src.read_bytes())
    (vocab,) = struct.unpack_from("<i", data, 20)
    struct.pack_into("<i", data, 20, -vocab)
    dst.write_bytes(bytes(data) + wcls.astype(np.float32).tobytes())
    return dst


def gguf_field(reader: Any, key: str) -> Any:
    """A scalar or array value from a GGUFReader, through its long-stable parts/data API."""
    f = reader.fields.get(key)
    if f is None:
        return None
    values = [f.parts[i] for i in f.data]
    decoded = [bytes(v).decode("utf-8") if v.dtype == np.uint8 else v.tolist()[0] for v in values]
    is_array = len(f.types) > 1 or (f.types and int(f.types[0]) == 9)
    return decoded if is_array else decoded[0]


def bits(a: np.ndarray) -> np.ndarray:
    """Compare floats bit for bit (NaN == NaN, 0.0 != -0.0)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def per_simd_level(compute: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
    """``compute()`` at every SIMD level this CPU has, the best one restored after."""
    from llmos.servers.runner import _kernels

    best = _kernels.simd_level()
    results = {}
    try:
        for level in _kernels.supported_simd_levels():
            _kernels.set_simd_level(level)
            results[level] = compute()
    finally:
        _kernels.set_simd_level(best)
    return results


def assert_same_bits(results: dict[str, np.ndarray]) -> None:
    """Every level's result has the bits of the first one's."""
    first = next(iter(results.values()))
    for level, got in results.items():
        assert np.array_equal(bits(got), bits(first)), level


def write_gguf_of_architecture(path: Path, arch: str) -> Path:
    """A GGUF that names ``arch`` and holds one tensor: enough to be refused for its family."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
