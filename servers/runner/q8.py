"""8-bit weight matrices: GGUF's Q8_0 blocks (include/llm_q8.h) and Q8S blocks
(include/llm_q8s.h), the two forms the kernels compute quantised weights in.

Runs inside a runner process at load. A Q8_0 tensor is used where it lies in the memory-mapped
file; Q4_0 and Q5_0 rows widen to Q8_0 blocks exactly (the same f16 scale, the same integer
values), at 1.06 bytes a weight instead of 4. The K-quants (Q4_K, Q5_K, Q6_K) and Q4_1/Q5_1
widen exactly to Q8S blocks (float scales per 16 values, a float min, int8 values), 1.375
bytes a weight: their integer values and scales are read with gguf's own dequantisers, fed
blocks whose scales are set to one, so no bit layout is written twice.
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
class BlockMatrix:
    """A (rows, cols) matrix held as 8-bit blocks of 32 values: ``blocks`` is (rows, bytes of
    a row), C-contiguous uint8. ``KIND`` tells the kernels the block format."""

    blocks: np.ndarray
    cols: int
    KIND = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.blocks.shape[0]), self.cols)

    def dequantize(self) -> np.ndarray:
        """The float32 values (for oracles and tests), exact."""
        raise NotImplementedError


class Q8Matrix(BlockMatrix):
    """Q8_0 blocks (34 bytes: f16 scale, 32 int8): value i is scale * q[i]."""

    __slots__ = ()
    KIND = 1  # the kernels' LLM_W_Q8_0

    def dequantize(self) -> np.ndarray:
        b = self.blocks.reshape(-1, Q8_BYTES)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        values: np.ndarray = (d * q).reshape(self.shape)
        return values


class Q8SMatrix(BlockMatrix):
    """Q8S blocks (44 bytes: float scale_lo, scale_hi, min; 32 int8): value i is
    (scale_lo if i < 16 else scale_hi) * q[i] - min."""

    __slots__ = ()
    KIND = 2  # the kernels' LLM_W_Q8S

    def dequantize(self) -> np.ndarray:
        b = self.blocks.reshape(-1, Q8S_BYTES)
        head = b[:, :12].copy().view(np.float32)  # (blocks, 3)
        q = b[:, 12:].view(np.int8).astype(np.float32)
        scale = np.repeat(head[:, :2], 16, axis=1)
        values: np.ndarray = (scale * q - head[:, 2:3]).reshape(self.shape)
        return values


Q8S_BYTES = 44
# The Q8S-widened types: bytes per super-block, values per super-block, values per scale.
Q8S_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_K": (144, 256, 32), "Q5_K": (176, 256, 32), "Q6_K": (210, 256, 16),
    "Q4_1": (20, 32, 32), "Q5_1": (24, 32, 32),
}


def q8_row_bytes(cols: int) -> int:
    return cols // BLOCK * Q8_BYTES


def q8s_row_bytes(cols: int) -> int:
    return cols // BLOCK * Q8S_BYTES


def widen_q8s(raw: np.ndarray, kind: str, out: np.ndarray) -> None:
    """Write the Q8S blocks of ``raw`` (uint8 super-blocks of ``kind``) into ``out`` (uint8)."""
    import gguf

    size, per, per_scale = Q8S_TYPES[kind]
    src = raw.reshape(-1, size)
    qtype = gguf.GGMLQuantizationType[kind]
    one = np.float16(1.0).view(np.uint16)
    unit = src.copy()  # the same values with every scale 1 and every min 0: the integers
    if kind in ("Q4_K", "Q5_K"):
        d = src[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = src[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mins = gguf.quants.Q4_K.get_scale_min(src[:, 4:16].copy())
        scales = d * sc.astype(np.float32)  # (n, 8), as gguf and llama.cpp compute them
        offsets = dmin * mins.astype(np.float32)
        unit[:, 0:2] = np.array([one], np.uint16).view(np.uint8)
        unit[:, 2:4] = 0
        unit[:, 4:16] = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)  # every sc 1, m 0
    elif kind == "Q6_K":
        d = src[:, 208:210].copy().view(np.float16).astype(np.float32)
        scales = d * src[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
        offsets = np.zeros((src.shape[0], per // BLOCK), np.float32)
        unit[:, 192:208] = 1
        unit[:, 208:210] = np.array([one], np.uint16).view(np.uint8)
    else:  # Q4_1, Q5_1: value = d * q + m
        scales = src[:, 0:2].copy().view(np.float16).astype(np.float32)
        offsets = -src[:, 2:4].copy().view(np.float16).astype(np.float32)
        unit[:, 0:2] = np.array([one], np.uint16).view(np.uint8)
        unit[:, 2:4] = 0
    q = gguf.quants.dequantize(unit, qtype).reshape(-1, BLOCK)
    dst = out.reshape(-1, Q8S_BYTES)
    halves = np.repeat(scales.reshape(-1, 1), 2, axis=1) if per_scale == BLOCK else scales.reshape(-1, 2)
    head = np.concatenate([halves, offsets.reshape(-1, 1)], axis=1).astype(np.float32)
    dst[:, :12] = head.view(np.uint8)
    dst[:, 12:] = q.astype(np.int8).view(np.uint8)


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


def as_float(matrix: np.ndarray | BlockMatrix) -> np.ndarray:
    """A matrix's float32 values, whichever way it is held."""
    return matrix if isinstance(matrix, np.ndarray) else matrix.dequantize()
