"""The scheduler package's small parts: config and sampling checks, Sequence token views,
FreeListBlocks ownership and the public names (tests/servers/test_isolation.py checks that
no server imports another)."""

from __future__ import annotations

from types import ModuleType

import pytest

from llmos import servers
from llmos.servers.scheduler import (
    ChunkPlan,
    Fair,
    Fcfs,
    FreeListBlocks,
    Priority,
    RoundRobin,
    Sampling,
    SchedulerConfig,
    Sequence,
    StepPlan,
    make_policy,
)
from llmos.servers.scheduler.plan import sampled_tokens
from llmos.servers.scheduler.settings import SchedulerSettings


@pytest.mark.parametrize(
    "bad",
    [
        {"max_context": 0},
        {"max_context": 1},
        {"vocab_size": -1},
        {"block_tokens": 0},
        {"max_batch_size": 0},
        {"token_budget": 0},
        {"max_running": 0},
        {"policy": "lifo"},
        {"block_tokens": True},
        {"aging_steps": 0},
        {"quantum": -1},
        {"default_weight": 0.0},
        {"tenant_weights": {"a": float("nan")}},
        {"tenant_weights": {"a": True}},
        {"max_blocks_per_client": 0},
        {"max_blocks_per_client": True},
    ],
)
def test_config_refuses_bad_limits(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**{"max_context": 64, "vocab_size": 32, **bad})  # type: ignore[arg-type]


def test_config_defaults() -> None:
    c = SchedulerConfig(max_context=64, vocab_size=32)
    assert (c.block_tokens, c.max_batch_size, c.token_budget, c.policy) == (16, 64, 512, "fcfs")
    assert c.max_running == c.num_running_limit == 64
    assert SchedulerConfig(max_context=64, vocab_size=32, max_running=3).num_running_limit == 3
    assert [c.blocks_needed(n) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert (c.aging_steps, c.quantum, dict(c.tenant_weights), c.default_weight) == (64, 16, {}, 1.0)
    # One set of defaults: what the instance config gives the scheduler process.
    settings = SchedulerSettings()
    assert (c.max_batch_size, c.token_budget, c.policy, c.decode_steps, c.aging_steps, c.quantum,
            c.prefix_cache) == (settings.max_batch_size, settings.token_budget, settings.policy,
                                  settings.decode_steps, settings.aging_steps, settings.quantum, settings.prefix_cache)
    assert c.max_blocks_per_client is None and c.max_tokens_per_seq == 64
    assert SchedulerConfig(max_context=64, vocab_size=32, max_blocks_per_client=3).max_tokens_per_seq == 48


def test_make_policy_builds_the_configured_policy() -> None:
    def config(**fields: object) -> SchedulerConfig:
        return SchedulerConfig(max_context=64, vocab_size=32, **fields)  # type: ignore[arg-type]

    assert isinstance(make_policy(config()), Fcfs)
    priority = make_policy(config(policy="priority", aging_steps=5))
    assert isinstance(priority, Priority) and priority.aging_steps == 5
    rr = make_policy(config(policy="rr", quantum=3))
    assert isinstance(rr, RoundRobin) and rr.quantum == 3
    fair = make_policy(config(policy="fair", tenant_weights={"a": 2}, default_weight=0.5))
    assert isinstance(fair, Fair) and (fair.weight("a"), fair.weight("b")) == (2, 0.5)
    weights = {"a": 1.0}
    frozen = config(tenant_weights=weights)
    weights["a"] = 5.0  # the config took a copy, read-only
    assert frozen.tenant_weights["a"] == 1.0
    with pytest.raises(TypeError):
        frozen.tenant_weights["a"] = 2.0  # type: ignore[index]


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"temperature": float("inf")}, {"top_k": -1}, {"top_p": 0.0}]
)
def test_sampling_refuses_bad_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Sampling(**bad)  # type: ignore[arg-type]


def test_sequence_checks_and_token_views() -> None:
    with pytest.raises(ValueError):
        Sequence(0, [], max_tokens=1)
    with pytest.raises(ValueError):
        Sequence(0, [1], max_tokens=0)
    seq = Sequence(0, [1, 2, 3], max_tokens=5)
    seq.output_ids += [4, 5]
    tokens = [1, 2, 3, 4, 5]
    for start in range(6):
        for stop in range(start, 6):
            assert seq.token_slice(start, stop) == tuple(tokens[start:stop])
    assert (seq.num_tokens, seq.num_remaining) == (5, 5)


def test_free_list_blocks_checks_ownership() -> None:
    blocks = FreeListBlocks(range(4))
    assert blocks.can_allocate(4) and not blocks.can_allocate(5) and not blocks.can_allocate(-1)
    taken = blocks.allocate(3)
    assert taken == [0, 1, 2] and blocks.num_used == 3
    with pytest.raises(ValueError):
        blocks.allocate(2)
    blocks.free([1])
    with pytest.raises(ValueError):
        blocks.free([1])  # twice
    with pytest.raises(ValueError):
        blocks.free([0, 0])
    with pytest.raises(ValueError):
        blocks.add([2])  # already known
    blocks.add([9])
    assert blocks.num_free == 3 and blocks.num_total == 5
    assert len(blocks.take_free(2)) == 2 and blocks.num_free == 1


def test_sampled_tokens_reads_lists_and_mappings() -> None:
    g = Sampling()
    plan = StepPlan(
        7,
        (ChunkPlan(1, (0,), 0, (5, 6), False, g), ChunkPlan(2, (1,), 0, (5,), True, g)),
    )
    assert sampled_tokens(plan, [-1, 3], 10) == [None, [3]]
    assert sampled_tokens(plan, {2: 4}, 10) == [None, [4]]
    assert sampled_tokens(plan, [-1, [4]], 10) == [None, [4]]
    for bad in ([3], [0, 10], {1: 3}, [-1, [4, 5]], [-1, []]):  # one step: one token
        with pytest.raises(ValueError):
            sampled_tokens(plan, bad, 10)
    multi = StepPlan(8, (ChunkPlan(3, (0, 1), 4, (5,), True, g, num_steps=3),))
    assert sampled_tokens(multi, [[1, 2, 3]], 10) == [[1, 2, 3]]
    with pytest.raises(ValueError):
        sampled_tokens(multi, [[1, 2, 3, 4]], 10)
    assert plan.num_tokens == 3 and plan.seq_ids == (1, 2) and plan.chunks[0].end_pos == 2


def test_public_names() -> None:
    """Every public name the package holds is exported, and nothing else (no submodule)."""
    public = {
        n
        for n, v in vars(servers.scheduler).items()
        if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    public -= {"annotations"}
    assert sorted(servers.scheduler.__all__) == sorted(public)
