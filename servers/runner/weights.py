"""What a model file becomes: its config (shape and family switches), its weights, and the
plan a loader makes before anything is read or dequantised.

Runs inside a runner process (and in tools that size an instance). Float32 tensors stay
memory-mapped from the file; 8-bit matrices are packed (q8.py) and anything else is
dequantised, once, into one flat buffer the caller may provide. Nothing here reads a file: loaders_llama2c.py and
loaders_gguf.py do, and loaders.py is the public API over both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmos.servers.runner.architectures import Activation, RopeLayout
from llmos.servers.runner.q8 import BlockMatrix

# Start of every dequantised tensor inside the buffer: a cache line, so that the vector
# loads of one row never straddle two tensors' lines and a shared segment maps cleanly.
BUFFER_ALIGN = 64


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shape of a model and the switches of its family (architectures.py), as read from
    the file's header.

    ``rope_layout`` names which dimensions RoPE rotates together inside a head:
    ``"adjacent"`` pairs (2i, 2i+1) as llama2.c and GGUF ``llama`` do, ``"halves"`` pairs
    (i, i + head_size/2) as HF / GGML NEOX do. ``query_scale`` multiplies every query
    (0: 1/sqrt(head_size)). A layer that ``is_local`` attends to the last ``sliding_window``
    positions only, with RoPE base ``rope_theta_local``; the others to every position with
    ``rope_theta`` and positions times ``rope_freq_scale`` (linear scaling).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    head_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "adjacent"
    shared_classifier: bool = True
    arch: str = "llama"
    activation: Activation = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float = 1.0
    query_scale: float = 0.0
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_theta_local: float = 10000.0
    rope_freq_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
            "head_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"head_size {self.head_size} must be even for RoPE")
        if self.rope_layout not in ("adjacent", "halves"):
            raise ValueError(f"unknown rope_layout {self.rope_layout!r}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.sliding_window < 0 or self.swa_pattern < 0:
            raise ValueError("sliding_window and swa_pattern must be >= 0")
        if self.swa_pattern and not self.sliding_window:
            raise ValueError("swa_pattern needs a sliding_window")

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window (llama.cpp's set_swa_pattern:
        the last layer of every ``swa_pattern`` is global)."""
        return self.swa_pattern > 0 and layer % self.swa_pattern < self.swa_pattern - 1

    @property
    def scale_of_queries(self) -> float:
        return self.query_scale or 1.0 / float(np.sqrt(self.head_size))

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


@dataclass(slots=True, frozen=True)
class LayerWeights:
    """One transformer block; matrices are float32 (out, in), rows contiguous, or a BlockMatrix
    (8-bit blocks; typed Any below so both read the same). The optional
    tensors are there exactly when the family uses them (qk_norm, post_norms, qkv_bias)."""

    rms_att: np.ndarray  # (dim,)
    wq: Any  # (q_dim, dim)
    wk: Any  # (kv_dim, dim)
    wv: Any  # (kv_dim, dim)
    wo: Any  # (dim, q_dim)
    rms_ffn: np.ndarray  # (dim,)
    w1: Any  # (hidden_dim, dim)  gate
    w2: Any  # (dim, hidden_dim)  down
    w3: Any  # (hidden_dim, dim)  up
    q_norm: np.ndarray | None = None  # (head_size,) per-head RMSNorm of q, before RoPE
    k_norm: np.ndarray | None = None  # (head_size,)
    post_att_norm: np.ndarray | None = None  # (dim,)
    post_ffn_norm: np.ndarray | None = None  # (dim,)
    bq: np.ndarray | None = None  # (q_dim,)
    bk: np.ndarray | None = None  # (kv_dim,)
    bv: np.ndarray | None = None  # (kv_dim,)


@dataclass(slots=True, frozen=True)
class Weights:
    """All weights as float32 arrays: memory-mapped views or views into the dequant buffer."""

    tok_embeddings: Any  # (vocab_size, dim): float32 or a BlockMatrix (q8.py)
    layers: tuple[LayerWeights, ...]
    rms_final: np.ndarray  # (dim,)
    wcls: Any  # (vocab_size, dim); the same array as tok_embeddings when tied
    rope_freqs: np.ndarray | None = None  # (head_size//2,) divisors of the RoPE frequencies (llama3)
    buffer: np.ndarray | None = field(default=None, compare=False)  # dequant buffer, if any


@dataclass(slots=True, frozen=True)
class LoadedModel:
    """What a loader returns: the config, the weights and where they came from."""

    path: Path
    format: Literal["llama2c", "gguf"]
    config: ModelConfig
    weights: Weights
    dequantised_nbytes: int


# --------------------------------------------------------------------------- the plan
# A loader first builds a plan: for every tensor, either a ready view (mmap: float32) or a
# (shape, fill function, dtype) triple that writes values into a destination view (float32
# dequantised, or packed 8-bit blocks). Only the second kind takes
# buffer space, so the plan tells the caller how big a shared segment to allocate before
# anything is dequantised. ``q8`` names the tensors held as packed 8-bit blocks, with the
# matrix class that wraps them and their number of columns.

