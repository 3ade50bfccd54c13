"""The scheduling policies on a simulated clock (scheduler steps; no processes, no seconds):
priority order, the aging bound under a flood, round robin turns that keep their KV, the
fair-share bound for 1:4 demand and 1:2 weights, and the preemption victim each picks."""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable

import pytest

from llmos.servers.scheduler import Fair, Priority, Scheduler, Sequence, StepPlan, TokenEvent
from tests.servers.scheduler.fakes import (
    FakeRunner,
    Outcome,
    Spec,
    alone,
    check_invariants,
    check_plan,
    drive,
    make,
)
from tests.servers.scheduler.test_scheduler import MAX_CONTEXT, no_stop_spec


def step(sched: Scheduler, runner: FakeRunner, out: Outcome) -> StepPlan | None:
    """One step on the simulated clock: plan it, run it, apply the reply."""
    plan = sched.schedule(0.0)
    out.apply(sched.pop_events())
    if plan is None:
        return None
    check_plan(plan, sched.config)
    out.plans.append(plan)
    for c in plan.chunks:
        out.chunks.setdefault(c.seq_id, []).append((c.start_pos, c.end_pos))
    out.apply(sched.postprocess(plan, runner.step(plan)))
    check_invariants(sched, sched.blocks)  # type: ignore[arg-type]
    return plan


# ---------------------------------------------------------------------------- priority


def test_priority_goes_first_and_equal_priorities_in_arrival_order() -> None:
    sched, blocks, runner = make(policy="priority", aging_steps=1000, max_running=1)
    priorities = [0, 3, 1, 3, -2, 1]
    for sid, p in enumerate(priorities):
        sched.add(Spec((5,), 1, priority=p).make(sid))
    out = drive(sched, blocks, runner)
    assert [p.seq_ids for p in out.plans] == [(1,), (3,), (2,), (5,), (0,), (4,)]
    st = sched.stats()
    assert st.num_finished_by_priority == {-2: 1, 0: 1, 1: 2, 3: 2}
    assert st.delay_p50_steps_by_priority == {-2: 5, 0: 4, 1: 2, 3: 0}
    assert st.delay_p99_steps_by_priority == {-2: 5, 0: 4, 1: 3, 3: 1}


def test_aging_ranks_by_effective_priority() -> None:
    policy = Priority(aging_steps=4)
    old, new = Sequence(0, [5], max_tokens=1, priority=0), Sequence(1, [5], max_tokens=1, priority=2)
    old.arrival_step, old.arrival_order, new.arrival_step, new.arrival_order = 0, 0, 7, 1
    for now in (9, 20, 100):  # the order of effective priorities never changes while they wait
        assert policy.effective_priority(old, now) < policy.effective_priority(new, now)
        assert policy.rank(old) > policy.rank(new)
    new.arrival_step = 8  # now they tie, and the earlier arrival goes first
    assert policy.effective_priority(old, 50) == policy.effective_priority(new, 50)
    assert policy.rank(old) < policy.rank(new)


def flood(
    sched: Scheduler, runner: FakeRunner, *, per_step: int, top: int, low: Sequence, low_at: int,
    num_steps: int,
) -> list[Sequence]:
    """Each step ``per_step`` new requests of priority ``top`` (one token each) arrive, and
    ``low`` at step ``low_at``; run until ``low`` starts (or ``num_steps``). Returns every
    request, ``low`` included."""
    seqs: list[Sequence] = []
    out = Outcome()
    for t in range(num_steps):
        for _ in range(per_step):
            seqs.append(Spec((5,), 1, priority=top).make(1000 + len(seqs)))
            sched.add(seqs[-1])
        if t == low_at:
            seqs.append(low)
            sched.add(low)
        assert step(sched, runner, out) is not None
        if low.first_step != -1:
            break
    return seqs


@pytest.mark.parametrize(("p", "aging_steps"), [(0, 4), (2, 3), (-1, 2), (3, 5)])
def test_aging_serves_a_low_priority_request_under_a_flood_within_the_bound(
    p: int, aging_steps: int
) -> None:
    """A flood at P_max = 3 that fills every step (as many arrive as finish): the low one
    starts (P_max - p) * K steps after it arrived, plus one step's admission (at equal keys
    the earlier arrival goes first: the flood of its own step, for p = P_max)."""
    top, per_step = 3, 2
    sched, _, runner = make(
        policy="priority", aging_steps=aging_steps, max_running=per_step, max_batch_size=per_step
    )
    low = Sequence(0, [6], max_tokens=1, priority=p)
    flood(sched, runner, per_step=per_step, top=top, low=low, low_at=10, num_steps=500)
    delay = low.first_step - low.arrival_step
    assert low.first_step != -1
    assert (top - p) * aging_steps <= delay <= (top - p) * aging_steps + 1
    assert delay <= (top - p + 1) * aging_steps + 1
    assert sched.stats().delay_p99_steps_by_priority[p] == delay


