"""Loaders: the shipped default model, llama2.c headers (legacy, v1, v2), GGUF F32/F16/Q8_0,
memory mapping, and dequantisation into a caller-provided buffer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from llmos.servers.runner import loaders
from llmos.servers.runner.loaders import (
    LoadedModel,
    default_model_path,
    default_tokenizer_path,
    dequantised_nbytes,
    load_model,
    read_config,
)
from llmos.servers.runner.q8 import Q8Matrix, as_float

from .helpers import (
    STORIES_GGUF,
    f16_everywhere,
    q8_where_possible,
    rewrite_gguf,
    write_gguf_of_architecture,
    write_legacy_unshared,
    write_llama2c_v1,
    write_llama2c_v2,
)

SHA256 = {
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
}
FIELDS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")


def all_tensors(m: LoadedModel) -> dict[str, np.ndarray]:
    """Every tensor's float32 values (8-bit matrices dequantised)."""
    w = m.weights
    out = {"tok_embeddings": w.tok_embeddings, "rms_final": w.rms_final, "wcls": w.wcls}
    for i, lw in enumerate(w.layers):
        out |= {f"{i}.{f}": getattr(lw, f) for f in FIELDS}
    return {name: as_float(t) for name, t in out.items()}


@pytest.fixture(scope="module")
def legacy() -> LoadedModel:
    return load_model(default_model_path())


def test_default_model_is_shipped_inside_the_package() -> None:
    package_dir = Path(loaders.__file__).parent / "models"
    for path in (default_model_path(), default_tokenizer_path()):
        assert path.parent.resolve() == package_dir.resolve()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path.name]
    origin = (package_dir / "ORIGIN.md").read_text()
    assert "karpathy/tinyllamas" in origin and "MIT License" in origin


def test_legacy_header(legacy: LoadedModel) -> None:
    c = legacy.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        64,
        172,
        5,
        8,
        4,
        512,
        512,
    )
    assert (c.head_size, c.kv_dim, c.rope_layout, c.shared_classifier) == (8, 32, "adjacent", True)
    assert legacy.format == "llama2c" and legacy.dequantised_nbytes == 0
    assert legacy.weights.wcls is legacy.weights.tok_embeddings
    assert read_config(default_model_path()) == c


def test_float32_weights_are_memory_mapped(legacy: LoadedModel) -> None:
    for name, a in all_tensors(legacy).items():
        assert a.dtype == np.float32 and a.flags.c_contiguous, name
        assert not a.flags.owndata and not a.flags.writeable, name
    # Spot-check against the file: the first embedding row starts right after the header.
    raw = np.fromfile(default_model_path(), dtype="<f4", count=7 + 64)[7:]
    assert np.array_equal(legacy.weights.tok_embeddings[0], raw)


def test_gguf_f32_is_bit_identical_to_the_bin(legacy: LoadedModel) -> None:
    m = load_model(STORIES_GGUF)
    assert m.format == "gguf" and m.dequantised_nbytes == 0
    assert m.config == legacy.config.__class__(
        **{
            **{f: getattr(legacy.config, f) for f in legacy.config.__slots__},  # type: ignore[attr-defined]
            "norm_eps": m.config.norm_eps,
        }
    )
    assert np.float32(m.config.norm_eps) == np.float32(1e-5)
    ours, theirs = all_tensors(m), all_tensors(legacy)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
        assert not ours[name].flags.owndata, name


def test_gguf_f16_dequantises_once(tmp_path: Path, legacy: LoadedModel) -> None:
    path = rewrite_gguf(
        STORIES_GGUF, tmp_path / "f16.gguf", f16_everywhere
    )
    m = load_model(path)
    assert m.dequantised_nbytes == dequantised_nbytes(path) > 0
    assert m.weights.buffer is not None
    ours, theirs = all_tensors(m), all_tensors(legacy)
    for name in ours:
        expected = (
            theirs[name]
            if theirs[name].ndim == 1
            else theirs[name].astype(np.float16).astype(np.float32)
        )
        assert np.array_equal(ours[name], expected), name
        if ours[name].ndim == 2:
            assert np.shares_memory(ours[name], m.weights.buffer), name


def test_gguf_mixed_q8_0_and_f16(tmp_path: Path, legacy: LoadedModel) -> None:
    import gguf

    path = rewrite_gguf(
        STORIES_GGUF,
        tmp_path / "q8.gguf",
        q8_where_possible,
    )
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    m = load_model(path)
    ours, theirs = all_tensors(m), all_tensors(legacy)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == np.float32, name
        # Q8_0: at most half a step (max|w| / 127) per value, plus the float16 rounding of
        # the stored scale (up to 127 * 2**-11 of a step).
        bound = np.abs(b).max() / 127 * 0.6 + 1e-7
        assert np.abs(a - b).max() <= bound, name


