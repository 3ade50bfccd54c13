"""Prefix caching in the scheduler: CachedBlocks' reference counts, names and LRU, and the
Scheduler reusing a computed prefix (n choices of one prompt, a shared system prompt, a
preempted sequence coming back) with outputs unchanged, with the fake runner and the real
model."""

from __future__ import annotations

import pytest

from llmos.libllm.blockhash import ROOT_HASH, block_name
from llmos.servers.runner.model import Model
from llmos.servers.scheduler import CachedBlocks, Sampling, Scheduler, SchedulerConfig, Sequence
from tests.servers.scheduler.fakes import Outcome, Spec, alone, drive, make
from tests.servers.scheduler.test_with_model import serve

# ---------------------------------------------------------------------------- CachedBlocks


def test_a_named_block_outlives_its_holders_and_is_matched_again() -> None:
    blocks = CachedBlocks(range(4))
    a, b = blocks.allocate(2)
    h1 = block_name(ROOT_HASH, [1, 2])
    h2 = block_name(h1, [3, 4])
    assert blocks.publish(a, h1) and blocks.publish(b, h2)
    blocks.free([a, b])
    assert (blocks.num_free, blocks.num_cached, blocks.num_used) == (4, 2, 0)
    assert blocks.match([h1, h2, block_name(h2, [5, 6])]) == [a, b]  # the longest cached run
    assert blocks.match([h1]) == [a]  # a second holder
    assert blocks.refcount(a) == 2 and blocks.refcount(b) == 1
    blocks.free([a])
    assert blocks.refcount(a) == 1 and blocks.num_cached == 0


def test_match_stops_at_the_first_missing_block() -> None:
    blocks = CachedBlocks(range(4))
    (a,) = blocks.allocate(1)
    h1 = block_name(ROOT_HASH, [1])
    blocks.publish(a, block_name(h1, [2]))  # a second block, without its first
    assert blocks.match([h1, block_name(h1, [2])]) == []


def test_allocate_recycles_the_least_recently_used_cached_block() -> None:
    blocks = CachedBlocks(range(3))
    ids = blocks.allocate(3)
    names = [block_name(ROOT_HASH, [i]) for i in range(3)]
    for block_id, name in zip(ids, names, strict=True):
        blocks.publish(block_id, name)
    blocks.free([ids[1]])
    blocks.free([ids[0]])
    blocks.free([ids[2]])  # idle order, oldest first: 1, 0, 2
    assert blocks.allocate(2) == [ids[1], ids[0]]
    assert blocks.num_evictions == 2
    assert blocks.match([names[1]]) == [] and blocks.match([names[2]]) == [ids[2]]


def test_a_name_belongs_to_one_block_and_a_block_to_one_name() -> None:
    blocks = CachedBlocks(range(2))
    a, b = blocks.allocate(2)
    name = block_name(ROOT_HASH, [7])
    assert blocks.publish(a, name)
    assert not blocks.publish(b, name)  # the same prefix computed twice: the first name wins
    assert not blocks.publish(a, block_name(ROOT_HASH, [8]))
    blocks.free([a, b])
    assert blocks.num_cached == 1  # b had no name: free again, its KV forgotten


def test_freeing_what_is_not_held_changes_nothing() -> None:
    blocks = CachedBlocks(range(2))
    (a,) = blocks.allocate(1)
    with pytest.raises(ValueError, match="not allocated"):
        blocks.free([a, 1])
    with pytest.raises(ValueError, match="more often"):
        blocks.free([a, a])
    assert blocks.refcount(a) == 1 and blocks.num_free == 1
    with pytest.raises(ValueError, match="not held"):
        blocks.publish(1, block_name(ROOT_HASH, [1]))


# ----------------------------------------------------------------------------- Scheduler

PROMPT = tuple(range(1, 42))  # 41 tokens: 10 full blocks of 4, the last token apart


def test_n_choices_of_one_prompt_compute_its_blocks_once() -> None:
    sched, blocks, runner = make(cached=True, block_tokens=4, max_batch_size=8)
    specs = [Spec(PROMPT, 6, Sampling(temperature=1.0, seed=s)) for s in range(4)]
    for sid, spec in enumerate(specs):
        sched.add(spec.make(sid))
    out = drive(sched, blocks, runner)
    for sid, spec in enumerate(specs):
        assert (out.outputs[sid], out.reasons[sid]) == alone(spec, 128)
    assert len({tuple(o) for o in out.outputs.values()}) > 1  # they diverge by seed
    stats = sched.stats()
    # The first computes the 40 positions of full blocks; the others wait one step for them
    # and compute only their last prompt token.
    assert stats.num_prompt_tokens == len(PROMPT) + 3
    assert (stats.num_prefix_lookup_tokens, stats.num_prefix_hit_tokens) == (4 * 40, 3 * 40)
    assert stats.prefix_hit_rate == pytest.approx(0.75)
    assert blocks.num_free == blocks.num_total