def test_without_aging_the_flood_starves_the_low_priority_request() -> None:
    sched, _, runner = make(policy="priority", aging_steps=10**9, max_running=2, max_batch_size=2)
    low = Sequence(0, [6], max_tokens=1, priority=0)
    flood(sched, runner, per_step=2, top=3, low=low, low_at=10, num_steps=300)
    assert low.first_step == -1 and sched.stats().num_waiting_by_priority[0] == 1


def test_aging_bound_under_an_overloading_flood() -> None:
    """Three arrive per step, two fit: the flood backs up, yet the low request is passed only
    by requests queued before it or arriving within (P - p) * K steps after it."""
    top, p, k = 2, 0, 3
    sched, _, runner = make(policy="priority", aging_steps=k, max_running=2, max_batch_size=2)
    low = Sequence(0, [6], max_tokens=1, priority=p)
    seqs = flood(sched, runner, per_step=3, top=top, low=low, low_at=4, num_steps=500)
    assert low.first_step != -1
    before = [s for s in seqs if s.first_step != -1 and s.first_step < low.first_step]
    assert max(s.arrival_step for s in before) <= low.arrival_step + (top - p) * k
    assert any(s.arrival_step > low.arrival_step for s in before)  # priority did pass it
    assert sched.stats().num_waiting_by_priority[top] > 0  # the flood is backed up


def test_priority_preemption_takes_the_lowest_priority_and_loses_nothing() -> None:
    """A high-priority arrival into a full pool takes the blocks of the lowest-priority
    running sequence (not the latest arrival, as fcfs would); that one recomputes later
    and its output is what it is alone."""
    specs = [
        Spec(no_stop_spec(4, 6, salt=1).prompt_ids, 6, priority=0),
        Spec(no_stop_spec(4, 6, salt=2).prompt_ids, 6, priority=1),
        Spec(no_stop_spec(4, 6, salt=3).prompt_ids, 6, priority=5),
    ]
    sched, blocks, runner = make(num_blocks=6, block_tokens=2, policy="priority", aging_steps=1000)
    out = Outcome()
    sched.add(specs[0].make(0))
    sched.add(specs[1].make(1))
    for _ in range(2):  # prefill (2 blocks each), then a decode that takes a third each
        step(sched, runner, out)
    assert blocks.num_free == 0
    sched.add(specs[2].make(2))
    plan = step(sched, runner, out)
    assert plan is not None and plan.seq_ids == (2, 1)  # 0 gave its blocks to 2
    low = sched.get(0)
    assert low is not None and low in sched.waiting and low.num_preemptions == 1
    st = sched.stats()
    assert (st.num_preemptions, st.num_preempted_tokens) == (1, 5)
    drive(sched, blocks, runner, outcome=out)
    for sid, spec in enumerate(specs):
        assert (out.outputs[sid], out.reasons[sid]) == alone(spec, MAX_CONTEXT)
    assert [start for start, _ in out.chunks[0]].count(0) == 2  # recomputed once, in one chunk


# ---------------------------------------------------------------------------- round robin


@pytest.mark.parametrize(("num_blocks", "recomputes"), [(64, False), (9, True)])
def test_round_robin_interleaves_by_quantum_and_keeps_the_kv(
    num_blocks: int, recomputes: bool
) -> None:
    quantum = 3
    specs = [no_stop_spec(3, 10, salt=5 * i) for i in range(4)]
    sched, blocks, runner = make(
        num_blocks=num_blocks, block_tokens=2, policy="rr", quantum=quantum, max_running=2,
        max_batch_size=2,
    )
    for sid, spec in enumerate(specs):
        sched.add(spec.make(sid))
    out = drive(sched, blocks, runner)
    for sid, spec in enumerate(specs):
        assert (out.outputs[sid], out.reasons[sid]) == alone(spec, MAX_CONTEXT)
    # Turns: each stretch of consecutive steps makes at most a quantum of tokens (the first
    # one also its prompt), and everyone starts before anyone finishes.
    steps = {sid: [i for i, p in enumerate(out.plans) if sid in p.seq_ids] for sid in range(4)}
    for sid, taken in steps.items():
        stretches = [[taken[0]]]
        for i in taken[1:]:
            if i == stretches[-1][-1] + 1:
                stretches[-1].append(i)
            else:
                stretches.append([i])
        assert len(stretches) > 1 and all(len(s) <= quantum for s in stretches), sid
    assert max(s[0] for s in steps.values()) < min(s[-1] for s in steps.values())
    st = sched.stats()
    assert st.num_yields > 0
    # With room, a yielded sequence resumes where it stopped: its chunks never restart.
    restarted = any(
        [start for start, _ in ranges].count(0) > 1 for ranges in out.chunks.values()
    )
    assert restarted == recomputes == (st.num_preemptions > 0)


