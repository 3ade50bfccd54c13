"""GGUF model files -> (ModelConfig, Plan): the family from general.architecture
(architectures.py), every tensor checked for presence, type and shape before any is read.

Runs inside a runner process, once at start-up (and in `llmos up`, to refuse a bad file
before anything starts); never writes the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmos.libllm.gguf_meta import TensorInfo, read_gguf
from llmos.servers.runner.architectures import Architecture, RopeLayout, architecture
from llmos.servers.runner.q8 import (
    Q8S_TYPES,
    WIDENED,
    BlockMatrix,
    Q8KMatrix,
    Q8Matrix,
    Q8SMatrix,
    pack_widened,
    widen,
    widen_q8s,
)
from llmos.servers.runner.weights import ModelConfig, Plan, expected_shapes

# Per-layer GGUF tensor names (llama.cpp's llama-arch.cpp) -> ours; optional ones are read
# when the family uses them and refused when it does not (a tensor we would ignore means
# we would compute another model).
_GGUF_NAMES = {
    "attn_norm": "rms_att",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "rms_ffn",
    "ffn_gate": "w1",
    "ffn_down": "w2",
    "ffn_up": "w3",
}
_GGUF_QK_NORM = {"attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}
_GGUF_POST_NORMS = {"post_attention_norm": "post_att_norm", "post_ffw_norm": "post_ffn_norm"}
_GGUF_BIASES = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}


def gguf_plan(path: Path, rope_layout: RopeLayout | None) -> tuple[ModelConfig, Plan]:
    contents = read_gguf(path)
    meta, tensors = contents.metadata, contents.tensors
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise ValueError(f"{path}: no general.architecture key: not a GGUF model")
    try:
        family = architecture(arch_name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config = _gguf_config(path, meta, family, tensors, rope_layout)

    wanted = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "rms_final"}
    if not config.shared_classifier:
        wanted["output.weight"] = "wcls"
    if "rope_freqs.weight" in tensors:
        wanted["rope_freqs.weight"] = "rope_freqs"
    per_layer = dict(_GGUF_NAMES)
    if family.qk_norm:
        per_layer |= _GGUF_QK_NORM
    if family.post_norms:
        per_layer |= _GGUF_POST_NORMS
    for i in range(config.n_layers):
        for g, ours in per_layer.items():
            wanted[f"blk.{i}.{g}.weight"] = f"{i}.{ours}"
        if family.qkv_bias:
            for g, ours in _GGUF_BIASES.items():
                wanted[f"blk.{i}.{g}.bias"] = f"{i}.{ours}"
    unused = sorted(set(tensors) - set(wanted))
    if unused:
        raise ValueError(
            f"{path}: tensor {unused[0]} is not part of a {arch_name} model as llmos computes it"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    plan = Plan()
    shapes = expected_shapes(config)
    for gname, ours in wanted.items():
        if gname not in tensors:
            raise ValueError(f"{path}: missing tensor {gname}")
        got = tuple(reversed(tensors[gname].shape))
        if int(np.prod(got)) != int(np.prod(shapes[ours])) or (len(got) > 1 and got != shapes[ours]):
            raise ValueError(
                f"{path}: tensor {gname} has shape {got}; this {arch_name} model's header needs {shapes[ours]}"
            )
        _gguf_tensor(path, mm, plan, ours, tensors[gname])
    return config, plan


def _gguf_config(
    path: Path,
    meta: dict[str, Any],
    family: Architecture,
    tensors: dict[str, TensorInfo],
    rope_layout: RopeLayout | None,
) -> ModelConfig:
    arch = family.name

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: missing GGUF key {arch}.{name}")
        return value

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    head_size = int(key("attention.key_length", dim // max(n_heads, 1)))
    if int(key("attention.value_length", head_size)) != head_size:
        raise ValueError(f"{path}: key and value head sizes differ")
    if int(key("rope.dimension_count", head_size)) != head_size:
        raise ValueError(f"{path}: RoPE over part of a head is not supported")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{path}: missing tensor token_embd.weight")
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"{path}: per-layer KV head counts are not supported")
    window = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 0) or 0
    if isinstance(pattern, list):
        raise ValueError(f"{path}: per-layer sliding-window flags are not supported")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"{arch}.{cap}"):
            raise ValueError(f"{path}: {arch}.{cap} is not supported")
    n_layers = int(key("block_count"))
    query_scale = 0.0
    if arch == "gemma3" and n_layers == 62:  # Gemma 3 27B scales by the model width per head
        query_scale = 1.0 / float(np.sqrt(dim / n_heads))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") and factor != 1.0:
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    try:
        return ModelConfig(
            dim=dim,
            hidden_dim=int(key("feed_forward_length")),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            vocab_size=int(emb.shape[1]) if len(emb.shape) > 1 else 0,
            seq_len=int(key("context_length")),
            head_size=head_size,
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_layout=rope_layout or family.rope_layout,
            shared_classifier="output.weight" not in tensors,
            arch=arch,
            activation=family.activation,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            post_norms=family.post_norms,
            embed_scale=float(np.sqrt(np.float32(dim))) if family.embed_scale_sqrt_dim else 1.0,
            sliding_window=window if family.swa_pattern else 0,
            swa_pattern=(int(pattern) or family.swa_pattern) if window else 0,
            rope_theta_local=float(meta.get(f"{arch}.rope.freq_base_swa", family.rope_base_local)),
            query_scale=query_scale,
            rope_freq_scale=1.0 / factor if scaling == "linear" else 1.0,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# Stored types we compute with: matrices of Q8_0, Q4_0, Q5_0, Q4_1, Q5_1 and the K-quants as
# packed 8-bit blocks (q8.py); the rest dequantised to float32 once, at load (F16 and BF16
# here, other block formats, e.g. 1-D ones, through gguf's reference dequantisers).
_DEQUANTISABLE = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})


def _gguf_tensor(path: Path, mm: np.ndarray, plan: Plan, name: str, t: TensorInfo) -> None:
    import gguf  # imported here: a llama2.c-only runner never pays for it

    # GGUF lists dimensions innermost first; ours are (rows, cols) like PyTorch.
    shape = tuple(reversed(t.shape))
    count = int(np.prod(shape))
    try:
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
    except ValueError:
        raise ValueError(f"{path}: tensor {t.name} has unknown GGML type {t.ggml_type}") from None
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if count % block or (shape and shape[-1] % block):
        raise ValueError(f"{path}: tensor {t.name} of {qtype.name} has rows of {shape[-1]} values, not whole blocks")
    nbytes = count // block * block_bytes
    if t.offset + nbytes > mm.size:
        raise ValueError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")
    raw = mm[t.offset : t.offset + nbytes]
    if qtype == gguf.GGMLQuantizationType.F32:
        plan.add_ready(name, raw.view(np.float32).reshape(shape))
        return
    if qtype == gguf.GGMLQuantizationType.F16:
        half = raw.view(np.float16)
        plan.add_deferred(name, shape, lambda out: np.copyto(out.reshape(-1), half, casting="safe"))
        return
    if qtype == gguf.GGMLQuantizationType.BF16:
        bf16 = raw.view(np.uint16)

        def from_bf16(out: np.ndarray) -> None:
            out.reshape(-1).view(np.uint32)[...] = bf16.astype(np.uint32) << 16

        plan.add_deferred(name, shape, from_bf16)
        return
    if qtype.name not in _DEQUANTISABLE:
        raise ValueError(f"{path}: tensor {t.name} has type {qtype.name}, which llmos does not compute")
    rows = raw.reshape(-1, shape[-1] // block * block_bytes)
    if len(shape) == 2 and (qtype.name in WIDENED or qtype.name in Q8S_TYPES):
        # Computed as packed 8-bit blocks: Q8_0 as in the file, Q4_0/Q5_0 widened exactly to
        # Q8_0, the K-quants and Q4_1/Q5_1 to Q8S (scales per 16, a min).
        kind = qtype.name
        matrix: type[BlockMatrix] = Q8Matrix if kind in WIDENED else Q8KMatrix if kind.endswith("_K") else Q8SMatrix
        widen_kind = widen if kind in WIDENED else widen_q8s
        plan.q8[name] = (matrix, shape[1])
        widen_rows = None if kind == "Q8_0" else lambda part, out: widen_kind(part, kind, out)
        fill_packed = pack_widened(matrix, rows, shape[1], widen_rows)
        plan.add_deferred(name, matrix.packed_shape(*shape), fill_packed, np.uint8)
        return

    def fill(out: np.ndarray) -> None:
        out.reshape(rows.shape[0], -1)[...] = gguf.quants.dequantize(np.asarray(rows), qtype)

    plan.add_deferred(name, shape, fill)
