"""The allocators against a plain Python model, one hypothesis step at a time.

After every step: each block's state, owner and charged client match the model;
free + used = total; the free set and every client's charge match; segment extents tile
the region with no two free neighbours; and rebuilding from the arena's tables gives a
view identical to the live one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmos.microkernel import Arena, InvalidRequest, Overloaded, QuotaExceeded
from llmos.microkernel import layout as L
from llmos.servers.memory import (
    BlockState,
    ClientQuota,
    MemoryConfig,
    MemoryManager,
    QuotaConfig,
    SegmentHandle,
    arena_bytes,
    memory_regions,
)
from llmos.servers.memory.tables import SegmentState
from tests.conftest import unique_name

NUM_BLOCKS, BLOCK_BYTES, BLOCK_TOKENS = 10, 64, 2
SEGMENT_BYTES, MAX_SEGMENTS, ALIGN = 4096, 6, 64
OWNERS, CLIENTS = [1, 2, 3], [0, 1, 2]
LIMITED = 2
QUOTAS = QuotaConfig(per_client={LIMITED: ClientQuota(max_blocks=3, max_segment_bytes=1024)})
FREE, USED, LEASED = BlockState.FREE, BlockState.USED, BlockState.LEASED


@dataclass
class ModelBlock:
    state: BlockState = FREE
    owner: int = 0
    client: int = 0


@dataclass(frozen=True)
class ModelSegment:
    rounded: int
    owner: int
    client: int


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        regions = memory_regions(NUM_BLOCKS * BLOCK_BYTES, BLOCK_BYTES, SEGMENT_BYTES, MAX_SEGMENTS)
        self.arena = Arena.create(unique_name("memsm"), arena_bytes(regions), regions)
        config = MemoryConfig(BLOCK_BYTES, BLOCK_TOKENS, MAX_SEGMENTS, ALIGN, QUOTAS)
        self.memory = MemoryManager.format(self.arena, config)
        self.blocks = [ModelBlock() for _ in range(NUM_BLOCKS)]
        self.segments: dict[SegmentHandle, ModelSegment] = {}
        self.stale: list[SegmentHandle] = []

    def teardown(self) -> None:
        del self.memory
        self.arena.close()
        self.arena.unlink()

    # -- model helpers -----------------------------------------------------------------

    def ids_in(self, state: BlockState) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.state == state]

    def charged(self, client: int) -> int:
        return sum(1 for b in self.blocks if b.state == USED and b.client == client)

    def quota_ok(self, client: int, n: int) -> bool:
        return client != LIMITED or self.charged(client) + n <= 3

    def take(self, got: list[int], n: int) -> None:
        """Check that an allocation took `n` distinct free blocks."""
        assert len(set(got)) == len(got) == n
        assert set(got) <= set(self.ids_in(FREE))

    def expect_refusal(self, call: object, error: type[Exception]) -> None:
        before = (self.memory.blocks.snapshot(), self.memory.segments.snapshot())
        try:
            call()  # type: ignore[operator]
        except error:
            pass
        else:
            raise AssertionError(f"{error.__name__} expected")
        assert (self.memory.blocks.snapshot(), self.memory.segments.snapshot()) == before

    # -- block rules -------------------------------------------------------------------

    @rule(data=st.data(), owner=st.sampled_from(OWNERS), client=st.sampled_from(CLIENTS))
    def allocate(self, data: st.DataObject, owner: int, client: int) -> None:
        space = len(self.ids_in(FREE))
        # Up to one past the space left, so refusals are common.
        top = min(space + 1, NUM_BLOCKS)
        n = data.draw(st.integers(0, top) | st.integers(max(0, top - 2), top), label="n")
        if not self.quota_ok(client, n):
            self.expect_refusal(
                lambda: self.memory.blocks.allocate(n, owner, client), QuotaExceeded
            )
        elif n > space:
            self.expect_refusal(lambda: self.memory.blocks.allocate(n, owner, client), Overloaded)
        else:
            got = self.memory.blocks.allocate(n, owner, client)
            self.take(got, n)
            for block_id in got:
                self.blocks[block_id] = ModelBlock(USED, owner, client)

    @rule(n=st.integers(0, 4), owner=st.sampled_from(OWNERS))
    def lease(self, n: int, owner: int) -> None:
        if n > len(self.ids_in(FREE)):
            self.expect_refusal(lambda: self.memory.blocks.lease(owner, n), Overloaded)
            return
        got = self.memory.blocks.lease(owner, n)
        self.take(got, n)
        for block_id in got:
            self.blocks[block_id] = ModelBlock(LEASED, owner, 0)

    @precondition(lambda self: self.ids_in(USED))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.ids_in(USED)), min_size=1, max_size=3))
        if data.draw(st.booleans(), label="with a block that is not used"):
            ids.append(data.draw(st.integers(0, NUM_BLOCKS - 1)))
        owner = (
            self.blocks[ids[0]].owner
            if data.draw(st.booleans())
            else data.draw(st.sampled_from(OWNERS))
        )
        if len(set(ids)) != len(ids) or any(
            self.blocks[b].state != USED or self.blocks[b].owner != owner for b in ids
        ):
            self.expect_refusal(lambda: self.memory.blocks.free(owner, ids), InvalidRequest)
            return
        assert self.memory.blocks.free(owner, ids) == len(ids)
        for block_id in ids:
            self.blocks[block_id] = ModelBlock()

    @rule(data=st.data())
    def bad_block_request(self, data: st.DataObject) -> None:
        bad: Any = data.draw(st.sampled_from([-1, 2**40, True, 1.5, "1"]))
        self.expect_refusal(lambda: self.memory.blocks.free(1, [bad]), InvalidRequest)
        self.expect_refusal(lambda: self.memory.blocks.free(1, [NUM_BLOCKS]), InvalidRequest)
        self.expect_refusal(lambda: self.memory.blocks.allocate(bad, 1), InvalidRequest)
        self.expect_refusal(lambda: self.memory.blocks.allocate(NUM_BLOCKS + 1, 1), InvalidRequest)

    # -- segment rules -----------------------------------------------------------------

    @rule(
        size=st.integers(1, 2048),
        owner=st.sampled_from([0, *OWNERS]),
        client=st.sampled_from(CLIENTS),
    )
    def segment_allocate(self, size: int, owner: int, client: int) -> None:
        rounded = L.align_up(size, ALIGN)
        held = sum(s.rounded for s in self.segments.values() if s.client == client)
        if client == LIMITED and held + rounded > 1024:
            self.expect_refusal(
                lambda: self.memory.segments.allocate(size, owner, client), QuotaExceeded
            )
        elif (
            len(self.segments) == MAX_SEGMENTS
            or self.memory.segments.stats().largest_free < rounded
        ):
            self.expect_refusal(
                lambda: self.memory.segments.allocate(size, owner, client), Overloaded
            )
        else:
            handle = self.memory.segments.allocate(size, owner, client)
            assert handle not in self.segments and handle not in self.stale
            self.segments[handle] = ModelSegment(rounded, owner, client)

    @precondition(lambda self: self.segments)
    @rule(data=st.data())
    def segment_free(self, data: st.DataObject) -> None:
        handle = data.draw(
            st.sampled_from(sorted(self.segments, key=lambda h: (h.segment_id, h.generation)))
        )
        segment = self.segments[handle]
        owner = data.draw(st.sampled_from([segment.owner, *OWNERS]))
        if owner != segment.owner:
            self.expect_refusal(lambda: self.memory.segments.free(handle, owner), InvalidRequest)
            return
        assert self.memory.segments.free(handle, owner) == segment.rounded
        del self.segments[handle]
        self.stale.append(handle)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def stale_handle(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.stale))
        self.expect_refusal(lambda: self.memory.segments.resolve(handle, 1), InvalidRequest)

    # -- reclamation -------------------------------------------------------------------

    def model_free_owner(self, owner: int) -> tuple[int, int, int]:
        num_blocks = 0
        for block_id, block in enumerate(self.blocks):
            if block.owner == owner and block.state in (USED, LEASED):
                num_blocks += 1
                self.blocks[block_id] = ModelBlock()
        gone = [h for h, s in self.segments.items() if s.owner == owner]
        for handle in gone:
            self.stale.append(handle)
        freed = sum(self.segments.pop(h).rounded for h in gone)
        return num_blocks, len(gone), freed

    @rule(owner=st.sampled_from([0, *OWNERS]))
    def free_owner(self, owner: int) -> None:
        if owner == 0:
            self.expect_refusal(lambda: self.memory.free_owner(0), InvalidRequest)
            return
        got = self.memory.free_owner(owner)
        assert (got.num_blocks, got.num_segments, got.num_segment_bytes) == self.model_free_owner(
            owner
        )

    @rule(live=st.sets(st.sampled_from(OWNERS)))
    def sweep(self, live: set[int]) -> None:
        holders = {b.owner for b in self.blocks if b.state in (USED, LEASED)} | {
            s.owner for s in self.segments.values()
        }
        expected = [0, 0, 0]
        for owner in sorted(holders - live - {0}):
            for i, n in enumerate(self.model_free_owner(owner)):
                expected[i] += n
        got = self.memory.sweep(live)
        assert [got.num_blocks, got.num_segments, got.num_segment_bytes] == expected

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def blocks_match_the_model(self) -> None:
        table = self.memory.tables.blocks
        for block_id, block in enumerate(self.blocks):
            row = table[block_id]
            assert int(row["state"]) == block.state, block_id
            if block.state in (USED, LEASED):
                assert int(row["owner"]) == block.owner
                assert int(row["client"]) == block.client
        allocator = self.memory.blocks
        stats = allocator.stats()
        assert stats.num_free + stats.num_used == NUM_BLOCKS
        assert stats.num_free == len(self.ids_in(FREE))
        assert stats.num_leased == len(self.ids_in(LEASED))
        snap = allocator.snapshot()
        assert list(snap.free_ids) == self.ids_in(FREE)  # each free block listed once
        holders = {b.owner for b in self.blocks if b.state in (USED, LEASED)}
        assert allocator.owner_ids() == holders
        for client in CLIENTS[1:]:
            assert allocator.num_client_blocks(client) == self.charged(client)

    @invariant()
    def segments_tile_the_region(self) -> None:
        table = self.memory.tables.segments
        live = sorted(
            (int(r["offset"]), int(r["size"]), int(r["state"]))
            for r in table
            if r["state"] != SegmentState.UNUSED
        )
        end = 0
        for (offset, size, state), previous in zip(live, [None, *live], strict=False):
            assert offset == end and size > 0
            assert not (previous and previous[2] == state == SegmentState.FREE), (
                "two free neighbours"
            )
            end = offset + size
        assert end == SEGMENT_BYTES
        used = sorted(size for _, size, state in live if state == SegmentState.USED)
        assert used == sorted(s.rounded for s in self.segments.values())
        for handle, segment in self.segments.items():
            info = self.memory.segments.resolve(handle, segment.owner)
            assert (info.size, info.client_id) == (segment.rounded, segment.client)

    @invariant()
    def rebuild_gives_the_same_view(self) -> None:
        again = MemoryManager.attach(self.arena, QUOTAS)
        assert again.num_repairs == 0
        assert again.blocks.snapshot() == self.memory.blocks.snapshot()
        assert again.segments.snapshot() == self.memory.segments.snapshot()


MemoryMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40)
TestMemoryMachine = MemoryMachine.TestCase
