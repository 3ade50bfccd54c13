"""The model families the runner computes, each a short description over one forward pass.

Runs inside a runner process (and in tools that size an instance). A family is only a set of
switches the one batch-invariant forward pass in _kernels honours: where the norms sit, which
activation gates the FFN, how RoPE pairs dimensions, biases, per-head q/k norms, embedding
scaling and sliding-window layers. Adding a family is a new entry here, never a copy of the
model. Values follow llama.cpp's reading of the same GGUF keys (src/llama-model.cpp), the
reference for what each architecture computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RopeLayout = Literal["adjacent", "halves"]
Activation = Literal["silu", "gelu_tanh"]


@dataclass(slots=True, frozen=True)
class Architecture:
    """What distinguishes one family's forward pass from Llama 2's.

    ``rope_layout``: ``"adjacent"`` rotates (2i, 2i+1) (GGUF ``llama``: llama.cpp's converter
    permutes HF's rows), ``"halves"`` rotates (i, i + head_size/2) (GGML NEOX).
    ``swa_pattern`` N > 0: of every N layers the first N-1 attend only to the last
    ``sliding_window`` positions (with ``rope_base_local``), the N-th to all of them.
    """

    name: str
    rope_layout: RopeLayout
    activation: Activation = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before the residual add
    embed_scale_sqrt_dim: bool = False
    swa_pattern: int = 0
    rope_base_local: float = 10000.0


ARCHITECTURES: dict[str, Architecture] = {
    # Llama 2/3/3.1/3.2, SmolLM2, TinyLlama: llama3 rope scaling comes as rope_freqs.weight.
    "llama": Architecture("llama", "adjacent"),
    "qwen2": Architecture("qwen2", "halves", qkv_bias=True),
    "qwen3": Architecture("qwen3", "halves", qk_norm=True),
    # Gemma 3: GELU-tanh gated FFN, norms before and after attention and FFN, q/k norms,
    # embeddings times sqrt(dim), five sliding-window layers (rope base 10,000) per global one.
    "gemma3": Architecture(
        "gemma3",
        "halves",
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        embed_scale_sqrt_dim=True,
        swa_pattern=6,
    ),
}

# llama2.c checkpoints are Llama 2 as run.c computes it.
LLAMA2C = ARCHITECTURES["llama"]


def architecture(name: str) -> Architecture:
    """The description of GGUF ``general.architecture`` ``name``.

    Raises:
        ValueError: a family the runner does not compute.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"architecture {name!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None