def test_dequantise_into_a_caller_buffer(tmp_path: Path) -> None:
    path = rewrite_gguf(
        STORIES_GGUF,
        tmp_path / "q8.gguf",
        q8_where_possible,
    )
    nbytes = dequantised_nbytes(path)
    segment = bytearray(nbytes + 64)  # stands in for a shared-memory segment
    first = load_model(path, buffer=segment)
    assert first.weights.buffer is not None
    # F16 is dequantised into the buffer, and Q8_0 packed into it.
    assert np.shares_memory(first.weights.layers[0].w2, np.frombuffer(segment, np.uint8))
    assert isinstance(first.weights.layers[0].wq, Q8Matrix)
    assert np.shares_memory(first.weights.layers[0].wq.blocks, np.frombuffer(segment, np.uint8))
    # A second runner attaches to the filled segment without dequantising again.
    copy = bytearray(segment)
    second = load_model(path, buffer=copy, fill=False)
    ours, theirs = all_tensors(second), all_tensors(first)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
    copy[:] = bytes(len(copy))  # the views see the segment, not a private copy
    assert not second.weights.layers[0].w2.any()
    with pytest.raises(ValueError, match="buffer holds"):
        load_model(path, buffer=bytearray(nbytes - 1))


def test_llama2c_v1_header(tmp_path: Path, legacy: LoadedModel) -> None:
    m = load_model(write_llama2c_v1(legacy, tmp_path / "v1.bin"))
    assert m.config == legacy.config and m.dequantised_nbytes == 0
    ours, theirs = all_tensors(m), all_tensors(legacy)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def test_llama2c_v1_unshared_classifier(tmp_path: Path, legacy: LoadedModel) -> None:
    wcls = legacy.weights.tok_embeddings[::-1].copy()
    m = load_model(write_llama2c_v1(legacy, tmp_path / "v1.bin", wcls=wcls))
    assert not m.config.shared_classifier
    assert np.array_equal(m.weights.wcls, wcls)
    assert np.array_equal(m.weights.tok_embeddings, legacy.weights.tok_embeddings)


def test_legacy_negative_vocab_means_unshared_classifier(
    tmp_path: Path, legacy: LoadedModel
) -> None:
    wcls = legacy.weights.tok_embeddings * 2
    m = load_model(write_legacy_unshared(default_model_path(), tmp_path / "u.bin", wcls))
    assert not m.config.shared_classifier and m.config.vocab_size == 512
    assert np.array_equal(m.weights.wcls, wcls)


def test_llama2c_v2_q8(tmp_path: Path, legacy: LoadedModel) -> None:
    path = write_llama2c_v2(legacy, tmp_path / "v2.bin", group_size=64)
    m = load_model(path)
    assert m.dequantised_nbytes > 0 and m.config == legacy.config
    ours, theirs = all_tensors(m), all_tensors(legacy)
    for name in ours:
        bound = np.abs(theirs[name]).max() / 127 * 0.51 + 1e-7
        assert np.abs(ours[name] - theirs[name]).max() <= bound, name


def test_rejects_bad_files(tmp_path: Path) -> None:
    truncated = tmp_path / "short.bin"
    truncated.write_bytes(default_model_path().read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_model(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"garbage.bin: not a model file"):
        load_model(garbage)


def test_rejects_unknown_gguf_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_model(write_gguf_of_architecture(tmp_path / "x.gguf", "gpt2"))


def test_gguf_with_a_separate_classifier(tmp_path: Path, legacy: LoadedModel) -> None:
    wcls = legacy.weights.tok_embeddings[::-1] * 0.5
    path = rewrite_gguf(
        STORIES_GGUF,
        tmp_path / "untied.gguf",
        lambda name, data: 0,  # F32 everywhere
        extra={"output.weight": wcls},
    )
    m = load_model(path)
    assert not m.config.shared_classifier
    assert np.array_equal(m.weights.wcls, wcls)
    assert np.array_equal(m.weights.tok_embeddings, legacy.weights.tok_embeddings)


def test_tokenizer_path_for(tmp_path: Path) -> None:
    gguf_path = STORIES_GGUF
    assert loaders.tokenizer_path_for(gguf_path) == gguf_path
    assert loaders.tokenizer_path_for(default_model_path()) == default_tokenizer_path()
    model = tmp_path / "m.bin"
    model.write_bytes(default_model_path().read_bytes())
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.bin"):
        loaders.tokenizer_path_for(model)
    (tmp_path / "tokenizer.bin").write_bytes(default_tokenizer_path().read_bytes())
    assert loaders.tokenizer_path_for(model) == tmp_path / "tokenizer.bin"
