"""Sampling: the (seed, position) draw, greedy/temperature/top-k/top-p, and a seeded text
that is the same alone and inside a batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.servers.runner import _kernels
from llmos.servers.runner.model import Model, SeqChunk, generate
from llmos.servers.runner.sampling import (
    CANDIDATES,
    GREEDY,
    SamplingParams,
    _sample_batch,
    logprob_of,
    penalised,
    sample,
    sample_rows,
    splitmix64,
    uniform,
    uniform_many,
)


def test_splitmix64_known_values() -> None:
    # The first outputs of Vigna's splitmix64 seeded with 0 (state += golden gamma).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**20))
def test_uniform_is_a_pure_function_in_unit_interval(seed: int, position: int) -> None:
    u = uniform(seed, position)
    assert 0.0 <= u < 1.0
    assert u == uniform(seed, position)
    assert u == uniform(seed + 2**64, position)  # seeds are taken modulo 2**64


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=20))
def test_uniform_many_equals_uniform(pairs: list[tuple[int, int]]) -> None:
    seeds, positions = [s for s, _ in pairs], [p for _, p in pairs]
    assert uniform_many(seeds, positions).tolist() == [uniform(s, p) for s, p in pairs]


def test_uniform_looks_uniform() -> None:
    draws = np.array([uniform(s, p) for s in range(20) for p in range(500)])
    assert len(set(draws.tolist())) == draws.size
    hist, _ = np.histogram(draws, bins=10, range=(0, 1))
    assert abs(draws.mean() - 0.5) < 0.01 and hist.min() > 900


def test_params_validate() -> None:
    for bad in (
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]


LOGITS = np.array([1.0, 3.0, 2.0, 3.0, -1.0, 0.5], dtype=np.float32)


def test_greedy_takes_the_first_maximum() -> None:
    assert sample(LOGITS, GREEDY, 0) == 1
    assert sample_rows(np.stack([LOGITS, -LOGITS]), [GREEDY, GREEDY], [0, 0]).tolist() == [1, 4]


def test_top_k_and_top_p_restrict_the_support() -> None:
    draws = {
        k: {sample(LOGITS, SamplingParams(temperature=1.0, top_k=k, seed=3), p) for p in range(400)}
        for k in (1, 2, 3)
    }
    assert draws[1] == {1} and draws[2] == {1, 3} and draws[3] == {1, 2, 3}
    # top_p: probabilities ~ .40 .40 .15 .05 ...: 0.5 keeps the two best, 0.85 adds id 2.
    nucleus = {
        p: {sample(LOGITS, SamplingParams(temperature=1.0, top_p=p, seed=5), q) for q in range(400)}
        for p in (0.3, 0.5, 0.85)
    }
    assert nucleus[0.3] == {1} and nucleus[0.5] == {1, 3} and nucleus[0.85] == {1, 2, 3}


def test_temperature_sampling_follows_the_softmax() -> None:
    params = SamplingParams(temperature=0.7, seed=11)
    counts = np.bincount([sample(LOGITS, params, p) for p in range(6000)], minlength=LOGITS.size)
    z = LOGITS.astype(np.float64) / 0.7
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.abs(counts / counts.sum() - expected).max() < 0.03


def test_a_draw_depends_on_seed_and_position_only() -> None:
    params = SamplingParams(temperature=1.0, seed=99)
    rows = np.tile(LOGITS, (5, 1))
    batch = sample_rows(rows, [params] * 5, [7, 8, 9, 10, 11])
    assert batch.tolist() == [sample(LOGITS, params, p) for p in range(7, 12)]


@settings(max_examples=200)
@given(data=st.data())
def test_the_batched_sampler_picks_what_sample_picks_row_by_row(data: st.DataObject) -> None:
    num_rows = data.draw(st.integers(1, 12), "rows")
    vocab = data.draw(st.sampled_from([1, 2, 5, 64, 512]), "vocab")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "rng"))
    logits = rng.normal(0, data.draw(st.sampled_from([0.1, 1.0, 8.0]), "scale"), size=(num_rows, vocab))
    logits = logits.astype(np.float32)
    if data.draw(st.booleans(), "ties"):
        logits = np.round(logits)  # many equal logits: the order of ties must agree too
    params = [
        data.draw(st.one_of(st.just(GREEDY), st.builds(
            SamplingParams,
            temperature=st.sampled_from([0.05, 0.7, 1.0, 1.9]),
            top_k=st.sampled_from([0, 1, 3, 40, 600]),
            top_p=st.sampled_from([1.0, 0.95, 0.5, 0.01]),
            seed=st.integers(0, 2**63),
        )), f"params {i}")
        for i in range(num_rows)
    ]
    positions = [data.draw(st.integers(0, 4096), f"position {i}") for i in range(num_rows)]
    expected = [sample(logits[i], params[i], positions[i]) for i in range(num_rows)]
    assert sample_rows(logits, params, positions).tolist() == expected
    drawn = [i for i in range(num_rows) if not params[i].is_greedy]  # the batched form, whatever the count
    if drawn:
        batched = _sample_batch(logits[drawn], [params[i] for i in drawn], [positions[i] for i in drawn])
        assert batched.tolist() == [expected[i] for i in drawn]


def test_seeded_text_is_the_same_alone_and_in_a_batch(model: Model) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    prompt = [1, 403, 407]
    alone = generate(model, prompt, 50, params)
    other = SamplingParams(temperature=1.0, seed=5)
    assert alone != generate(model, prompt, 50, other)  # the seed matters

    # Batched: ours beside 15 other sequences with other seeds, lengths and schedules.
    rng = np.random.default_rng(1)
    n = 16
    blocks = model.blocks_needed(len(prompt) + 50 + 40)
    kv = model.new_kv_pool(n * blocks)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
    seqs = [list(prompt)] + [
        [1, *rng.integers(3, 512, size=int(rng.integers(1, 40))).tolist()] for _ in range(n - 1)
    ]
    params_of = [params] + [
        SamplingParams(
            temperature=1.0, top_k=int(rng.integers(0, 20)), seed=int(rng.integers(0, 2**63))
        )
        for _ in range(n - 1)
    ]
    fed = [0] * n
    ours: list[int] = []
    while len(ours) < 50:
        chunks, owners = [], []
        for i in range(n):
            todo = len(seqs[i]) - fed[i]
            take = int(min(todo, rng.integers(1, 8)))
            chunks.append(
                SeqChunk(
                    tables[i],
                    fed[i],
                    seqs[i][fed[i] : fed[i] + take],
                    sampling=params_of[i] if take == todo else None,
                    wants_logits=take == todo,
                )
            )
            owners.append(i)
        out = model.step(chunks, kv)
        for c, i in zip(chunks, owners, strict=True):
            fed[i] += len(c.token_ids)
            if c.sampling is not None:
                seqs[i].append(int(out.token_ids[owners.index(i)]))
                if i == 0:
                    ours.append(seqs[i][-1])
    assert ours == alone


@settings(max_examples=50)
@given(st.lists(st.integers(-3, 3), min_size=2, max_size=40), st.integers(0, 8), st.data())
def test_logprob_of_is_the_log_softmax_with_the_top_tokens_ties_by_id(values: list[int], top: int,
                                                                      data: st.DataObject) -> None:
    row = np.array(values, dtype=np.float32) * np.float32(0.75)  # small ints: many ties
    token = data.draw(st.integers(0, len(values) - 1))
    got = logprob_of(row, token, top)
    z = row.astype(np.float64)
    log_probs = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
    assert got.logprob == pytest.approx(log_probs[token], abs=1e-12)
    expected = sorted(range(len(values)), key=lambda i: (-z[i], i))[:top]
    assert got.top_ids == expected
    assert got.top_logprobs == pytest.approx([log_probs[i] for i in expected], abs=1e-12)


def test_logprobs_of_a_row_do_not_depend_on_its_batch() -> None:
    model = Model.load()
    table = list(range(4))
    alone_pool, batch_pool = model.new_kv_pool(8), model.new_kv_pool(8)
    params = SamplingParams(0.8, 0, 1.0, 5, num_logprobs=5)
    alone = model.step([SeqChunk(table, 0, [1, 403, 261], sampling=params)], alone_pool)
    batched = model.step([SeqChunk([4, 5, 6, 7], 0, [1, 99, 7, 12], sampling=GREEDY),
                          SeqChunk(table, 0, [1, 403, 261], sampling=params)], batch_pool)
    assert alone.logprobs[0] == batched.logprobs[1] and batched.logprobs[0] is None
    assert alone.logprobs[0] is not None and len(alone.logprobs[0].top_ids) == 5


def test_prompt_logprobs_of_a_chunk_equal_one_position_at_a_time() -> None:
    """Row j of a chunk gives the Logprob of token j+1, the same bits a decode step at
    position j gives (batch invariance: chunked and stepwise prefill agree)."""
    model = Model.load()
    prompt = [1, 403, 261, 378, 30, 19, 271, 16]
    table = list(range(2))
    params = SamplingParams(num_logprobs=3)
    whole = model.step([SeqChunk(table, 0, prompt[:5], wants_logits=False, sampling=params, prompt_logprobs=True,
                                 next_token_id=prompt[5]),
                        SeqChunk([2, 3], 0, [1, 7], sampling=GREEDY)], model.new_kv_pool(4))
    got = whole.prompt_logprobs[0]
    assert len(got) == 5 and whole.prompt_logprobs[1] == []
    pool = model.new_kv_pool(4)
    for j in range(5):
        one = model.step([SeqChunk(table, j, [prompt[j]], sampling=params)], pool)
        assert got[j] == logprob_of(one.logits[0], prompt[j + 1], 3), j


@settings(max_examples=60)
@given(data=st.data())
def test_sampling_a_large_vocabulary_from_its_candidates_picks_what_the_whole_order_picks(
        data: st.DataObject) -> None:
    """Past CANDIDATES ids `sample` orders only the top ones, and the whole vocabulary when
    the draw or the top-p cut falls past them (flat rows make that happen): the pick is the
    one the batched form, which always sorts every row whole, makes."""
    vocab = data.draw(st.sampled_from([CANDIDATES + 1, 3000]), "vocab")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "rng"))
    scale = data.draw(st.sampled_from([0.01, 1.0, 6.0]), "scale")  # 0.01: nearly flat
    logits = rng.normal(0, scale, size=(4, vocab)).astype(np.float32)
    if data.draw(st.booleans(), "ties"):
        logits = np.round(logits * 4) / 4
    params = [SamplingParams(temperature=data.draw(st.sampled_from([0.3, 1.0, 2.0])),
                             top_k=data.draw(st.sampled_from([0, 40, 2000])),
                             top_p=data.draw(st.sampled_from([1.0, 0.9, 0.999])),
                             seed=data.draw(st.integers(0, 2**63))) for _ in range(4)]
    positions = [data.draw(st.integers(0, 4096)) for _ in range(4)]
    whole = _sample_batch(logits, params, positions).tolist()
    assert [sample(logits[i], params[i], positions[i]) for i in range(4)] == whole
    assert sample_rows(logits, params, positions).tolist() == whole
    before = _kernels.threads()
    try:  # a runner with threads samples a row per thread: the same picks
        _kernels.set_threads(2)
        assert sample_rows(logits, params, positions).tolist() == whole
    finally:
        _kernels.set_threads(before)


def test_penalties_are_vllms_arithmetic_on_the_row() -> None:
    row = np.array([2.0, -2.0, 1.0, 0.5, 3.0], np.float32)
    # Repetition 2 on ids seen in the prompt (0, 1) or made (2): positive / 2, negative * 2.
    rep = penalised(row, SamplingParams(repetition_penalty=2.0), [0, 1], [2])
    assert rep.tolist() == [1.0, -4.0, 0.5, 0.5, 3.0]
    # Frequency 0.5 per time made, presence 1 once: id 4 made twice, id 3 once; the prompt not.
    made = penalised(row, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), [0], [4, 3, 4])
    assert made.tolist() == [2.0, -2.0, 1.0, 0.5 - 1.5, 3.0 - 2.0]
    assert row.tolist() == [2.0, -2.0, 1.0, 0.5, 3.0]  # a new row: the logits stay as they were


def test_a_penalised_pick_is_the_argmax_of_the_penalised_logits(model: Model) -> None:
    """Through the runner's own step: the pick follows the penalties, the reported logprobs
    stay the model's (as vLLM reports them)."""
    params = SamplingParams(frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.5, num_logprobs=0)
    prompt, made = [1, 403, 407, 403], [407, 407, 9]
    kv = model.new_kv_pool(model.blocks_needed(len(prompt) + len(made) + 1))
    table = list(range(kv.shape[0]))
    ids = prompt + made
    raw = model.step([SeqChunk(table, 0, ids)], kv).logits[0]
    made += [int(np.argmax(raw))] * 2  # as if the model's favourite had been made twice
    out = model.step([SeqChunk(table, 0, ids, sampling=params, penalty_prompt_ids=prompt,
                               penalty_output_ids=made)], model.new_kv_pool(kv.shape[0]))
    assert out.token_ids[0] == int(np.argmax(penalised(raw, params, prompt, made)))
    assert out.token_ids[0] != int(np.argmax(raw))  # the penalties changed the pick
    assert out.logprobs[0] == logprob_of(raw, int(out.token_ids[0]), 0)
