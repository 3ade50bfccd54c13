"""The scheduler driving the real runner model (stories260K): schedule -> Model.step ->
postprocess gives the expected greedy texts, and every sequence of a mixed concurrent batch
gets exactly the tokens it gets alone, with and without preemptions, with one or two steps
in flight, and under every policy (round robin turns, priorities, fair share)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from llmos.servers.runner.loaders import default_tokenizer_path
from llmos.servers.runner.model import Model, SeqChunk, generate, run_steps
from llmos.servers.runner.sampling import SamplingParams
from llmos.servers.scheduler import (
    FinishEvent,
    FreeListBlocks,
    Sampling,
    Scheduler,
    SchedulerConfig,
    Sequence,
    StepPlan,
    TokenEvent,
)
from tests.servers.runner.helpers import EXPECTED_FROM_BOS, EXPECTED_ZOO

NUM_SEQS = 32


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load()  # the shipped stories260K


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_tokenizer_path())


STOP_IDS = frozenset({1, 2})  # stories260K's (checked against the tokenizer below)


def runner_params(s: Sampling) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)


def run_step(model: Model, plan: StepPlan, kv: np.ndarray) -> list[list[int]]:
    chunks = [
        SeqChunk(
            c.block_table,
            c.start_pos,
            c.token_ids,
            wants_logits=c.wants_token,
            sampling=runner_params(c.sampling) if c.wants_token else None,
        )
        for c in plan.chunks
    ]
    return run_steps(model, chunks, [c.num_steps for c in plan.chunks], kv, STOP_IDS)


def serve(
    model: Model, sched: Scheduler, num_blocks: int, *, num_runners: int = 1
) -> dict[int, tuple[list[int], str]]:
    """Run every sequence to its end: up to ``num_runners`` steps planned at once, the oldest
    computed first. Returns seq_id -> (output ids, finish reason)."""
    kv = model.new_kv_pool(num_blocks)
    outputs: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    while sched.num_unfinished:
        while len(sched.steps_in_flight) < num_runners and sched.schedule(0.0) is not None:
            pass
        plan = sched.steps_in_flight[0]
        for e in sched.postprocess(plan, run_step(model, plan, kv)):
            if isinstance(e, TokenEvent):
                assert e.index == len(outputs.setdefault(e.seq_id, []))
                outputs[e.seq_id].append(e.token_id)
            elif isinstance(e, FinishEvent):
                reasons[e.seq_id] = e.reason
    return {sid: (outputs.get(sid, []), reason) for sid, reason in reasons.items()}


def make_scheduler(
    model: Model, num_blocks: int, **limits: object
) -> tuple[Scheduler, FreeListBlocks]:
    config = SchedulerConfig(
        max_context=model.config.seq_len,
        vocab_size=model.config.vocab_size,
        block_tokens=model.block_tokens,
        **{"decode_steps": 1, **limits},  # type: ignore[arg-type]
    )
    blocks = FreeListBlocks(range(num_blocks))
    return Scheduler(config, blocks), blocks


@pytest.mark.parametrize(
    ("text", "expected", "token_budget"),
    [("", EXPECTED_FROM_BOS, 512), ("Zoo", EXPECTED_ZOO, 2)],
)
def test_greedy_text_matches_the_readme(
    model: Model, tokenizer: Tokenizer, text: str, expected: str, token_budget: int
) -> None:
    prompt = tokenizer.encode(text)
    max_tokens = len(tokenizer.encode(expected)) + 4
    sched, blocks = make_scheduler(model, 64, token_budget=token_budget)
    sched.add(Sequence(0, prompt, max_tokens=max_tokens, stop_ids=tokenizer.stop_ids))
    ((output, reason),) = serve(model, sched, 64).values()
    assert output == generate(model, prompt, max_tokens, stop_ids=sorted(tokenizer.stop_ids))
    assert tokenizer.decode(prompt + output).startswith(expected)
    assert reason == "length" and blocks.num_free == 64


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling


def mixed_requests(tokenizer: Tokenizer) -> list[Request]:
    rng = random.Random(260)
    texts = ["", "Zoo", "Once upon a time", "The cat sat on the", "Lily and Ben went to"]
    requests = []
    for i in range(NUM_SEQS):
        if i % 3 == 2:
            prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        else:
            prompt = tokenizer.encode(texts[i % len(texts)])
        if i % 2:
            sampling = Sampling(
                temperature=rng.choice([0.7, 1.0]),
                top_k=rng.choice([0, 40]),
                top_p=rng.choice([1.0, 0.9]),
                seed=rng.randrange(2**63),
            )
        else:
            sampling = Sampling()
        requests.append(Request(prompt, rng.randrange(1, 61), sampling))
    return requests


@pytest.fixture(scope="module")
def requests_and_outputs(model: Model, tokenizer: Tokenizer) -> list[tuple[Request, list[int]]]:
    """Each request's tokens computed alone, by the runner's own generate()."""
    stops = sorted(tokenizer.stop_ids)
    return [
        (r, generate(model, r.prompt_ids, r.max_tokens, runner_params(r.sampling), stop_ids=stops))
        for r in mixed_requests(tokenizer)
    ]


@pytest.mark.parametrize(
    ("block_tokens", "num_blocks", "token_budget", "num_runners", "preempts", "decode_steps"),
    [
        (16, 256, 512, 1, False, 1),  # room for everyone
        (16, 10, 48, 1, True, 1),  # a small pool: preemptions and recomputation
        (4, 30, 24, 2, True, 1),  # small blocks, two steps in flight
        (16, 256, 512, 2, False, 5),  # multi-step decoding, two steps in flight
        (4, 30, 24, 1, True, 3),  # multi-step decoding under block pressure
    ],
)
def test_concurrent_sequences_get_the_tokens_they_get_alone(
    model: Model,
    tokenizer: Tokenizer,
    requests_and_outputs: list[tuple[Request, list[int]]],
    block_tokens: int,
    num_blocks: int,
    token_budget: int,
    num_runners: int,
    preempts: bool,
    decode_steps: int,
) -> None:
    assert tokenizer.stop_ids == STOP_IDS
    if block_tokens != model.block_tokens:
        model = Model(model.loaded, block_tokens=block_tokens)
    sched, blocks = make_scheduler(
        model, num_blocks, token_budget=token_budget, max_running=NUM_SEQS, max_batch_size=NUM_SEQS,
        decode_steps=decode_steps,
    )
    for sid, (r, _) in enumerate(requests_and_outputs):
        sched.add(
            Sequence(
                sid,
                r.prompt_ids,
                max_tokens=r.max_tokens,
                sampling=r.sampling,
                stop_ids=tokenizer.stop_ids,
            )
        )
    results = serve(model, sched, num_blocks, num_runners=num_runners)
    for sid, (r, expected) in enumerate(requests_and_outputs):
        output, reason = results[sid]
        assert output == expected, f"sequence {sid} ({r.sampling}) differs"
        assert reason == ("length" if len(output) == r.max_tokens else "stop")
    assert (sched.stats().num_preemptions > 0) == preempts
    assert blocks.num_free == num_blocks


@pytest.mark.parametrize(
    ("policy", "num_blocks", "preempts"),
    [
        ("rr", 256, False),  # turns that keep their KV
        ("rr", 12, True),  # turns whose KV is taken under pressure, then recomputed
        ("priority", 12, True),  # high priorities take the blocks of low ones
        ("fair", 12, True),
    ],
)
def test_policies_give_every_sequence_the_tokens_it_gets_alone(
    model: Model,
    tokenizer: Tokenizer,
    requests_and_outputs: list[tuple[Request, list[int]]],
    policy: str,
    num_blocks: int,
    preempts: bool,
) -> None:
    sched, blocks = make_scheduler(
        model, num_blocks, token_budget=48, max_running=8, max_batch_size=8, policy=policy,
        quantum=2, aging_steps=3,
    )
    for sid, (r, _) in enumerate(requests_and_outputs):
        sched.add(
            Sequence(
                sid,
                r.prompt_ids,
                max_tokens=r.max_tokens,
                sampling=r.sampling,
                stop_ids=tokenizer.stop_ids,
                priority=sid % 3,
                tenant=f"client{sid % 2}",
            )
        )
    results = serve(model, sched, num_blocks)
    for sid, (r, expected) in enumerate(requests_and_outputs):
        assert results[sid][0] == expected, f"sequence {sid} ({r.sampling}) differs"
    st = sched.stats()
    assert (st.num_preemptions > 0) == preempts
    assert (st.num_yields > 0) == (policy == "rr")
    assert blocks.num_free == num_blocks
