"""Every GGUF family the runner computes (llama, qwen2, qwen3, gemma3), on small random-weight
files written at test time with a fixed seed, and on the committed quantised fixtures (Q8_0;
Q4_K_M's mix of Q4_K, Q5_0, Q6_K, Q8_0): against the numpy oracle, batch invariance,
chunked prefill, every SIMD level, any thread count, and the sliding window reading only
the window. The 8-bit kernels' own checks are in test_q8.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmos.fixtures.make_models import SPECS, write_model
from llmos.servers.runner.loaders import load_model
from llmos.servers.runner.model import Model, SeqChunk
from llmos.servers.runner.reference import NumpyLlama
from tests.servers.runner.helpers import assert_same_bits, bits, per_simd_level

ARCHES = sorted(SPECS)
QUANTISED = ["llama-tiny-q8_0.gguf", "gemma3-tiny-q4_k_m.gguf"]
FIXTURES = Path(__file__).parents[2] / "fixtures" / "llama_cpp"
POSITIONS = 48  # past gemma3's window of 16 in the CI shapes, over several KV blocks


@pytest.fixture(scope="module", params=ARCHES + QUANTISED)
def model_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param in QUANTISED:
        return FIXTURES / request.param
    spec = SPECS[request.param]
    return write_model(spec, tmp_path_factory.mktemp(spec.name) / f"{spec.name}.gguf")


@pytest.fixture(scope="module")
def model(model_file: Path) -> Model:
    return Model.load(model_file)


@pytest.fixture(scope="module")
def ids(model: Model) -> list[int]:
    rng = np.random.default_rng(7)
    return rng.integers(0, model.config.vocab_size, POSITIONS).tolist()


def forced(model: Model, ids: list[int], chunk: int = 1) -> np.ndarray:
    """Logits of the last row of each step, prefilling ``chunk`` tokens per step (every
    position when ``chunk`` is 1)."""
    kv = model.new_kv_pool(model.blocks_needed(len(ids)))
    table = list(range(kv.shape[0]))
    rows = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows.append(model.step([SeqChunk(table, start, part)], kv).logits[0])
    return np.stack(rows)


def test_the_family_is_read_from_the_file(model: Model) -> None:
    c = model.config
    assert c.arch in ("llama", "qwen2", "qwen3", "gemma3")
    if c.arch == "gemma3":
        assert c.sliding_window > 0 and c.swa_pattern == 6 and c.activation == "gelu_tanh"
        assert [c.is_local(i) for i in range(6)] == [True] * 5 + [False]
        assert c.embed_scale == pytest.approx(np.sqrt(c.dim), rel=1e-6)
    assert c.qkv_bias == (c.arch == "qwen2")
    assert c.qk_norm == (c.arch in ("qwen3", "gemma3"))
    w = model.loaded.weights.layers[0]
    assert (w.bq is not None) == c.qkv_bias and (w.q_norm is not None) == c.qk_norm
    assert (w.post_att_norm is not None) == c.post_norms


@pytest.mark.parametrize("arch", ARCHES)  # float weights: 8-bit ones quantise activations
def test_matches_the_numpy_oracle(arch: str, tmp_path: Path) -> None:
    model = Model.load(write_model(SPECS[arch], tmp_path / f"{arch}.gguf"))
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, POSITIONS).tolist()
    ours = forced(model, ids)
    ref = NumpyLlama(model.loaded, batch=1, max_pos=len(ids))
    theirs = np.stack([ref.forward(np.array([t]), p)[0] for p, t in enumerate(ids)])
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.97


def test_alone_and_in_a_batch_give_the_same_bits(model: Model, ids: list[int]) -> None:
    alone = forced(model, ids)
    # The same sequence decoded beside three others that start elsewhere.
    n = len(ids)
    per_seq = model.blocks_needed(n)
    kv = model.new_kv_pool(4 * per_seq)
    rng = np.random.default_rng(3)
    others = [rng.integers(0, model.config.vocab_size, n).tolist() for _ in range(3)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(4)]
    got = []
    for p in range(n):
        chunks = [SeqChunk(tables[0], p, [ids[p]])]
        chunks += [SeqChunk(tables[i + 1], p, [others[i][p]]) for i in range(3)]
        got.append(model.step(chunks[::-1] if p % 2 else chunks, kv).logits[3 if p % 2 else 0])
    assert np.array_equal(bits(np.stack(got)), bits(alone))


def test_chunked_prefill_gives_the_same_bits(model: Model, ids: list[int]) -> None:
    whole = model.step(
        [SeqChunk(list(range(model.blocks_needed(len(ids)))), 0, ids)],
        model.new_kv_pool(model.blocks_needed(len(ids))),
    ).logits[0]
    by_seven = forced(model, ids, chunk=7)[-1]
    one_by_one = forced(model, ids)[-1]
    assert np.array_equal(bits(whole), bits(by_seven))
    assert np.array_equal(bits(whole), bits(one_by_one))


def test_every_simd_level_gives_the_same_bits(model_file: Path, ids: list[int]) -> None:
    # block size 13: the window starts mid-block, through the 8-, 4- and 1-slot loops
    assert_same_bits(per_simd_level(lambda: forced(Model.load(model_file, block_tokens=13), ids)))


def test_a_window_layer_reads_only_the_window(tmp_path: Path) -> None:
    model_file = write_model(SPECS["gemma3"], tmp_path / "gemma3.gguf")
    model = Model.load(model_file)
    c = model.config
    ids = np.random.default_rng(7).integers(0, c.vocab_size, POSITIONS).tolist()
    # Garbage in the KV of positions that every layer's window has left behind changes
    # nothing in a model whose layers are all local: make one such model from the file.
    loaded = load_model(model_file)
    from dataclasses import replace

    all_local = replace(c, swa_pattern=c.n_layers + 1)
    assert all(all_local.is_local(i) for i in range(c.n_layers))
    local_model = Model(replace(loaded, config=all_local), block_tokens=model.block_tokens)
    n = len(ids)
    kv = local_model.new_kv_pool(local_model.blocks_needed(n))
    table = list(range(kv.shape[0]))
    clean = local_model.step([SeqChunk(table, 0, ids)], kv).logits[0]
    window_start = n - c.sliding_window  # the last row reads positions window_start..n-1
    stale_blocks = window_start // local_model.block_tokens
    kv[:stale_blocks] = np.nan
    again = local_model.step([SeqChunk(table, n - 1, ids[-1:])], kv).logits[0]
    assert np.isfinite(again).all()
    assert np.array_equal(bits(again), bits(clean))


def test_any_thread_count_gives_the_same_bits(model_file: Path, ids: list[int]) -> None:
    from llmos.servers.runner import _kernels

    before = _kernels.threads()
    results = []
    try:
        for n in (1, 2, 3):
            model = Model.load(model_file, threads=n)
            # a batch of rows (prefill) and single rows (decode) both split over threads
            whole = model.step(
                [SeqChunk(list(range(model.blocks_needed(len(ids)))), 0, ids)],
                model.new_kv_pool(model.blocks_needed(len(ids))),
            ).logits[0]
            results.append(np.concatenate([bits(whole), bits(forced(model, ids)).ravel()]))
    finally:
        _kernels.set_threads(before)
    for got in results[1:]:
        assert np.array_equal(got, results[0])