def test_round_robin_does_not_yield_when_nobody_waits() -> None:
    sched, blocks, runner = make(policy="rr", quantum=1, max_running=2)
    for sid in range(2):
        sched.add(no_stop_spec(3, 8, salt=sid).make(sid))
    drive(sched, blocks, runner)
    assert sched.stats().num_yields == 0


# ---------------------------------------------------------------------------- fair share


def service_trace(
    sched: Scheduler,
    runner: FakeRunner,
    arrivals: dict[Hashable, tuple[int, int, int]],
    num_arrival_steps: int,
    rng: random.Random,
) -> tuple[list[dict[Hashable, int]], int]:
    """Clients send requests (client -> (at step 0, then every ``period`` steps, ``count``));
    returns, after each step at which every client had a request waiting since step 0, the
    tokens each was served (prompt at its first step, then each output token), and the most
    tokens one request is charged."""
    served = dict.fromkeys(arrivals, 0)
    started: set[int] = set()
    client_of: dict[int, Hashable] = {}
    trace = []
    max_charge = 0
    for t in range(10 * num_arrival_steps):
        for client, (first, period, count) in arrivals.items():
            n = first if t == 0 else count if t % period == 0 and t < num_arrival_steps else 0
            for _ in range(n):
                spec = Spec(
                    tuple(rng.randrange(1, 64) for _ in range(rng.randrange(2, 7))),
                    rng.randrange(4, 11),
                    tenant=client,
                )
                max_charge = max(max_charge, len(spec.prompt_ids) + spec.max_tokens)
                sid = len(client_of)
                client_of[sid] = client
                sched.add(spec.make(sid))
        plan = sched.schedule(0.0)
        if plan is None:
            break
        for c in plan.chunks:
            if c.seq_id not in started:
                started.add(c.seq_id)
                served[client_of[c.seq_id]] += len(sched.get(c.seq_id).prompt_ids)  # type: ignore[union-attr]
        for e in sched.postprocess(plan, runner.step(plan)):
            if isinstance(e, TokenEvent):
                served[client_of[e.seq_id]] += 1
        waiting = {s.tenant for s in sched.waiting}
        if not all(client in waiting for client in arrivals):
            break  # the joint backlog is over
        trace.append(dict(served))
    return trace, max_charge


def weighted_gaps(trace: Iterable[dict[Hashable, int]], weights: dict[Hashable, float]) -> list[float]:
    a, b = weights
    return [served[a] / weights[a] - served[b] / weights[b] for served in trace]


@pytest.mark.parametrize(
    ("weights", "demand"),
    [({"a": 1.0, "b": 1.0}, (1, 4)), ({"a": 1.0, "b": 2.0}, (1, 1)), ({"a": 1.0, "b": 2.0}, (4, 1))],
)
def test_fair_share_bound_holds_whatever_the_request_rates(
    weights: dict[Hashable, float], demand: tuple[int, int]
) -> None:
    """Two clients, both backlogged from step 0: at every step their weighted services
    differ by at most D = max_running * (most tokens one request is charged) / min weight."""
    max_running = 4
    arrivals = {
        client: (6 * n, 2, n) for client, n in zip(weights, demand, strict=True)
    }  # 6n at step 0, then n every 2 steps: far beyond what 4 running can serve
    sched, _, runner = make(
        policy="fair", tenant_weights=weights, max_running=max_running, max_batch_size=max_running,
        block_tokens=4,
    )
    trace, max_charge = service_trace(sched, runner, arrivals, 120, random.Random(7))
    assert len(trace) > 100  # a long joint backlog
    bound = max_running * max_charge / min(weights.values())
    gaps = weighted_gaps(trace, weights)
    assert max(abs(g) for g in gaps) <= bound
    assert max(gaps) - min(gaps) <= 2 * bound  # any interval within: at most 2 D
    total = trace[-1]
    assert sum(total.values()) > 10 * bound  # the bound is small against what was served
    # The same demand under fcfs: the heavier sender takes the larger share, beyond D.
    sched, _, runner = make(max_running=max_running, max_batch_size=max_running, block_tokens=4)
    trace, _ = service_trace(sched, runner, arrivals, 120, random.Random(7))
    if demand[0] != demand[1] or weights["a"] != weights["b"]:
        assert max(abs(g) for g in weighted_gaps(trace, weights)) > bound


