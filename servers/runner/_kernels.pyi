"""Types for the Python-visible API of servers/runner/_kernels.pyx."""

from __future__ import annotations

from typing import Any

import numpy as np

LAYER_FIELDS: tuple[str, ...]
SIMD_LEVELS: tuple[str, ...]

def simd_level() -> str: ...
def supported_simd_levels() -> tuple[str, ...]: ...
def set_simd_level(level: str) -> None: ...
def threads() -> int: ...
def set_threads(n: int) -> None: ...
def q8_matmul(x: np.ndarray, matrix: Any) -> np.ndarray: ...
def pack_chunks(
    chunks: list[Any], block_tokens: int, num_blocks: int, vocab_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

class Engine:
    def __init__(
        self, config: Any, weights: Any, rope_cos: np.ndarray, rope_sin: np.ndarray, kv_f16: bool = False
    ) -> None: ...
    def forward(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        row_seq: np.ndarray,
        block_tables: np.ndarray,
        kv: np.ndarray,
        block_tokens: int,
        logit_rows: np.ndarray,
        logits_out: np.ndarray,
    ) -> None: ...
