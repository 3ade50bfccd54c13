"""Model file loaders: llama2.c checkpoints and GGUF files -> (ModelConfig, Weights).

Runs inside a runner process, once at start-up. Float32 weights stay memory-mapped from the
file; anything quantised or half-precision is dequantised once into one flat float32 buffer,
which the caller may provide (e.g. a shared segment, so N runners share one copy). A loader
never allocates KV, never touches the arena by itself and never writes the model file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from libllm.gguf_meta import TensorInfo, read_gguf
from servers.runner.architectures import Activation, Architecture, RopeLayout, architecture
from servers.runner.q8 import WIDENED, Q8Matrix, q8_row_bytes, widen

# llama2.c's export.py: b"ak42" read as a little-endian uint32, then a version number.
LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_HEADER_BYTES = 256  # versioned headers are zero-padded to this size
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
    """One transformer block; matrices are float32 (out, in), rows contiguous, or Q8Matrix
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

    tok_embeddings: Any  # (vocab_size, dim): float32 or Q8Matrix
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


def default_model_path() -> Path:
    """The shipped stories260K checkpoint (llama2.c legacy format)."""
    return Path(str(resources.files("servers.runner") / "models" / "stories260K.bin"))


def default_tokenizer_path() -> Path:
    """The shipped tok512 vocabulary (llama2.c ``tokenizer.bin`` format) for the default model."""
    return Path(str(resources.files("servers.runner") / "models" / "tok512.bin"))


def tokenizer_path_for(model_path: str | Path) -> Path:
    """Where the vocabulary of a model file lives: inside a GGUF file; the shipped tok512
    for the shipped model; otherwise a ``tokenizer.bin`` beside a llama2.c checkpoint.

    Raises:
        FileNotFoundError: a llama2.c checkpoint with no tokenizer.bin beside it.
    """
    p = Path(model_path)
    if is_gguf(p):
        return p
    if p.resolve() == default_model_path().resolve():
        return default_tokenizer_path()
    sibling = p.with_name("tokenizer.bin")
    if sibling.is_file():
        return sibling
    raise FileNotFoundError(
        f"{p} is a llama2.c checkpoint; its vocabulary is expected in {sibling}"
    )


