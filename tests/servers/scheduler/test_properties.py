"""Random workloads against the scheduler with the fake runner: whatever the arrivals,
budget, pool size, runners in flight, completion order, cancels, deadlines, lost steps and
prefix caching (prompts often share a prefix), every sequence's output equals (or, when cut
short, begins) its output alone, no step writes a shared block, and every block comes back."""

from __future__ import annotations

import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from llmos.servers.scheduler import (
    CachedBlocks,
    FreeListBlocks,
    Sampling,
    Scheduler,
    SchedulerConfig,
)
from tests.servers.scheduler.fakes import (
    VOCAB,
    Blocks,
    FakeRunner,
    Outcome,
    Spec,
    alone,
    check_invariants,
    check_plan,
    check_writes_own_blocks,
    drive,
)

# Prompts often begin with one of these, so prefix caching has something to share.
SHARED_PREFIXES = ((), (5, 9, 2, 7, 7, 1, 3, 8), (5, 9, 2, 7, 11, 12))


def pool(cached: bool, num_blocks: int) -> Blocks:
    return CachedBlocks(range(num_blocks)) if cached else FreeListBlocks(range(num_blocks))


@st.composite
def specs(draw: st.DrawFn, max_context: int) -> Spec:
    n = draw(st.integers(1, min(20, max_context - 1)))
    prefix = draw(st.sampled_from(SHARED_PREFIXES))[: n - 1]
    rest = n - len(prefix)
    prompt = prefix + tuple(draw(st.lists(st.integers(1, VOCAB - 1), min_size=rest, max_size=rest)))
    sampling = draw(
        st.one_of(
            st.just(Sampling()),
            st.builds(Sampling, temperature=st.just(1.0), seed=st.integers(0, 2**64)),
        )
    )
    deadline = draw(st.floats(0, 300)) if draw(st.integers(0, 9)) == 0 else None
    priority, tenant = draw(st.integers(-1, 2)), draw(st.sampled_from([None, "a", "b"]))
    return Spec(prompt, draw(st.integers(1, 24)), sampling, deadline, priority, tenant)


POLICY = st.sampled_from(["fcfs", "priority", "rr", "fair"])


def positions_computed(spec: Spec, max_context: int) -> int:
    return min(len(spec.prompt_ids) + spec.max_tokens - 1, max_context - 1)