Fill = Callable[[np.ndarray], None]
Progress = Callable[[int, int], None]


class Plan:
    def __init__(self) -> None:
        self.ready: dict[str, np.ndarray] = {}
        self.deferred: dict[str, tuple[tuple[int, ...], Fill, type]] = {}
        self.offsets: dict[str, int] = {}
        self.q8: dict[str, tuple[type[BlockMatrix], int]] = {}
        self.nbytes = 0

    def add_ready(self, name: str, array: np.ndarray) -> None:
        if array.dtype not in (np.float32, np.uint8) or not array.flags.c_contiguous:
            raise ValueError(f"tensor {name}: expected contiguous float32, got {array.dtype}")
        self.ready[name] = array

    def add_deferred(self, name: str, shape: tuple[int, ...], fill: Fill, dtype: type = np.float32) -> None:
        self.deferred[name] = (shape, fill, dtype)
        self.offsets[name] = self.nbytes
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.nbytes += -(-size // BUFFER_ALIGN) * BUFFER_ALIGN

    def realise(self, buffer: Any, fill: bool,
                progress: Progress | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Views of every tensor; the deferred ones filled first (`progress(bytes done, of)`
        after each)."""
        arrays = dict(self.ready)
        if not self.deferred:
            return arrays, None
        if buffer is None:
            flat = np.zeros(self.nbytes, dtype=np.uint8)
            fill = True
        else:
            flat = np.frombuffer(buffer, dtype=np.uint8)
            if flat.nbytes < self.nbytes:
                raise ValueError(f"buffer holds {flat.nbytes} bytes; the model needs {self.nbytes}")
            if flat.ctypes.data % 4:
                raise ValueError("buffer must be 4-byte aligned")
        done = 0
        for name, (shape, filler, dtype) in self.deferred.items():
            offset = self.offsets[name]
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            view: np.ndarray = flat[offset : offset + nbytes].view(dtype).reshape(shape)
            if fill:
                filler(view)
            arrays[name] = view
            done += nbytes
            if progress is not None:
                progress(done, self.nbytes)
        return arrays, flat


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config has (our names) with its (rows, cols) shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings": (c.vocab_size, c.dim),
        "rms_final": (c.dim,),
        "wcls": (c.vocab_size, c.dim),
        "rope_freqs": (c.head_size // 2,),
    }
    for i in range(c.n_layers):
        shapes |= {
            f"{i}.rms_att": (c.dim,), f"{i}.wq": (c.q_dim, c.dim), f"{i}.wk": (c.kv_dim, c.dim),
            f"{i}.wv": (c.kv_dim, c.dim), f"{i}.wo": (c.dim, c.q_dim), f"{i}.rms_ffn": (c.dim,),
            f"{i}.w1": (c.hidden_dim, c.dim), f"{i}.w2": (c.dim, c.hidden_dim),
            f"{i}.w3": (c.hidden_dim, c.dim), f"{i}.q_norm": (c.head_size,),
            f"{i}.k_norm": (c.head_size,), f"{i}.post_att_norm": (c.dim,),
            f"{i}.post_ffn_norm": (c.dim,), f"{i}.bq": (c.q_dim,), f"{i}.bk": (c.kv_dim,),
            f"{i}.bv": (c.kv_dim,),
        }
    return shapes


def assemble(
    config: ModelConfig,
    arrays: dict[str, np.ndarray],
    buffer: np.ndarray | None,
    q8: dict[str, tuple[type[BlockMatrix], int]] | None = None,
) -> Weights:
    c = config
    shapes = expected_shapes(c)
    q8 = q8 or {}

    def get(name: str) -> Any:
        a, shape = arrays[name], shapes[name]
        if name in q8:
            matrix, cols = q8[name]
            rows = shape[0]
            if cols != shape[1] or a.shape != matrix.packed_shape(rows, cols):
                raise ValueError(f"tensor {name} has {cols} columns in {a.shape} packed bytes; the model's header implies {shape}")
            return matrix(a, cols, rows)
        if a.shape != shape:
            if a.size != int(np.prod(shape)):
                raise ValueError(f"tensor {name} has shape {a.shape}; the model's header implies {shape}")
            a = a.reshape(shape)  # e.g. a (1, n) norm vector; never copies a contiguous array
        return a

    def opt(name: str) -> Any:  # None where the family has no such tensor
        return get(name) if name in arrays else None

    required = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")
    optional = ("q_norm", "k_norm", "post_att_norm", "post_ffn_norm", "bq", "bk", "bv")
    layers = tuple(
        LayerWeights(**{f: get(f"{i}.{f}") for f in required}, **{f: opt(f"{i}.{f}") for f in optional})
        for i in range(c.n_layers)
    )
    emb = get("tok_embeddings")
    wcls = emb if c.shared_classifier else get("wcls")
    return Weights(
        tok_embeddings=emb,
        layers=layers,
        rms_final=get("rms_final"),
        wcls=wcls,
        rope_freqs=opt("rope_freqs"),
        buffer=buffer,
    )
