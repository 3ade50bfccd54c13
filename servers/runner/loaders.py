"""Model file loaders: llama2.c checkpoints and GGUF files -> a LoadedModel.

Runs inside a runner process, once at start-up. Float32 weights and Q8_0 blocks stay
memory-mapped from the file; anything else quantised or half-precision is dequantised once
into one flat buffer, which the caller may provide (e.g. a shared segment). A loader never
allocates KV, never touches the arena by itself and never writes the model file. The
formats live in loaders_llama2c.py and loaders_gguf.py, the types in weights.py.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llmos.servers.runner.architectures import RopeLayout
from llmos.servers.runner.loaders_gguf import gguf_plan
from llmos.servers.runner.loaders_llama2c import LLAMA2C_HEADER_BYTES, LLAMA2C_MAGIC, llama2c_plan
from llmos.servers.runner.weights import (
    LayerWeights,
    LoadedModel,
    ModelConfig,
    Plan,
    Progress,
    Weights,
    assemble,
)

__all__ = [
    "LLAMA2C_HEADER_BYTES",
    "LLAMA2C_MAGIC",
    "LayerWeights",
    "LoadedModel",
    "ModelConfig",
    "Weights",
    "check_model",
    "default_model_path",
    "default_tokenizer_path",
    "dequantised_nbytes",
    "is_gguf",
    "load_model",
    "read_config",
    "tokenizer_path_for",
]


def default_model_path() -> Path:
    """The shipped stories260K checkpoint (llama2.c legacy format)."""
    return Path(str(resources.files("llmos.servers.runner") / "models" / "stories260K.bin"))


def default_tokenizer_path() -> Path:
    """The shipped tok512 vocabulary (llama2.c ``tokenizer.bin`` format) for the default model."""
    return Path(str(resources.files("llmos.servers.runner") / "models" / "tok512.bin"))


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


def _plan(path: Path, rope_layout: RopeLayout | None) -> tuple[str, ModelConfig, Plan]:
    if is_gguf(path):
        config, plan = gguf_plan(path, rope_layout)
        return "gguf", config, plan
    if path.suffix.lower() == ".gguf":
        raise ValueError(f"{path}: not a model file: a GGUF file begins with the bytes 'GGUF' and this one "
                         "does not")
    try:
        config, plan = llama2c_plan(path)
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
        assemble(config, arrays, None, plan.q8)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    # The vocabulary clients will load: readable, and one piece per row of the embeddings.
    from llmos.libllm.tokenizer import load_tokenizer

    try:
        vocab_path = tokenizer_path_for(p)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tokenizer = load_tokenizer(vocab_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{vocab_path}: the vocabulary has {tokenizer.vocab_size} tokens; the model's embeddings have "
            f"{config.vocab_size} rows"
        )
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
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a llama2.c ``.bin`` (legacy, v1 or v2 header) or a ``.gguf`` file.

    Args:
        path: the model file.
        buffer: writable bytes-like object (e.g. a shared-memory segment) of at least
            ``dequantised_nbytes(path)`` bytes to hold dequantised tensors; None allocates.
        fill: False when another process has already filled ``buffer`` (tensors are then only
            viewed, never rewritten).
        rope_layout: override the RoPE layout (for GGUF architectures not in the table).
        progress: called with (bytes done, bytes in all) as tensors are dequantised or packed.

    Returns:
        A LoadedModel whose float32 tensors are views of the file's memory map or the buffer.

    Raises:
        ValueError: unknown format, unsupported tensor type or architecture, truncated file.
    """
    p = Path(path)
    fmt, config, plan = _plan(p, rope_layout)
    arrays, flat = plan.realise(buffer, fill, progress)
    try:
        weights = assemble(config, arrays, flat, plan.q8)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return LoadedModel(
        path=p,
        format=fmt,  # type: ignore[arg-type]
        config=config,
        weights=weights,
        dequantised_nbytes=plan.nbytes,
    )