@settings(max_examples=150)
@given(data=st.data())
def test_random_workloads(data: st.DataObject) -> None:
    max_context = data.draw(st.integers(4, 48), "max_context")
    block_tokens = data.draw(st.sampled_from([1, 2, 3, 4, 16]), "block_tokens")
    workload = data.draw(st.lists(specs(max_context), min_size=1, max_size=12), "specs")
    max_need = max(-(-positions_computed(s, max_context) // block_tokens) for s in workload)
    num_blocks = data.draw(st.integers(max_need, 2 * max_need + 2), "num_blocks")
    config = SchedulerConfig(
        max_context=max_context,
        vocab_size=VOCAB,
        decode_steps=1,
        block_tokens=block_tokens,
        token_budget=data.draw(st.integers(1, 40), "token_budget"),
        max_batch_size=data.draw(st.integers(1, 8), "max_batch_size"),
        max_running=data.draw(st.one_of(st.none(), st.integers(1, 10)), "max_running"),
        policy=data.draw(POLICY, "policy"),
        aging_steps=data.draw(st.integers(1, 8), "aging_steps"),
        quantum=data.draw(st.integers(1, 6), "quantum"),
        tenant_weights={"a": 1.0, "b": 3.0},
    )
    num_runners = data.draw(st.integers(1, 3), "num_runners")
    rng = random.Random(data.draw(st.integers(0, 2**32), "rng_seed"))
    blocks = pool(data.draw(st.booleans(), "cached"), num_blocks)
    sched = Scheduler(config, blocks)
    runner = FakeRunner(num_blocks, block_tokens)
    out = Outcome()
    cancelled: set[int] = set()
    now = 0.0
    next_id = 0
    for _ in range(400):
        now += 1.0
        r = rng.random()
        if next_id < len(workload) and r < 0.3:
            sched.add(workload[next_id].make(next_id))
            next_id += 1
        elif r < 0.31 and next_id:
            sid = rng.randrange(next_id)
            if sched.cancel(sid):
                cancelled.add(sid)
        elif r < 0.36 and next_id:
            sched.pause(rng.randrange(next_id))  # a client not reading
        elif r < 0.45 and next_id:
            sched.resume(rng.randrange(next_id))
        out.apply(sched.pop_events())
        while len(sched.steps_in_flight) < num_runners:
            plan = sched.schedule(now)
            out.apply(sched.pop_events())
            if plan is None:
                break
            check_plan(plan, config)
            check_writes_own_blocks(plan, blocks, block_tokens)
        check_invariants(sched, blocks)
        flying = list(sched.steps_in_flight)
        if flying and rng.random() < 0.8:
            plan = rng.choice(flying)
            if rng.random() < 0.1:
                runner.scribble(plan)
                sched.requeue(plan)
                out.apply(sched.pop_events())
            else:
                out.apply(sched.postprocess(plan, runner.step(plan)))
            check_invariants(sched, blocks)
    for sid in range(next_id, len(workload)):
        sched.add(workload[sid].make(sid))
    for sid in range(len(workload)):
        sched.resume(sid)
    drive(sched, blocks, runner, num_runners=num_runners, rng=rng, now=now, outcome=out)

    assert sorted(out.reasons) == list(range(len(workload)))
    for sid, spec in enumerate(workload):
        expected, reason = alone(spec, max_context)
        got = out.outputs.get(sid, [])
        if out.reasons[sid] in ("cancelled", "deadline"):
            assert out.reasons[sid] != "cancelled" or sid in cancelled
            assert got == expected[: len(got)]
        else:
            assert (got, out.reasons[sid]) == (expected, reason)
    assert blocks.num_free == num_blocks
    st_ = sched.stats()
    event(f"preempted: {st_.num_preemptions > 0}")
    event(f"yielded: {st_.num_yields > 0}")
    event(f"requeued: {st_.num_steps_requeued > 0}")
    event(f"reasons: {sorted(set(out.reasons.values()))}")
    assert st_.num_finished == len(workload) and st_.num_steps_in_flight == 0


@settings(max_examples=100)
@given(data=st.data())
def test_block_pressure_never_changes_an_output(data: st.DataObject) -> None:
    max_context = 48
    block_tokens = data.draw(st.sampled_from([1, 2, 4]), "block_tokens")
    workload = data.draw(st.lists(specs(max_context), min_size=3, max_size=12), "specs")
    workload = [  # no deadlines
        Spec(s.prompt_ids, s.max_tokens, s.sampling, None, s.priority, s.tenant) for s in workload
    ]
    max_need = max(-(-positions_computed(s, max_context) // block_tokens) for s in workload)
    num_blocks = data.draw(st.integers(max_need, max_need + 3), "num_blocks")
    config = SchedulerConfig(
        max_context=max_context,
        vocab_size=VOCAB,
        decode_steps=1,
        block_tokens=block_tokens,
        token_budget=data.draw(st.integers(1, 32), "token_budget"),
        max_batch_size=data.draw(st.integers(1, 12), "max_batch_size"),
        max_running=data.draw(st.sampled_from([3, 12]), "max_running"),
        policy=data.draw(POLICY, "policy"),
        quantum=data.draw(st.integers(1, 4), "quantum"),
    )
    blocks = pool(data.draw(st.booleans(), "cached"), num_blocks)
    sched = Scheduler(config, blocks)
    for sid, spec in enumerate(workload):
        sched.add(spec.make(sid))
    rng = random.Random(data.draw(st.integers(0, 2**32), "rng_seed"))
    num_runners = data.draw(st.integers(1, 3), "num_runners")
    out = drive(sched, blocks, FakeRunner(num_blocks, block_tokens), num_runners=num_runners, rng=rng)
    for sid, spec in enumerate(workload):
        assert (out.outputs.get(sid, []), out.reasons[sid]) == alone(spec, max_context)
    assert blocks.num_free == num_blocks
    event(f"{config.policy} preempted: {sched.stats().num_preemptions > 0}")
    event(f"{config.policy} yielded: {sched.stats().num_yields > 0}")
    event(f"prefix hits: {sched.stats().num_prefix_hit_tokens > 0}")
