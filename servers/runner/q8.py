"""8-bit weight matrices in GGUF's Q8_0 block format, the one quantised format the kernels
compute with directly (include/llm_q8.h).

Runs inside a runner process at load. A Q8_0 tensor is used where it lies in the memory-mapped
file; Q4_0 and Q5_0 rows widen to Q8_0 blocks exactly (the same f16 scale, the same integer
values), so they compute as llama.cpp computes them, at 1.06 bytes a weight instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # values per block
Q8_BYTES = 34  # f16 scale, 32 int8
Q4_0_BYTES = 18  # f16 scale, 16 bytes of nibbles: values 0-15 low, 16-31 high, offset 8
Q5_0_BYTES = 22  # f16 scale, 32 high bits, 16 bytes of nibbles; offset 16
WIDENED = ("Q8_0", "Q4_0", "Q5_0")


@dataclass(slots=True, frozen=True)
class Q8Matrix:
    """A (rows, cols) matrix: each row is cols / 32 Q8_0 blocks, ``blocks`` (rows, cols/32*34)."""

    blocks: np.ndarray  # uint8, C-contiguous
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.blocks.shape[0]), self.cols)

    def dequantize(self) -> np.ndarray:
        """The float32 values (for oracles and tests): scale times value, exact."""
        b = self.blocks.reshape(-1, Q8_BYTES)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        values: np.ndarray = (d * q).reshape(self.shape)
        return values


def q8_row_bytes(cols: int) -> int:
    return cols // BLOCK * Q8_BYTES


def widen(raw: np.ndarray, kind: str, out: np.ndarray) -> None:
    """Write the Q8_0 blocks of ``raw`` (uint8 blocks of ``kind``) into ``out`` (uint8)."""
    if kind == "Q8_0":
        out[...] = raw.reshape(out.shape)
        return
    size = Q4_0_BYTES if kind == "Q4_0" else Q5_0_BYTES
    src = raw.reshape(-1, size)
    dst = out.reshape(-1, Q8_BYTES)
    dst[:, :2] = src[:, :2]
    nibbles = src[:, size - 16 :]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int16)
    if kind == "Q4_0":
        values -= 8
    else:
        high = src[:, 2:6].copy().view("<u4")  # bit i is the fifth bit of value i
        bits = (high >> np.arange(BLOCK, dtype=np.uint32)) & 1
        values = (values | (bits.astype(np.int16) << 4)) - 16
    dst[:, 2:] = values.astype(np.int8).view(np.uint8)


def as_float(matrix: np.ndarray | Q8Matrix) -> np.ndarray:
    """A matrix's float32 values, whichever way it is held."""
    return matrix.dequantize() if isinstance(matrix, Q8Matrix) else matrix