def test_fair_lifts_a_returning_client_and_prefers_the_least_served() -> None:
    fair = Fair({"b": 2.0})
    a0, a1, b0 = (Sequence(i, [5] * 4, max_tokens=8, tenant=c) for i, c in enumerate("aab"))
    for order, seq in enumerate((a0, a1, b0)):
        seq.arrival_order = order
        fair.on_arrival(seq)
    fair.on_admit(a0)  # charged its prompt: 4 tokens
    assert fair.rank(b0) < fair.rank(a1) and fair.counter("a") == 4.0
    fair.on_admit(b0)
    fair.on_tokens(b0, 6)  # 10 tokens at weight 2
    assert fair.counter("b") == 5.0 and fair.rank(a1) < fair.rank(b0)
    fair.on_finish(a0)
    fair.on_finish(a1)  # a is idle; it banks nothing
    fair.on_tokens(b0, 10)
    late = Sequence(3, [5], max_tokens=1, tenant="a")
    late.arrival_order = 3
    fair.on_arrival(late)
    assert fair.counter("a") == fair.counter("b") == 10.0
    alone_seq = Sequence(4, [5], max_tokens=1)  # no client id: a client of its own
    alone_seq.arrival_order = 4
    fair.on_arrival(alone_seq)
    assert fair.rank(alone_seq) == (10.0, 4)
    fair.on_finish(alone_seq)
    assert fair.client(alone_seq) not in fair._counters  # forgotten at once


def test_fair_preemption_takes_the_most_served_client() -> None:
    """Under memory pressure the victim is the latest request of the client with the most
    weighted service; its output is unchanged."""
    specs = [
        Spec(no_stop_spec(4, 8, salt=11).prompt_ids, 8, tenant="heavy"),
        Spec(no_stop_spec(4, 8, salt=12).prompt_ids, 8, tenant="heavy"),
        Spec(no_stop_spec(4, 8, salt=13).prompt_ids, 8, tenant="light"),
    ]
    sched, blocks, runner = make(num_blocks=7, block_tokens=2, policy="fair")
    out = Outcome()
    sched.add(specs[0].make(0))
    step(sched, runner, out)  # heavy is charged 4 + 1
    sched.add(specs[2].make(2))
    sched.add(specs[1].make(1))
    step(sched, runner, out)  # light (less served) first, then heavy's second: 7 blocks out
    assert blocks.num_free == 0
    step(sched, runner, out)  # each now needs a block: heavy's latest gives its blocks
    victim = sched.get(1)
    assert victim is not None and victim.num_preemptions == 1 and victim in sched.waiting
    assert all(s.num_preemptions == 0 for s in sched.running)
    drive(sched, blocks, runner, outcome=out)
    for sid, spec in enumerate(specs):
        assert (out.outputs[sid], out.reasons[sid]) == alone(spec, MAX_CONTEXT)
    assert sched.stats().num_finished_by_client == {"heavy": 2, "light": 1}  # a tenant's count, preempted or not


# ---------------------------------------------------------------------------- stats


def test_stats_count_queues_per_priority_and_client() -> None:
    sched, _, runner = make(policy="priority", max_running=1)
    for sid, (p, client) in enumerate([(1, "x"), (1, "y"), (0, "x"), (0, None)]):
        sched.add(Spec((5, 6), 3, priority=p, tenant=client).make(sid))
    step(sched, runner, Outcome())
    st = sched.stats()
    assert st.num_running_by_priority == {1: 1} and st.num_waiting_by_priority == {0: 2, 1: 1}
    assert st.num_running_by_client == {"x": 1}
    assert st.num_waiting_by_client == {"": 1, "x": 1, "y": 1}
    assert (st.delay_p50_steps, st.delay_p99_steps, st.num_waiting_with_kv) == (0, 0, 0)
