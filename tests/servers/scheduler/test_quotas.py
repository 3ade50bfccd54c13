"""Per-client KV block quotas in the scheduler: a client never holds more than its quota,
waits (or preempts its own sequences) when it is at it, never takes another client's
blocks, and no output changes because of a quota."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llmos.microkernel.errors import QuotaExceeded
from llmos.servers.scheduler import CachedBlocks, FreeListBlocks, Scheduler, SchedulerConfig
from llmos.servers.scheduler.quotas import ClientBlocks
from llmos.servers.scheduler.sequence import FinishReason
from tests.servers.scheduler.fakes import (
    VOCAB,
    FakeRunner,
    Outcome,
    Spec,
    alone,
    check_invariants,
    drive,
    make,
)


def held_by_client(sched: Scheduler) -> dict[Hashable, set[int]]:
    held: dict[Hashable, set[int]] = defaultdict(set)
    for seq in (*sched.running, *sched.waiting):
        held[seq.client].update(seq.block_table)
    return held


def check_quota(sched: Scheduler) -> None:
    quota = sched.config.max_blocks_per_client
    assert quota is not None
    for client, blocks in held_by_client(sched).items():
        assert len(blocks) <= quota, f"client {client!r} holds {len(blocks)} blocks, over its quota of {quota}"


def alone_under_quota(spec: Spec, config: SchedulerConfig) -> tuple[list[int], FinishReason]:
    """The output alone; a sequence its client's quota cannot hold any longer ends "length"."""
    out, reason = alone(spec, config.max_tokens_per_seq)
    if reason == "context" and config.max_tokens_per_seq < config.max_context:
        reason = "length"
    return out, reason


def test_client_blocks_count_a_shared_block_once_per_client() -> None:
    quota = ClientBlocks(max_blocks=3)
    quota.hold("a", [1, 2])
    quota.hold("a", [1, 2])  # a second choice of one prompt: the same blocks
    quota.hold("b", [1])
    assert (quota.num_held("a"), quota.num_held("b")) == (2, 1)
    assert quota.fits("a", 1) and not quota.fits("a", 2)
    quota.let_go("a", [1, 2])
    assert quota.num_held("a") == 2  # the other sequence still holds them
    quota.let_go("a", [1, 2])
    quota.let_go("b", [1])
    assert quota.num_held("a") == quota.num_held("b") == 0
    with pytest.raises(KeyError):
        quota.let_go("a", [1])  # letting go of what one does not hold is a bug, not a no-op
    assert ClientBlocks(None).fits("a", 10**9)


def test_a_prompt_the_quota_cannot_hold_is_refused_and_changes_nothing() -> None:
    sched, blocks, _ = make(64, block_tokens=4, max_blocks_per_client=2)
    with pytest.raises(QuotaExceeded, match=r"does not fit the KV quota of client 'alice'.*at most 7 prompt tokens"):
        sched.add(Spec(tuple(range(1, 9)), 4, tenant="alice").make(0))
    assert sched.num_unfinished == 0 and blocks.num_free == 64
    sched.add(Spec(tuple(range(1, 8)), 4, tenant="alice").make(1))  # 7 tokens and one more: fits


def test_a_sequence_its_quota_cannot_hold_longer_ends_with_length() -> None:
    sched, blocks, runner = make(64, block_tokens=4, max_blocks_per_client=2)
    spec = Spec((1, 2, 3), 50, tenant="alice")
    sched.add(spec.make(0))
    out = drive(sched, blocks, runner)
    assert out.reasons[0] == "length" and len(out.outputs[0]) <= 8 - 3
    assert out.outputs[0] == alone(spec, 8)[0]  # what it made is what it makes alone
    assert blocks.num_free == 64


