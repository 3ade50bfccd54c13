"""The 8-bit weight path: Q4_0 and Q5_0 widen to Q8_0 blocks exactly and the K-quants and
Q4_1/Q5_1 to Q8S blocks, packing keeps every block, the kernels equal a float64 computation
of the same integer sums (activations quantised as llama.cpp does for each type), and every
SIMD level gives the same bits (the K-quant fixtures' bits across levels are in
test_architectures.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from llmos.servers.runner import _kernels
from llmos.servers.runner.loaders import load_model
from llmos.servers.runner.model import Model, SeqChunk
from llmos.servers.runner.q8 import (
    Q8S_TYPES,
    BlockMatrix,
    Q8KMatrix,
    Q8Matrix,
    Q8SMatrix,
    q8_row_bytes,
    q8s_row_bytes,
    widen,
    widen_q8s,
)
from tests.servers.runner.helpers import (
    STORIES_GGUF,
    assert_same_bits,
    per_simd_level,
    rewrite_gguf,
)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_0"])
def test_widening_keeps_every_value(kind: str) -> None:
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(values, qtype)
    out = np.empty((8, q8_row_bytes(256)), np.uint8)
    widen(raw, kind, out)
    packed = Q8Matrix.pack(out, 256)
    assert np.array_equal(packed.row_blocks(), out)
    assert np.array_equal(packed.dequantize(), gguf.quants.dequantize(raw, qtype))


def random_superblocks(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n blocks of ``kind`` with random bits (every bit pattern is a valid block) and sane
    f16 scales (gguf cannot write K-quants; llama-quantize is not here)."""
    size = Q8S_TYPES[kind][0]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)

    def f16(scale: float) -> np.ndarray:
        return rng.uniform(-scale, scale, n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if kind in ("Q4_K", "Q5_K"):
        raw[:, 0:2], raw[:, 2:4] = f16(0.1), f16(0.1)
    elif kind == "Q6_K":
        raw[:, 208:210] = f16(0.01)
    else:
        raw[:, 0:2], raw[:, 2:4] = f16(0.1), f16(1.0)
    return raw


@pytest.mark.parametrize("kind", sorted(Q8S_TYPES))
def test_k_quants_widen_to_q8s_keeping_every_value(kind: str) -> None:
    rng = np.random.default_rng(9)
    rows, cols = 3, 512
    raw = random_superblocks(kind, rows * cols // Q8S_TYPES[kind][1], rng).reshape(rows, -1)
    out = np.empty((rows, q8s_row_bytes(cols)), np.uint8)
    widen_q8s(raw, kind, out)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    packed = Q8SMatrix.pack(out, cols)
    assert np.array_equal(packed.row_blocks(), out)
    assert np.array_equal(packed.dequantize(), want)


@pytest.mark.parametrize(("kind", "matrix"), [("Q6_K", Q8KMatrix), ("Q4_K", Q8KMatrix), ("Q5_1", Q8SMatrix)])
def test_a_q8s_matmul_is_its_integer_sums(kind: str, matrix: type[Q8SMatrix]) -> None:
    rng = np.random.default_rng(2)
    rows, cols = 40, 512  # 40: two whole groups of 16 and a part one
    raw = random_superblocks(kind, rows * cols // Q8S_TYPES[kind][1], rng).reshape(rows, -1)
    blocks = np.empty((rows, q8s_row_bytes(cols)), np.uint8)
    widen_q8s(raw, kind, blocks)
    w = matrix.pack(blocks, cols)
    x = (rng.standard_normal((5, cols)) * np.geomspace(1e-2, 10, 5)[:, None]).astype(np.float32)
    got = _kernels.q8_matmul(x, w)
    head = blocks.reshape(rows, -1, 44)[:, :, :12].copy().view(np.float32)  # (rows, nb, 3)
    wq = blocks.reshape(rows, -1, 44)[:, :, 12:].view(np.int8).astype(np.float64)
    for r in range(5):
        q, d, sums = activation_blocks_k(x[r]) if matrix is Q8KMatrix else activation_blocks(x[r])
        halves = np.stack([np.einsum("obk,bk->ob", wq[:, :, h * 16:(h + 1) * 16], q[:, h * 16:(h + 1) * 16])
                           for h in (0, 1)], axis=-1)
        want = ((halves * head[:, :, :2]).sum(-1) * d - head[:, :, 2] * d * sums).sum(axis=1)
        assert np.abs(got[r] - want).max() <= 1e-5 * np.abs(want).max(), r
    assert np.abs(got - x @ w.dequantize().T).max() < 0.05 * np.abs(x @ w.dequantize().T).max()


def activation_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's 8-bit blocks of one activation row: values, scales (f16-rounded), sums."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[:, None])
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    return q.astype(np.float64), d, q.sum(axis=1)


def activation_blocks_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's Q8_K blocks (256 values, a float scale) of one row, per block of 32."""
    supers = x.reshape(-1, 256).astype(np.float32)
    biggest = supers[np.arange(len(supers)), np.abs(supers).argmax(axis=1)]
    iscale = np.float32(-127) / biggest
    q = np.minimum(np.rint(supers * iscale[:, None]), 127).reshape(-1, 32)
    d = np.repeat((np.float32(1) / iscale).astype(np.float64), 8)
    return q.astype(np.float64), d, q.sum(axis=1)


def quantised(tmp_path: Path, kind: str) -> Path:
    qtype = int(gguf.GGMLQuantizationType[kind])

    def choose(name: str, data: np.ndarray) -> int:
        return qtype if data.ndim == 2 and data.shape[1] % 32 == 0 else 0

    return rewrite_gguf(STORIES_GGUF, tmp_path / f"{kind}.gguf", choose)


def float64_row(x: np.ndarray, w: Q8Matrix) -> np.ndarray:
    """What the 8-bit matmul computes for one activation row, in float64."""
    q, d, _ = activation_blocks(x)
    wb = w.row_blocks().reshape(w.shape[0], -1, 34)
    wd = wb[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float64)
    wq = wb[:, :, 2:].view(np.int8).astype(np.float64)
    isums = np.einsum("obk,bk->ob", wq, q)
    return np.asarray((isums * wd * d[None, :]).sum(axis=1))


def test_an_8_bit_matmul_is_its_integer_sums(tmp_path: Path) -> None:
    wcls = load_model(quantised(tmp_path, "Q8_0")).weights.wcls
    assert isinstance(wcls, Q8Matrix)
    # 7 rows: a tile of four and a partial one; rows scaled apart so their blocks differ.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, wcls.cols)) * np.geomspace(1e-3, 30, 7)[:, None]).astype(np.float32)
    got = _kernels.q8_matmul(x, wcls)
    for r in range(7):
        want = float64_row(x[r], wcls)
        assert np.abs(got[r] - want).max() <= 1e-5 * np.abs(want).max(), r


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_0"])
def test_every_simd_level_gives_the_same_bits(tmp_path: Path, kind: str) -> None:
    model_path = quantised(tmp_path, kind)
    ids = [1, *np.random.default_rng(3).integers(3, 512, 40).tolist()]

    def logits() -> np.ndarray:
        model = Model.load(model_path)
        kv = model.new_kv_pool(model.blocks_needed(len(ids)))
        table = list(range(kv.shape[0]))
        rows = [model.step([SeqChunk(table, p, [t])], kv).logits[0] for p, t in enumerate(ids)]
        batch = model.step([SeqChunk(table, 0, ids)], model.new_kv_pool(kv.shape[0])).logits[0]
        return np.concatenate([np.stack(rows).ravel(), batch])

    assert_same_bits(per_simd_level(logits))


@pytest.mark.parametrize(("kind", "matrix"), [("Q8_0", Q8Matrix), ("Q6_K", Q8KMatrix), ("Q4_1", Q8SMatrix)])
def test_every_simd_level_gives_the_same_bits_at_odd_sizes(kind: str, matrix: type[BlockMatrix]) -> None:
    # 37 outputs: two groups of 16 and 5 of a third (a part of a 256-bit half); 1-6 rows:
    # every tile height and a tile and a part; 16, 21 and 37 rows: AMX's tiles of 16 rows
    # and what is left of them.
    rng = np.random.default_rng(4)
    rows, cols = 37, 512
    if kind == "Q8_0":
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    else:
        raw = random_superblocks(kind, rows * cols // Q8S_TYPES[kind][1], rng).reshape(rows, -1)
        blocks = np.empty((rows, q8s_row_bytes(cols)), np.uint8)
        widen_q8s(raw, kind, blocks)
    w = matrix.pack(blocks, cols)
    for n in (1, 2, 3, 4, 5, 6, 16, 21, 37):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        assert_same_bits(per_simd_level(lambda: _kernels.q8_matmul(x, w)))  # noqa: B023