def is_gguf(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# --------------------------------------------------------------------------- the plan
# A loader first builds a plan: for every tensor, either a ready view (mmap: float32, or
# uint8 Q8_0 blocks) or a (shape, fill function, dtype) triple that writes values into a
# destination view (float32 dequantised, or widened Q8_0 blocks). Only the second kind takes
# buffer space, so the plan tells the caller how big a shared segment to allocate before
# anything is dequantised. ``q8_cols`` names the tensors held as Q8_0 blocks.

Fill = Callable[[np.ndarray], None]


class _Plan:
    def __init__(self) -> None:
        self.ready: dict[str, np.ndarray] = {}
        self.deferred: dict[str, tuple[tuple[int, ...], Fill, type]] = {}
        self.offsets: dict[str, int] = {}
        self.q8_cols: dict[str, int] = {}
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

    def realise(self, buffer: Any, fill: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
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
        for name, (shape, filler, dtype) in self.deferred.items():
            offset = self.offsets[name]
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            view: np.ndarray = flat[offset : offset + nbytes].view(dtype).reshape(shape)
            if fill:
                filler(view)
            arrays[name] = view
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


def _assemble(
    config: ModelConfig,
    arrays: dict[str, np.ndarray],
    buffer: np.ndarray | None,
    q8_cols: dict[str, int] | None = None,
) -> Weights:
    c = config
    q8_cols = q8_cols or {}

    def get(name: str, shape: tuple[int, ...]) -> Any:
        a = arrays[name]
        if name in q8_cols:
            if (a.shape[0], q8_cols[name]) != shape:
                raise ValueError(f"tensor {name} has shape {(a.shape[0], q8_cols[name])}; the model's header implies {shape}")
            return Q8Matrix(a, q8_cols[name])
        if a.shape != shape:
            if a.size != int(np.prod(shape)):
                raise ValueError(f"tensor {name} has shape {a.shape}; the model's header implies {shape}")
            a = a.reshape(shape)  # e.g. a (1, n) norm vector; never copies a contiguous array
        return a

    def opt(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return get(name, shape) if name in arrays else None

    layers = tuple(
        LayerWeights(
            rms_att=get(f"{i}.rms_att", (c.dim,)),
            wq=get(f"{i}.wq", (c.q_dim, c.dim)),
            wk=get(f"{i}.wk", (c.kv_dim, c.dim)),
            wv=get(f"{i}.wv", (c.kv_dim, c.dim)),
            wo=get(f"{i}.wo", (c.dim, c.q_dim)),
            rms_ffn=get(f"{i}.rms_ffn", (c.dim,)),
            w1=get(f"{i}.w1", (c.hidden_dim, c.dim)),
            w2=get(f"{i}.w2", (c.dim, c.hidden_dim)),
            w3=get(f"{i}.w3", (c.hidden_dim, c.dim)),
            q_norm=opt(f"{i}.q_norm", (c.head_size,)),
            k_norm=opt(f"{i}.k_norm", (c.head_size,)),
            post_att_norm=opt(f"{i}.post_att_norm", (c.dim,)),
            post_ffn_norm=opt(f"{i}.post_ffn_norm", (c.dim,)),
            bq=opt(f"{i}.bq", (c.q_dim,)),
            bk=opt(f"{i}.bk", (c.kv_dim,)),
            bv=opt(f"{i}.bv", (c.kv_dim,)),
        )
        for i in range(c.n_layers)
    )
    emb = get("tok_embeddings", (c.vocab_size, c.dim))
    wcls = emb if c.shared_classifier else get("wcls", (c.vocab_size, c.dim))
    return Weights(
        tok_embeddings=emb,
        layers=layers,
        rms_final=get("rms_final", (c.dim,)),
        wcls=wcls,
        rope_freqs=opt("rope_freqs", (c.head_size // 2,)),
        buffer=buffer,
    )


# --------------------------------------------------------------------------- llama2.c
def _llama2c_plan(path: Path) -> tuple[ModelConfig, _Plan]:
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
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
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


def _per_layer(plan: _Plan, name: str, stacked: np.ndarray) -> None:
    for i in range(stacked.shape[0]):
        plan.add_ready(f"{i}.{name}", stacked[i])


def _llama2c_legacy(mm: np.ndarray, dims: tuple[int, ...]) -> tuple[ModelConfig, _Plan]:
    # A negative vocab_size flags an unshared classifier at the end of the file (run.c).
    shared = dims[5] > 0
    config = _llama2c_config((*dims[:5], abs(dims[5]), dims[6]), shared)
    c, cur, plan = config, _Cursor(mm, 28), _Plan()
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


def _llama2c_v1(mm: np.ndarray, dims: tuple[int, ...], shared: bool) -> tuple[ModelConfig, _Plan]:
    # export.py version1_export: all norms first, then the float32 matrices per kind.
    config = _llama2c_config(dims, shared)
    c, cur, plan = config, _Cursor(mm, LLAMA2C_HEADER_BYTES), _Plan()
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
) -> tuple[ModelConfig, _Plan]:
    # export.py version2_export: float32 norms, then each matrix as int8 values followed by
    # one float32 scale per group (llama2.c's "Q8_0" with a per-file group size).
    config = _llama2c_config(dims, shared)
    c, cur, plan = config, _Cursor(mm, LLAMA2C_HEADER_BYTES), _Plan()
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


# --------------------------------------------------------------------------- GGUF
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


def _gguf_plan(path: Path, rope_layout: RopeLayout | None) -> tuple[ModelConfig, _Plan]:
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
    plan = _Plan()
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
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") and factor != 1.0:
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    try:
        return ModelConfig(
            dim=dim,
            hidden_dim=int(key("feed_forward_length")),
            n_layers=int(key("block_count")),
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
            rope_theta_local=family.rope_base_local,
            rope_freq_scale=1.0 / factor if scaling == "linear" else 1.0,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# Stored types we compute with: Q8_0, Q4_0 and Q5_0 matrices as 8-bit blocks (q8.py); the
# rest dequantised to float32 once, at load (F16 and BF16 here, the other block formats
# through gguf's reference dequantisers).
_DEQUANTISABLE = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})


# Our matrices that stay float32 whatever their file type (none yet: every matmul, the
# classifier and the embedding lookup take Q8_0 blocks).
_FLOAT_ONLY: frozenset[str] = frozenset()


def _gguf_tensor(path: Path, mm: np.ndarray, plan: _Plan, name: str, t: TensorInfo) -> None:
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
    if qtype.name in WIDENED and len(shape) == 2 and name not in _FLOAT_ONLY:
        # Computed as 8-bit blocks: Q8_0 straight from the file, Q4_0/Q5_0 widened exactly.
        plan.q8_cols[name] = shape[1]
        if qtype.name == "Q8_0":
            plan.add_ready(name, rows)
        else:
            kind = qtype.name
            plan.add_deferred(name, (shape[0], q8_row_bytes(shape[1])),
                              lambda out: widen(np.asarray(rows), kind, out), np.uint8)
        return

    def fill(out: np.ndarray) -> None:
        out.reshape(rows.shape[0], -1)[...] = gguf.quants.dequantize(np.asarray(rows), qtype)

    plan.add_deferred(name, shape, fill)


# --------------------------------------------------------------------------- public API
def _plan(path: Path, rope_layout: RopeLayout | None) -> tuple[str, ModelConfig, _Plan]:
    if is_gguf(path):
        config, plan = _gguf_plan(path, rope_layout)
        return "gguf", config, plan
    try:
        config, plan = _llama2c_plan(path)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if rope_layout is not None and rope_layout != config.rope_layout:
        config = _replace_layout(config, rope_layout)
    return "llama2c", config, plan


def _replace_layout(config: ModelConfig, rope_layout: RopeLayout) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_layout=rope_layout)


def read_config(path: str | Path) -> ModelConfig:
    """The model's shape from its header, without touching the weights (sizes the KV region)."""
    return _plan(Path(path), None)[1]


def check_model(path: str | Path) -> ModelConfig:
    """Everything ``load_model`` checks (format, family, every tensor's presence, type and
    shape, the file's length) without reading or dequantising a weight: for refusing a bad
    model before an instance starts.

    Raises:
        ValueError: what is wrong, naming the file.  OSError: the file cannot be read.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such model file")
    _, config, plan = _plan(p, None)
    # Zero-stride stand-ins for the tensors a load would dequantise: shapes, no memory.
    arrays = dict(plan.ready)
    for name, (shape, _, dtype) in plan.deferred.items():
        arrays[name] = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))
    try:
        _assemble(config, arrays, None, plan.q8_cols)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return config


def dequantised_nbytes(path: str | Path) -> int:
    """Bytes a caller-provided buffer must hold for ``load_model(path, buffer=...)``; 0 when
    every tensor is float32 and stays memory-mapped."""
    return _plan(Path(path), None)[2].nbytes


def load_model(
    path: str | Path,
    *,
    buffer: Any = None,
    fill: bool = True,
    rope_layout: RopeLayout | None = None,
) -> LoadedModel:
    """Load a llama2.c ``.bin`` (legacy, v1 or v2 header) or a ``.gguf`` file.

    Args:
        path: the model file.
        buffer: writable bytes-like object (e.g. a shared-memory segment) of at least
            ``dequantised_nbytes(path)`` bytes to hold dequantised tensors; None allocates.
        fill: False when another process has already filled ``buffer`` (tensors are then only
            viewed, never rewritten).
        rope_layout: override the RoPE layout (for GGUF architectures not in the table).

    Returns:
        A LoadedModel whose float32 tensors are views of the file's memory map or the buffer.

    Raises:
        ValueError: unknown format, unsupported tensor type or architecture, truncated file.
    """
    p = Path(path)
    fmt, config, plan = _plan(p, rope_layout)
    arrays, flat = plan.realise(buffer, fill)
    try:
        weights = _assemble(config, arrays, flat, plan.q8_cols)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return LoadedModel(
        path=p,
        format=fmt,  # type: ignore[arg-type]
        config=config,
        weights=weights,
        dequantised_nbytes=plan.nbytes,
    )