@pytest.mark.parametrize("policy", ["fcfs", "priority", "rr", "fair"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_client_at_its_quota_waits_while_others_are_served(policy: str, cached: bool) -> None:
    """Tenant a floods a roomy pool; b arrives later. a never holds more than its quota, b
    is admitted at once (a's waiting requests do not hold it up), every text is its own."""
    sched, blocks, runner = make(256, cached=cached, block_tokens=4, max_blocks_per_client=6, policy=policy,
                                 decode_steps=1)
    flood = [Spec((1, 2, 3, i % 7 + 4), 12, tenant="a") for i in range(10)]
    for sid, spec in enumerate(flood):
        sched.add(spec.make(sid))
    late = Spec((9, 8, 7), 12, tenant="b")
    out = Outcome()
    admitted_b_at = None
    for step in range(10_000):
        if step == 3:
            sched.add(late.make(99))
        plan = sched.schedule(float(step))
        out.apply(sched.pop_events())
        check_quota(sched)
        check_invariants(sched, blocks)
        if plan is None:
            assert sched.num_unfinished == 0
            break
        if admitted_b_at is None and 99 in plan.seq_ids:
            admitted_b_at = step
        out.apply(sched.postprocess(plan, runner.step(plan)))
    assert admitted_b_at == 3, "b waited behind a's quota"
    for sid, spec in [*enumerate(flood), (99, late)]:
        assert (out.outputs.get(sid, []), out.reasons[sid]) == alone_under_quota(spec, sched.config)
    assert blocks.num_free == 256


def test_stats_count_each_clients_blocks() -> None:
    sched, _, _ = make(64, cached=True, block_tokens=2, max_blocks_per_client=8)
    for sid in range(3):  # three choices of one prompt share its full blocks
        sched.add(Spec((1, 2, 3, 4, 5), 4, tenant="a").make(sid))
    sched.add(Spec((6, 7, 8), 4, tenant="b").make(3))
    plan = sched.schedule(0.0)
    assert plan is not None
    held = held_by_client(sched)
    assert sched.stats().num_kv_blocks_by_client == {c: len(b) for c, b in held.items()}


@settings(max_examples=150)
@given(data=st.data())
def test_quotas_hold_under_random_workloads_and_change_no_output(data: st.DataObject) -> None:
    max_context = data.draw(st.integers(4, 40), "max_context")
    block_tokens = data.draw(st.sampled_from([1, 2, 4]), "block_tokens")
    quota = data.draw(st.integers(1, 12), "max_blocks_per_client")
    cap = min(max_context, quota * block_tokens)
    n_specs = data.draw(st.integers(1, 10), "n_specs")
    workload = []
    for _ in range(n_specs):
        n = data.draw(st.integers(1, max_context - 1))
        prompt = tuple(data.draw(st.lists(st.integers(1, VOCAB - 1), min_size=n, max_size=n)))
        client = data.draw(st.sampled_from([None, "a", "b"]))
        workload.append(Spec(prompt, data.draw(st.integers(1, 24)), priority=data.draw(st.integers(-1, 2)),
                             tenant=client))
    num_blocks = data.draw(st.integers(quota, 3 * quota + 2), "num_blocks")
    cached = data.draw(st.booleans(), "cached")
    blocks = CachedBlocks(range(num_blocks)) if cached else FreeListBlocks(range(num_blocks))
    config = SchedulerConfig(
        max_context=max_context, vocab_size=VOCAB, block_tokens=block_tokens, max_blocks_per_client=quota,
        token_budget=data.draw(st.integers(1, 32), "token_budget"),
        max_batch_size=data.draw(st.integers(1, 8), "max_batch_size"),
        policy=data.draw(st.sampled_from(["fcfs", "priority", "rr", "fair"]), "policy"),
        quantum=data.draw(st.integers(1, 4), "quantum"), decode_steps=data.draw(st.integers(1, 4), "decode_steps"),
    )
    sched = Scheduler(config, blocks)
    added = []
    for sid, spec in enumerate(workload):
        if len(spec.prompt_ids) >= cap:
            with pytest.raises(QuotaExceeded):
                sched.add(spec.make(sid))
        else:
            sched.add(spec.make(sid))
            added.append(sid)
    rng = random.Random(data.draw(st.integers(0, 2**32), "rng_seed"))
    runner = FakeRunner(num_blocks, block_tokens)
    out = Outcome()
    for _ in range(20_000):  # drive, checking the quota after every schedule and reply
        while len(sched.steps_in_flight) < 2:
            plan = sched.schedule(0.0)
            out.apply(sched.pop_events())
            check_quota(sched)
            if plan is None:
                break
        flying = list(sched.steps_in_flight)
        if not flying:
            break
        plan = rng.choice(flying)
        out.apply(sched.postprocess(plan, runner.step(plan)))
        check_quota(sched)
        check_invariants(sched, blocks)
    assert sched.num_unfinished == 0, f"stuck: {sched.running} {sched.waiting}"
    assert sorted(out.reasons) == added
    for sid in added:
        assert (out.outputs.get(sid, []), out.reasons[sid]) == alone_under_quota(workload[sid], config)
    assert blocks.num_free == num_blocks
    event(f"preempted: {sched.stats().num_preemptions > 0}")
    event(f"refused: {len(added) < len(workload)}")
