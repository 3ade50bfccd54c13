"""Quotas refuse without side effects; free_owner and sweep reclaim a gone endpoint's memory."""

from __future__ import annotations

import pytest

from llmos.microkernel import InvalidRequest, QuotaExceeded
from llmos.servers.memory import BlockState, ClientQuota, MemoryManager, QuotaConfig, Reclaimed
from tests.servers.memory.conftest import MakeMemory

KIB = 1024
SCHED, CLIENT_A, CLIENT_B = 2, 10, 11


@pytest.fixture
def memory(make_memory: MakeMemory) -> MemoryManager:
    quotas = QuotaConfig(
        default=ClientQuota(max_blocks=8, max_segment_bytes=8 * KIB),
        per_client={CLIENT_B: ClientQuota(max_blocks=2, max_segment_bytes=KIB)},
    )
    return make_memory(num_blocks=16, segment_bytes=32 * KIB, quotas=quotas)


def test_quota_config_is_checked_and_read_only() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        ClientQuota(max_blocks=-1)
    with pytest.raises(ValueError, match="per_client keys"):
        QuotaConfig(per_client={-1: ClientQuota()})
    config = QuotaConfig(per_client={1: ClientQuota(max_blocks=1)})
    with pytest.raises(TypeError):
        config.per_client[2] = ClientQuota()  # type: ignore[index]
    assert config.for_client(0).max_blocks is None  # the instance is never limited


def test_block_quota_refuses_and_leaves_others_alone(memory: MemoryManager) -> None:
    blocks = memory.blocks
    blocks.allocate(2, SCHED, CLIENT_B)
    before = blocks.snapshot()
    assert not blocks.can_allocate(1, CLIENT_B)
    with pytest.raises(
        QuotaExceeded,
        match="client 11 is over its KV block quota: 2 held \\+ 1 requested > limit of 2 blocks",
    ):
        blocks.allocate(1, SCHED, CLIENT_B)
    assert blocks.snapshot() == before
    assert blocks.can_allocate(8, CLIENT_A)
    blocks.allocate(8, SCHED, CLIENT_A)  # the default quota
    with pytest.raises(QuotaExceeded, match=r"client 10 .* limit of 8 blocks"):
        blocks.allocate(1, SCHED, CLIENT_A)
    blocks.allocate(3, SCHED)  # uncharged work of the instance: no limit


def test_freed_blocks_are_uncharged(memory: MemoryManager) -> None:
    blocks = memory.blocks
    ids = blocks.allocate(2, SCHED, CLIENT_B)
    assert not blocks.can_allocate(1, CLIENT_B)
    blocks.free(SCHED, ids[:1])
    assert blocks.num_client_blocks(CLIENT_B) == 1 and blocks.can_allocate(1, CLIENT_B)
    blocks.allocate(1, SCHED, CLIENT_B)


def test_a_lease_is_charged_to_nobody(memory: MemoryManager) -> None:
    blocks = memory.blocks
    blocks.lease(SCHED, 10)  # past every client's quota: a lease is not a client's
    assert blocks.snapshot().client_blocks == () and blocks.num_leased == 10
    assert blocks.can_allocate(2, CLIENT_B) and not blocks.can_allocate(7, CLIENT_A)  # 6 left


def test_segment_quota_refuses_and_leaves_others_alone(memory: MemoryManager) -> None:
    segments = memory.segments
    segments.allocate(1000, CLIENT_B, CLIENT_B)  # rounded to 1024: the whole quota
    before = segments.snapshot()
    with pytest.raises(
        QuotaExceeded,
        match="client 11 is over its segment quota: 1024 bytes held \\+ 64 requested > limit of 1024 bytes",
    ):
        segments.allocate(1, CLIENT_B, CLIENT_B)
    assert segments.snapshot() == before
    segments.allocate(8 * KIB, CLIENT_A, CLIENT_A)


def test_free_owner_frees_blocks_leases_and_segments(memory: MemoryManager) -> None:
    blocks, segments = memory.blocks, memory.segments
    blocks.allocate(3, SCHED, CLIENT_A)
    blocks.lease(SCHED, 2)
    theirs = blocks.allocate(1, 3, CLIENT_B)
    segments.allocate(KIB, SCHED)
    weights = segments.allocate(4 * KIB, 0)
    got = memory.free_owner(SCHED)
    assert got == Reclaimed((SCHED,), 5, 1, KIB)
    assert (blocks.num_free, blocks.num_used, blocks.num_leased) == (15, 1, 0)
    assert blocks.num_client_blocks(CLIENT_A) == 0 and blocks.num_client_blocks(CLIENT_B) == 1
    assert blocks.tables.blocks["state"][theirs[0]] == BlockState.USED
    assert blocks.tables.blocks["owner"][theirs[0]] == 3
    assert segments.resolve(weights, SCHED).size == 4 * KIB
    assert memory.free_owner(SCHED) == Reclaimed()
    with pytest.raises(InvalidRequest, match="owner 0 is the instance"):
        memory.free_owner(0)


def test_sweep_frees_what_no_live_endpoint_owns(memory: MemoryManager) -> None:
    for owner in (2, 3, 4):
        memory.blocks.allocate(1, owner)
        memory.segments.allocate(KIB, owner)
    memory.blocks.allocate(1, 0)
    memory.segments.allocate(KIB, 0)
    assert memory.owner_ids() == {2, 3, 4}
    got = memory.sweep([3, 99])
    assert got == Reclaimed((2, 4), 2, 2, 2 * KIB)
    assert memory.owner_ids() == {3}
    assert (
        memory.blocks.num_used == 2 and memory.segments.num_segments == 2
    )  # 3's and the instance's
    assert memory.sweep([3]) == Reclaimed()
    with pytest.raises(InvalidRequest, match="live endpoint id"):
        memory.sweep([-1])


def test_stats_report_everything(memory: MemoryManager) -> None:
    memory.blocks.allocate(2, SCHED)
    memory.blocks.lease(SCHED, 1)
    memory.segments.allocate(KIB, SCHED)
    stats = memory.stats()
    assert stats.external_fragmentation == 0.0
    assert (stats.blocks.num_used, stats.blocks.num_free, stats.blocks.num_leased) == (3, 13, 1)
    assert stats.segments.used_bytes == KIB