def test_a_later_request_reuses_a_finished_ones_blocks() -> None:
    sched, blocks, runner = make(cached=True, block_tokens=4)
    system = Spec(PROMPT, 3)
    sched.add(system.make(0))
    drive(sched, blocks, runner)
    follow = Spec((*PROMPT, 50, 51, 52, 53, 54), 5)
    sched.add(follow.make(1))
    out = drive(sched, blocks, runner)
    assert (out.outputs[1], out.reasons[1]) == alone(follow, 128)
    assert sched.stats().num_prefix_hit_tokens == 40


def test_without_prefix_caching_nothing_is_shared() -> None:
    sched, blocks, runner = make(cached=True, block_tokens=4, prefix_cache=False)
    for sid in range(3):
        sched.add(Spec(PROMPT, 2).make(sid))
    drive(sched, blocks, runner)
    stats = sched.stats()
    assert stats.num_prompt_tokens == 3 * len(PROMPT) and stats.num_prefix_lookup_tokens == 0


def test_a_preempted_sequence_comes_back_on_its_cached_blocks() -> None:
    # 23 blocks of 4: both prompts fit (11 + 10 blocks), their outputs do not, so the later
    # one is preempted and recomputes, mostly from the blocks it had named.
    sched, blocks, runner = make(23, cached=True, block_tokens=4, token_budget=128)
    first = Spec(PROMPT, 20, Sampling(temperature=1.0, seed=0))  # makes all 20 (no stop id)
    second = Spec(tuple(range(63, 23, -1)), 20)
    sched.add(first.make(0))
    sched.add(second.make(1))
    out = drive(sched, blocks, runner)
    assert (out.outputs[0], out.reasons[0]) == alone(first, 128)
    assert (out.outputs[1], out.reasons[1]) == alone(second, 128)
    stats = sched.stats()
    assert stats.num_preemptions >= 1
    assert stats.num_reused_tokens > 0  # what the victim had computed was not all lost
    assert stats.num_prefix_hit_tokens == 0  # H counts prompts as they first arrive: none shared here


def test_a_cancelled_leader_does_not_hold_its_followers() -> None:
    sched, blocks, runner = make(cached=True, block_tokens=4, token_budget=8)
    for sid in range(3):
        sched.add(Spec(PROMPT, 4, Sampling(temperature=1.0, seed=sid)).make(sid))
    plan = sched.schedule(0.0)  # the leader's first 8 prompt positions; the others wait
    assert plan is not None and plan.seq_ids == (0,)
    sched.cancel(0)
    out = Outcome()
    out.apply(sched.postprocess(plan, runner.step(plan)))
    drive(sched, blocks, runner, outcome=out)
    for sid in (1, 2):
        assert out.outputs[sid] == alone(Spec(PROMPT, 4, Sampling(temperature=1.0, seed=sid)), 128)[0]


def test_the_real_model_gives_the_same_tokens_from_shared_blocks() -> None:
    model = Model.load()
    bs = model.block_tokens
    prefix = [1, *range(300, 300 + 3 * bs)]  # BOS + three full blocks of a "system prompt"
    prompts = [[*prefix, 400 + i, 401 + i] for i in range(3)] + [prefix[:-1]]
    samplings = [Sampling(temperature=0.9, seed=7 + i) for i in range(len(prompts))]
    config = SchedulerConfig(max_context=model.config.seq_len, vocab_size=model.config.vocab_size,
                             block_tokens=bs, decode_steps=4)
    num_blocks = 64
    blocks = CachedBlocks(range(num_blocks))
    sched = Scheduler(config, blocks)
    for sid, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        sched.add(Sequence(sid, prompt, max_tokens=20, sampling=sampling, stop_ids={1, 2}))
    shared = serve(model, sched, num_blocks)
    assert sched.stats().num_prefix_hit_tokens >= 2 * 3 * bs
    for sid, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        solo = Scheduler(config, CachedBlocks(range(num_blocks)))
        solo.add(Sequence(0, prompt, max_tokens=20, sampling=sampling, stop_ids={1, 2}))
        assert shared[sid] == serve(model, solo, num_blocks)[0], f"prompt {sid} differs"


def test_paged_fragmentation_counts_a_shared_block_once() -> None:
    sched, _, runner = make(cached=True, block_tokens=4, max_batch_size=8)
    for sid in range(2):
        sched.add(Spec(PROMPT, 8, Sampling(temperature=1.0, seed=sid)).make(sid))
    for _ in range(2):  # the first computes the prompt; then it decodes while the second joins
        plan = sched.schedule(0.0)
        assert plan is not None
        sched.postprocess(plan, runner.step(plan))
    stats = sched.stats()
    # Ten shared full blocks, then a block each: the first's holds positions 40-41, the second's 40.
    assert (stats.num_kv_blocks_held, stats.num_kv_slots_filled) == (12, 43)
    assert stats.paged_fragmentation == pytest.approx(5 / 48)
