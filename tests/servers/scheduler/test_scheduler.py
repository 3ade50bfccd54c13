"""Scheduler logic with a fake runner: order, budget, chunked prefill, preemption, cancel,
deadlines, requeue, reply checks and counters."""

from __future__ import annotations

import pytest

from llmos.servers.scheduler import (
    FinishEvent,
    Sampling,
    Scheduler,
    Sequence,
    TokenEvent,
)
from tests.servers.scheduler.fakes import (
    EMPTY,
    STOP_IDS,
    VOCAB,
    FakeRunner,
    Outcome,
    Spec,
    alone,
    check_invariants,
    drive,
    make,
    next_token,
)

MAX_CONTEXT = 128


def prompt(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple(1 + (i * 7 + salt * 13) % (VOCAB - 1) for i in range(n))


def no_stop_spec(n: int, max_tokens: int, salt: int = 0) -> Spec:
    """A spec whose output (greedy) has no stop token within max_tokens, found by salting."""
    for s in range(salt, salt + 1000):
        spec = Spec(prompt(n, s), max_tokens)
        _, reason = alone(spec, MAX_CONTEXT)
        if reason == "length":
            return spec
    raise AssertionError("no salt avoids the stop token")


def add_all(sched: Scheduler, specs: list[Spec]) -> None:
    for i, spec in enumerate(specs):
        sched.add(spec.make(i))


def test_one_sequence_matches_alone() -> None:
    sched, blocks, runner = make(block_tokens=4)
    spec = no_stop_spec(10, 20)
    add_all(sched, [spec])
    out = drive(sched, blocks, runner)
    assert (out.outputs[0], out.reasons[0]) == alone(spec, MAX_CONTEXT)
    assert blocks.num_free == blocks.num_total


def test_prefill_is_chunked_to_the_budget_and_covers_the_prompt_once_in_order() -> None:
    sched, blocks, runner = make(block_tokens=4, token_budget=8)
    spec = no_stop_spec(21, 3)
    add_all(sched, [spec])
    out = drive(sched, blocks, runner)
    assert out.chunks[0] == [(0, 8), (8, 16), (16, 21), (21, 22), (22, 23)]
    assert [c.wants_token for p in out.plans for c in p.chunks] == [False, False, True, True, True]
    assert out.outputs[0] == alone(spec, MAX_CONTEXT)[0]


def test_fcfs_admission_order_and_decodes_every_step() -> None:
    sched, blocks, runner = make(block_tokens=4, token_budget=10, max_batch_size=8)
    specs = [no_stop_spec(6, 8, salt=10 * i) for i in range(4)]
    add_all(sched, specs)
    out = drive(sched, blocks, runner)
    first_step = {
        sid: next(i for i, p in enumerate(out.plans) if sid in p.seq_ids) for sid in range(4)
    }
    assert sorted(first_step, key=lambda s: (first_step[s], s)) == [0, 1, 2, 3]
    # Once its prompt is done, a sequence is in every step until it finishes.
    for sid in range(4):
        steps = [i for i, p in enumerate(out.plans) if sid in p.seq_ids]
        assert steps == list(range(steps[0], steps[-1] + 1))
    for sid, spec in enumerate(specs):
        assert out.outputs[sid] == alone(spec, MAX_CONTEXT)[0]


def test_decodes_go_before_a_long_prefill() -> None:
    sched, _blocks, runner = make(block_tokens=4, token_budget=8)
    short, long = no_stop_spec(2, 30), no_stop_spec(60, 2, salt=3)
    add_all(sched, [short])
    plan = sched.schedule(0.0)
    assert plan is not None
    sched.postprocess(plan, runner.step(plan))
    sched.add(long.make(1))
    for _ in range(5):
        plan = sched.schedule(0.0)
        assert plan is not None
        assert plan.chunks[0].seq_id == 0 and plan.chunks[0].num_tokens == 1
        assert plan.chunks[1].seq_id == 1 and plan.chunks[1].num_tokens == 7
        sched.postprocess(plan, runner.step(plan))


def test_batch_size_and_running_limits() -> None:
    sched, blocks, runner = make(block_tokens=4, max_batch_size=3, max_running=4)
    add_all(sched, [no_stop_spec(3, 5, salt=i) for i in range(6)])
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seq_ids == (0, 1, 2)
    second = sched.schedule(0.0)  # a second runner: only what is not in flight
    assert second is not None and second.seq_ids == (3,)  # max_running: 4 admitted
    assert sched.schedule(0.0) is None
    out = Outcome()
    out.apply(sched.postprocess(second, runner.step(second)))
    out.apply(sched.postprocess(plan, runner.step(plan)))
    drive(sched, blocks, runner, outcome=out)
    assert len(out.reasons) == 6 and blocks.num_free == blocks.num_total


def test_stop_token_is_not_output() -> None:
    sched, blocks, _runner = make()
    sched.add(Sequence(0, [5], max_tokens=10, stop_ids=[9]))
    plan = sched.schedule(0.0)
    assert plan is not None
    events = sched.postprocess(plan, [9])
    assert events == [FinishEvent(0, "stop", 1, 0)]
    assert blocks.num_free == blocks.num_total and sched.num_unfinished == 0


def test_length_and_context_finish() -> None:
    sched, _blocks, _runner = make(max_context=6)
    sched.add(Sequence(0, [5, 6], max_tokens=2))
    sched.add(Sequence(1, [5, 6, 7], max_tokens=10))
    reasons = {}
    while sched.num_unfinished:
        plan = sched.schedule(0.0)
        assert plan is not None
        for e in sched.postprocess(plan, [3] * len(plan.chunks)):
            if isinstance(e, FinishEvent):
                reasons[e.seq_id] = (e.reason, e.num_output_tokens)
    assert reasons == {0: ("length", 2), 1: ("context", 3)}  # 3 + 3 = max_context


def test_preemption_under_block_pressure_keeps_every_token() -> None:
    specs = [no_stop_spec(5 + i, 12, salt=7 * i) for i in range(6)]
    sched, blocks, runner = make(num_blocks=12, block_tokens=2, token_budget=6, max_batch_size=6)
    add_all(sched, specs)
    out = drive(sched, blocks, runner)
    assert sched.stats().num_preemptions > 0
    for sid, spec in enumerate(specs):
        assert (out.outputs[sid], out.reasons[sid]) == alone(spec, MAX_CONTEXT)
    assert blocks.num_free == blocks.num_total
    # A preempted sequence recomputes prompt and output from position 0.
    restarted = [sid for sid, ranges in out.chunks.items() if [s for s, _ in ranges].count(0) > 1]
    assert restarted


def test_preemption_takes_the_latest_arrival_and_requeues_it_first() -> None:
    sched, blocks, _runner = make(num_blocks=3, block_tokens=2, token_budget=16)
    for i in range(3):
        sched.add(Sequence(i, [5, 6], max_tokens=10))
    plan = sched.schedule(0.0)  # each takes one block (2 prompt tokens)
    assert plan is not None and plan.seq_ids == (0, 1, 2)
    sched.postprocess(plan, [3, 3, 3])  # each now needs a second block for position 2
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seq_ids == (0,)  # 2 preempted for 0; 1 waits for 0's step
    assert [s.seq_id for s in sched.waiting] == [2]
    assert sched.get(2).output_ids == [3]  # type: ignore[union-attr]
    assert sched.stats().num_preemptions == 1
    check_invariants(sched, blocks)


def test_a_sequence_in_flight_is_never_preempted() -> None:
    sched, blocks, _runner = make(num_blocks=2, block_tokens=2, token_budget=16)
    sched.add(Sequence(0, [5, 6], max_tokens=10))
    sched.add(Sequence(1, [5, 6], max_tokens=10))
    plan = sched.schedule(0.0)
    assert plan is not None
    sched.postprocess(plan, [3, 3])
    later = sched.schedule(0.0)  # 0 needs a block: 1 is preempted
    assert later is not None and later.seq_ids == (0,)
    sched.add(Sequence(2, [5], max_tokens=10))
    assert sched.schedule(0.0) is None  # 1 and 2 wait; 0 is in flight and keeps its blocks
    assert sched.get(0).block_table and sched.get(0).is_in_flight  # type: ignore[union-attr]
    check_invariants(sched, blocks)


def test_cancel_waiting_running_and_in_flight_frees_every_block() -> None:
    sched, blocks, runner = make(block_tokens=2, max_running=2)
    for i in range(4):
        sched.add(Sequence(i, [5, 6, 7], max_tokens=10))
    assert sched.cancel(3) and sched.pop_events() == [FinishEvent(3, "cancelled", 3, 0)]
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seq_ids == (0, 1)
    assert sched.cancel(0)  # in flight: finishes when the reply comes
    assert not sched.cancel(0)  # already being cancelled
    assert sched.pop_events() == []
    events = sched.postprocess(plan, [3, 4])
    assert events == [FinishEvent(0, "cancelled", 3, 0), TokenEvent(1, 4, 0)]
    assert sched.cancel(1)  # running, not in flight: at once
    assert sched.pop_events() == [FinishEvent(1, "cancelled", 3, 1)]
    assert not sched.cancel(1) and not sched.cancel(99)
    out = drive(sched, blocks, runner)
    assert list(out.reasons) == [2]
    assert blocks.num_free == blocks.num_total


def test_deadlines_expire_waiting_and_running_sequences() -> None:
    sched, blocks, _runner = make(max_running=1)
    sched.add(Sequence(0, [5, 6], max_tokens=50, deadline=10.0))
    sched.add(Sequence(1, [5, 6], max_tokens=50, deadline=5.0))
    plan = sched.schedule(1.0)
    assert plan is not None and plan.seq_ids == (0,)
    assert sched.schedule(6.0) is None  # 1 expires waiting; 0 is in flight, not expired
    assert sched.pop_events() == [FinishEvent(1, "deadline", 2, 0)]
    sched.postprocess(plan, [3])
    assert sched.schedule(10.0) is None
    assert sched.pop_events() == [FinishEvent(0, "deadline", 2, 1)]
    assert blocks.num_free == blocks.num_total


def test_requeue_reruns_a_lost_step_from_unchanged_progress() -> None:
    specs = [no_stop_spec(9, 6, salt=i) for i in range(3)]
    sched, blocks, runner = make(block_tokens=4, token_budget=8)
    add_all(sched, specs)
    plan = sched.schedule(0.0)
    assert plan is not None
    runner.scribble(plan)  # the runner died mid-step
    sched.requeue(plan)
    with pytest.raises(ValueError, match="not in flight"):
        sched.requeue(plan)
    again = sched.schedule(0.0)
    assert again is not None and again.chunks[0].start_pos == 0
    sched.requeue(again)
    out = drive(sched, blocks, runner)
    for sid, spec in enumerate(specs):
        assert out.outputs[sid] == alone(spec, MAX_CONTEXT)[0]
    assert sched.stats().num_steps_requeued == 2


def test_requeue_finishes_a_cancelled_sequence() -> None:
    sched, blocks, _ = make()
    sched.add(Sequence(0, [5], max_tokens=3))
    plan = sched.schedule(0.0)
    assert plan is not None and sched.cancel(0)
    sched.requeue(plan)
    assert sched.pop_events() == [FinishEvent(0, "cancelled", 1, 0)]
    assert blocks.num_free == blocks.num_total


def test_a_bad_reply_changes_nothing() -> None:
    sched, _blocks, _runner = make()
    sched.add(Sequence(0, [5], max_tokens=3))
    sched.add(Sequence(1, [5], max_tokens=3))
    plan = sched.schedule(0.0)
    assert plan is not None
    for bad in ([3], [3, VOCAB], [3, -1], {0: 3}):
        with pytest.raises(ValueError):
            sched.postprocess(plan, bad)
    assert sched.get(0).num_computed == 0  # type: ignore[union-attr]
    assert sched.postprocess(plan, {0: 3, 1: 4}) == [TokenEvent(0, 3, 0), TokenEvent(1, 4, 0)]
    with pytest.raises(ValueError, match="not in flight"):
        sched.postprocess(plan, [3, 4])


def test_add_refuses_what_cannot_run() -> None:
    sched, _, _ = make(max_context=8)
    sched.add(Sequence(0, [5], max_tokens=3))
    with pytest.raises(ValueError, match="in use"):
        sched.add(Sequence(0, [5], max_tokens=3))
    with pytest.raises(ValueError, match="no room"):
        sched.add(Sequence(1, [5] * 8, max_tokens=3))
    with pytest.raises(ValueError, match="token ids"):
        sched.add(Sequence(2, [VOCAB], max_tokens=3))
    seq = Sequence(3, [5], max_tokens=3)
    sched.add(seq)
    with pytest.raises(ValueError, match="already given"):
        make()[0].add(seq)


def test_a_long_prompt_fits_a_small_pool_when_alone() -> None:
    """Chunks are cut to the blocks there are; the prompt is never refused for its length."""
    spec = no_stop_spec(40, 4)
    sched, blocks, runner = make(num_blocks=12, block_tokens=4, token_budget=64)
    add_all(sched, [spec])
    out = drive(sched, blocks, runner)
    assert out.outputs[0] == alone(spec, MAX_CONTEXT)[0]


def test_stalled_when_one_sequence_needs_more_blocks_than_the_pool() -> None:
    sched, blocks, _runner = make(num_blocks=2, block_tokens=2)
    sched.add(Sequence(0, [5, 6, 7, 8], max_tokens=10))
    plan = sched.schedule(0.0)
    assert plan is not None
    sched.postprocess(plan, [3])
    assert sched.schedule(0.0) is None and sched.is_stalled
    assert sched.cancel(0) and blocks.num_free == 2


def test_paused_sequences_are_left_out_and_passed() -> None:
    sched, blocks, runner = make(max_running=4)
    for i in range(3):
        sched.add(Sequence(i, [5, 6], max_tokens=5))
    out = Outcome()
    assert sched.pause(0) and not sched.pause(99)
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seq_ids == (1, 2)
    out.apply(sched.postprocess(plan, runner.step(plan)))
    assert sched.pause(1)
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seq_ids == (2,)
    out.apply(sched.postprocess(plan, runner.step(plan)))
    sched.pause(2)
    assert sched.schedule(0.0) is None and not sched.is_stalled
    assert sched.resume(0) and sched.resume(1) and sched.resume(2)
    drive(sched, blocks, runner, outcome=out)
    assert sorted(out.reasons) == [0, 1, 2]


def test_stats_count_tokens_steps_and_delays() -> None:
    sched, blocks, runner = make(block_tokens=4, token_budget=8, max_batch_size=2)
    specs = [no_stop_spec(6, 4, salt=i) for i in range(3)]
    add_all(sched, specs)
    out = drive(sched, blocks, runner)
    st = sched.stats()
    assert st.num_steps == len(out.plans) and st.num_finished == 3
    assert st.num_prompt_tokens == 18 and st.num_generated_tokens == 12
    assert st.num_computed_tokens == sum(p.num_tokens for p in out.plans)
    assert st.num_delayed_seqs == 3 and st.recent_delay_steps[0] == 0
    assert st.max_delay_steps == max(st.recent_delay_steps) > 0
    assert st.sum_delay_steps == sum(st.recent_delay_steps)
    assert (st.num_waiting, st.num_running, st.num_steps_in_flight) == (0, 0, 0)


def test_the_fake_token_function_reads_the_kv_pages() -> None:
    runner = FakeRunner(4, 2)
    runner.kv[0] = [5, 6]
    s = Sampling(temperature=1.0, seed=3)
    assert runner.read([0], 2) == [5, 6]
    assert next_token([5, 6], s, 2) != next_token([5, 6], s, 3)  # position is in the draw
    assert EMPTY not in STOP_IDS
