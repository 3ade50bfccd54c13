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

RopeLayout = Literal["adjacent", "halves"]

# llama2.c's export.py: b"ak42" read as a little-endian uint32, then a version number.
LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_HEADER_BYTES = 256  # versioned headers are zero-padded to this size
# Start of every dequantised tensor inside the buffer: a cache line, so that the vector
# loads of one row never straddle two tensors' lines and a shared segment maps cleanly.
BUFFER_ALIGN = 64

# GGUF architectures we run and the RoPE layout of their q/k rows. llama.cpp's converter
# permutes HF's q/k rows for `llama`, so GGUF llama files use llama2.c's adjacent pairs
# (ROPE_TYPE_NORM). A llama-shaped file whose rows were not permuted (HF "halves", GGML
# ROPE_TYPE_NEOX) loads with load_model(..., rope_layout="halves").
GGUF_ROPE_LAYOUTS: dict[str, RopeLayout] = {"llama": "adjacent"}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shape of a Llama-architecture model, as read from the file's header.

    ``rope_layout`` names which dimensions RoPE rotates together inside a head:
    ``"adjacent"`` pairs (2i, 2i+1) as llama2.c and GGUF ``llama`` do, ``"halves"`` pairs
    (i, i + head_size/2) as HF / GGML NEOX do.
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

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


@dataclass(slots=True, frozen=True)
class LayerWeights:
    """One transformer block; matrices are float32 (out, in), rows contiguous."""

    rms_att: np.ndarray  # (dim,)
    wq: np.ndarray  # (q_dim, dim)
    wk: np.ndarray  # (kv_dim, dim)
    wv: np.ndarray  # (kv_dim, dim)
    wo: np.ndarray  # (dim, q_dim)
    rms_ffn: np.ndarray  # (dim,)
    w1: np.ndarray  # (hidden_dim, dim)  gate
    w2: np.ndarray  # (dim, hidden_dim)  down
    w3: np.ndarray  # (hidden_dim, dim)  up


@dataclass(slots=True, frozen=True)
class Weights:
    """All weights as float32 arrays: memory-mapped views or views into the dequant buffer."""

    tok_embeddings: np.ndarray  # (vocab_size, dim)
    layers: tuple[LayerWeights, ...]
    rms_final: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab_size, dim); the same array as tok_embeddings when tied
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
# A loader first builds a plan: for every tensor, either a ready float32 view (mmap) or a
# (shape, fill function) pair that writes float32 values into a destination view. Only the
# second kind takes buffer space, so the plan tells the caller how big a shared segment to
# allocate before anything is dequantised.

Fill = Callable[[np.ndarray], None]


class _Plan:
    def __init__(self) -> None:
        self.ready: dict[str, np.ndarray] = {}
        self.deferred: dict[str, tuple[tuple[int, ...], Fill]] = {}
        self.offsets: dict[str, int] = {}
        self.nbytes = 0

    def add_ready(self, name: str, array: np.ndarray) -> None:
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"tensor {name}: expected contiguous float32, got {array.dtype}")
        self.ready[name] = array

    def add_deferred(self, name: str, shape: tuple[int, ...], fill: Fill) -> None:
        self.deferred[name] = (shape, fill)
        self.offsets[name] = self.nbytes
        size = int(np.prod(shape)) * 4
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
        for name, (shape, filler) in self.deferred.items():
            offset = self.offsets[name]
            count = int(np.prod(shape))
            view = flat[offset : offset + count * 4].view(np.float32).reshape(shape)
            if fill:
                filler(view)
            arrays[name] = view
        return arrays, flat


def _assemble(
    config: ModelConfig, arrays: dict[str, np.ndarray], buffer: np.ndarray | None
) -> Weights:
    c = config

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = arrays[name]
        if a.shape != shape:
            a = a.reshape(shape)  # e.g. a (1, n) norm vector; never copies a contiguous array
        return a

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
        raise ValueError(f"not a llama2.c checkpoint: header {dims}")
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


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar or array value from a GGUFReader, using only the long-stable parts/data API."""
    f = reader.fields.get(key)
    if f is None:
        return default
    values = [f.parts[i] for i in f.data]
    decoded = [bytes(v).decode("utf-8") if v.dtype == np.uint8 else v.tolist()[0] for v in values]
    is_array = len(f.types) > 1 or (f.types and int(f.types[0]) == 9)
    return decoded if is_array else decoded[0]


def _gguf_plan(path: Path, rope_layout: RopeLayout | None) -> tuple[ModelConfig, _Plan]:
    import gguf  # imported here: a llama2.c-only runner never pays for it

    reader = gguf.GGUFReader(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ROPE_LAYOUTS and rope_layout is None:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported "
            f"(known: {sorted(GGUF_ROPE_LAYOUTS)}; pass rope_layout to force one)"
        )
    tensors = {t.name: t for t in reader.tensors}
    for t in tensors:
        if t.endswith(".bias"):
            raise ValueError(f"{path}: tensor {t}: biases are not supported")

    def key(name: str, default: Any = None) -> Any:
        value = gguf_field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: missing GGUF key {arch}.{name}")
        return value

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    emb = tensors["token_embd.weight"]
    vocab = int(emb.shape[1]) if len(emb.shape) > 1 else 0
    config = ModelConfig(
        dim=dim,
        hidden_dim=int(key("feed_forward_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=vocab,
        seq_len=int(key("context_length")),
        head_size=int(key("attention.key_length", dim // n_heads)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_layout=rope_layout or GGUF_ROPE_LAYOUTS[arch],
        shared_classifier="output.weight" not in tensors,
    )
    plan = _Plan()
    wanted = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "rms_final"}
    if not config.shared_classifier:
        wanted["output.weight"] = "wcls"
    for i in range(config.n_layers):
        for g, ours in _GGUF_NAMES.items():
            wanted[f"blk.{i}.{g}.weight"] = f"{i}.{ours}"
    for gname, ours in wanted.items():
        if gname not in tensors:
            raise ValueError(f"{path}: missing tensor {gname}")
        _gguf_tensor(plan, ours, tensors[gname], gguf)
    return config, plan


def _gguf_tensor(plan: _Plan, name: str, t: Any, gguf: Any) -> None:
    # GGUF lists dimensions innermost first; ours are (rows, cols) like PyTorch.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        plan.add_ready(name, np.asarray(t.data).reshape(shape))
        return
    data = t.data

    def fill(out: np.ndarray) -> None:
        out[...] = gguf.quants.dequantize(np.asarray(data), qtype).reshape(shape)

    plan.add_deferred(name, shape, fill)


# --------------------------------------------------------------------------- public API
def _plan(path: Path, rope_layout: RopeLayout | None) -> tuple[str, ModelConfig, _Plan]:
    if is_gguf(path):
        config, plan = _gguf_plan(path, rope_layout)
        return "gguf", config, plan
    config, plan = _llama2c_plan(path)
    if rope_layout is not None and rope_layout != config.rope_layout:
        config = _replace_layout(config, rope_layout)
    return "llama2c", config, plan


def _replace_layout(config: ModelConfig, rope_layout: RopeLayout) -> ModelConfig:
    from dataclasses import replace

    return replace(config, rope_layout=rope_layout)


def read_config(path: str | Path) -> ModelConfig:
    """The model's shape from its header, without touching the weights (sizes the KV region)."""
    return _plan(Path(path), None)[1]


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
    weights = _assemble(config, arrays, flat)
    return LoadedModel(
        path=p,
        format=fmt,  # type: ignore[arg-type]
        config=config,
        weights=weights,
        dequantised_nbytes=plan.nbytes,
    )
