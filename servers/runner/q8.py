"""8-bit weight matrices as the kernels compute them: Q8_0 (GGUF's Q8_0; Q4_0 and Q5_0 widen
to it exactly) and Q8S (the K-quants and Q4_1/Q5_1, widened exactly), packed at load in groups
of 16 output rows (include/llm_q8.h has the layout and why).

Runs inside a runner process at load. Widening first writes row-major blocks: Q8_0 blocks
(34 bytes: f16 scale, 32 int8, as in the file) or Q8S blocks (44 bytes: float scales for values
0-15 and 16-31, a float min, 32 int8). The K-quants' integer values and scales are read with
gguf's own dequantisers, fed blocks whose scales are set to one, so no bit layout is written
twice. Packing then interleaves a group's rows, a chunk of rows at a time (bounded temporary
memory): 1.125 bytes a weight for Q8_0, 1.375 for Q8S.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

BLOCK = 32  # values per block
GROUP = 16  # output rows per packed group
CHUNK_ROWS = 4096  # rows widened and packed at a time (a multiple of GROUP)
Q8_BYTES = 34  # f16 scale, 32 int8
Q4_0_BYTES = 18  # f16 scale, 16 bytes of nibbles: values 0-15 low, 16-31 high, offset 8
Q5_0_BYTES = 22  # f16 scale, 32 high bits, 16 bytes of nibbles; offset 16
WIDENED = ("Q8_0", "Q4_0", "Q5_0")


@dataclass(slots=True, frozen=True)
class BlockMatrix:
    """A (rows, cols) matrix of 8-bit blocks of 32 values, packed: ``blocks`` is (groups of 16
    rows, cols / 32 group-blocks), C-contiguous uint8. ``KIND`` tells the kernels the format."""

    blocks: np.ndarray
    cols: int
    rows: int
    KIND: ClassVar[int] = 0
    ROW_BLOCK: ClassVar[int] = 0  # bytes of a row-major block
    FIELDS: ClassVar[int] = 0  # floats per block in the head (scales, min)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @classmethod
    def packed_shape(cls, rows: int, cols: int) -> tuple[int, int]:
        return (-(-rows // GROUP), cols // BLOCK * (cls.FIELDS * GROUP * 4 + GROUP * BLOCK))

    @classmethod
    def pack(cls, row_blocks: np.ndarray, cols: int) -> BlockMatrix:
        """A matrix from row-major blocks (rows, cols / 32 * ROW_BLOCK)."""
        out = np.empty(cls.packed_shape(row_blocks.shape[0], cols), np.uint8)
        for r0 in range(0, row_blocks.shape[0], CHUNK_ROWS):
            cls.pack_rows(row_blocks[r0 : r0 + CHUNK_ROWS], out, r0)
        return cls(out, cols, row_blocks.shape[0])

    @classmethod
    def pack_rows(cls, row_blocks: np.ndarray, out: np.ndarray, first_row: int) -> None:
        """Pack row-major blocks of rows first_row.. (first_row a multiple of 16) into out."""
        n = row_blocks.shape[0]
        nb = out.shape[1] // (cls.FIELDS * GROUP * 4 + GROUP * BLOCK)
        src = row_blocks.reshape(n, nb, cls.ROW_BLOCK)
        groups = -(-n // GROUP)
        if groups * GROUP != n:  # the last group's missing rows: scale 0, values 0
            src = np.concatenate([src, np.zeros((groups * GROUP - n, nb, cls.ROW_BLOCK), np.uint8)])
        heads = cls._heads(src).reshape(groups, GROUP, nb, cls.FIELDS).transpose(0, 2, 3, 1)
        values = (src[..., cls.ROW_BLOCK - BLOCK :] ^ 0x80).reshape(groups, GROUP, nb, 8, 4)
        dst = out[first_row // GROUP : first_row // GROUP + groups].reshape(groups, nb, -1)
        head_bytes = cls.FIELDS * GROUP * 4
        dst[..., :head_bytes] = np.ascontiguousarray(heads).view(np.uint8).reshape(groups, nb, head_bytes)
        dst[..., head_bytes:] = values.transpose(0, 2, 3, 1, 4).reshape(groups, nb, GROUP * BLOCK)

    def row_blocks(self) -> np.ndarray:
        """The row-major blocks again (for oracles and tests), exact."""
        groups, nb, head_bytes = self.blocks.shape[0], self.cols // BLOCK, self.FIELDS * GROUP * 4
        b = self.blocks.reshape(groups, nb, -1)
        heads = b[..., :head_bytes].copy().view(np.float32).reshape(groups, nb, self.FIELDS, GROUP)
        heads = heads.transpose(0, 3, 1, 2).reshape(groups * GROUP, nb, self.FIELDS)
        values = b[..., head_bytes:].reshape(groups, nb, 8, GROUP, 4).transpose(0, 3, 1, 2, 4) ^ 0x80
        rows = np.concatenate([self._head_bytes(heads), values.reshape(groups * GROUP, nb, BLOCK)], axis=2)
        return np.ascontiguousarray(rows[: self.rows].reshape(self.rows, -1))

    def dequantize(self) -> np.ndarray:
        """The float32 values (for oracles and tests), exact."""
        raise NotImplementedError

    @staticmethod
    def _heads(src: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _head_bytes(heads: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Q8Matrix(BlockMatrix):
    """Q8_0: value i of a block is scale * q[i] (row-major: an f16 scale, 32 int8)."""

    __slots__ = ()
    KIND = 1  # the kernels' LLM_W_Q8_0
    ROW_BLOCK = Q8_BYTES
    FIELDS = 1

    @staticmethod
    def _heads(src: np.ndarray) -> np.ndarray:
        scales: np.ndarray = src[..., :2].copy().view(np.float16).astype(np.float32)
        return scales

    @staticmethod
    def _head_bytes(heads: np.ndarray) -> np.ndarray:
        return heads.astype(np.float16).view(np.uint8)  # exact: the scales were f16

    def dequantize(self) -> np.ndarray:
        b = self.row_blocks().reshape(-1, Q8_BYTES)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        values: np.ndarray = (d * q).reshape(self.shape)
        return values


class Q8SMatrix(BlockMatrix):
    """Q8S: value i of a block is (scale_lo if i < 16 else scale_hi) * q[i] - min (row-major:
    float scale_lo, scale_hi, min; 32 int8)."""

    __slots__ = ()
    KIND = 2  # the kernels' LLM_W_Q8S
    ROW_BLOCK = 44
    FIELDS = 3

    @staticmethod
    def _heads(src: np.ndarray) -> np.ndarray:
        fields: np.ndarray = src[..., :12].copy().view(np.float32)
        return fields

    @staticmethod
    def _head_bytes(heads: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(heads).view(np.uint8)

    def dequantize(self) -> np.ndarray:
        b = self.row_blocks().reshape(-1, Q8S_BYTES)
        head = b[:, :12].copy().view(np.float32)  # (blocks, 3)
        q = b[:, 12:].view(np.int8).astype(np.float32)
        scale = np.repeat(head[:, :2], 16, axis=1)
        values: np.ndarray = (scale * q - head[:, 2:3]).reshape(self.shape)
        return values


class Q8KMatrix(Q8SMatrix):
    """Q8S blocks widened from a K-quant (Q4_K, Q5_K, Q6_K): the kernels quantise activations
    for it in blocks of 256, as llama.cpp does for these types, so the integer sums are its."""

    __slots__ = ()
    KIND = 3  # the kernels' LLM_W_Q8K


def pack_widened(
    matrix: type[BlockMatrix], raw_rows: np.ndarray, cols: int,
    widen_rows: Callable[[np.ndarray, np.ndarray], None] | None,
) -> Callable[[np.ndarray], None]:
    """A loader's fill function: widen the file's rows (uint8, one row of blocks each) to
    row-major blocks a chunk at a time, and pack them into the destination. No `widen_rows`:
    the file's rows are those blocks already (Q8_0), packed as they lie."""
    row_bytes = cols // BLOCK * matrix.ROW_BLOCK

    def fill(out: np.ndarray) -> None:
        for r0 in range(0, raw_rows.shape[0], CHUNK_ROWS):
            part = np.asarray(raw_rows[r0 : r0 + CHUNK_ROWS])
            rows = part
            if widen_rows is not None:
                rows = np.empty((part.shape[0], row_bytes), np.uint8)
                widen_rows(part, rows)
            matrix.pack_rows(rows, out, r0)

    return fill


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
