"""BlockAllocator: allocation, ownership, leases, validation, rebuild."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from llmos.microkernel import InvalidRequest, Overloaded
from llmos.servers.memory import BlockAllocator, BlockState, MemoryManager
from tests.servers.memory.conftest import MakeMemory

OWNER, OTHER = 7, 8


@pytest.fixture
def blocks(memory: MemoryManager) -> BlockAllocator:
    return memory.blocks


def test_allocate_hands_out_lowest_ids_and_free_returns_them(blocks: BlockAllocator) -> None:
    assert blocks.can_allocate(3)
    ids = blocks.allocate(3, OWNER, client_id=5)
    assert ids == [0, 1, 2]
    assert blocks.num_client_blocks(5) == 3
    assert (blocks.num_free, blocks.num_used) == (13, 3)
    table = blocks.tables.blocks
    assert table["state"][ids].tolist() == [BlockState.USED] * 3
    assert table["owner"][ids].tolist() == [OWNER] * 3 and table["client"][ids].tolist() == [5] * 3
    assert blocks.free(OWNER, ids) == 3
    assert blocks.num_free == 16 and blocks.num_client_blocks(5) == 0
    assert blocks.allocate(0, OWNER) == []


def test_generation_bumps_on_every_reallocation(blocks: BlockAllocator) -> None:
    (b,) = blocks.allocate(1, OWNER)
    first = blocks.generation(b)
    blocks.free(OWNER, [b])
    assert blocks.allocate(1, OWNER) == [b]  # the free list is LIFO: the same block again
    assert blocks.generation(b) == first + 1


def test_refused_allocation_changes_nothing(blocks: BlockAllocator) -> None:
    blocks.allocate(10, OWNER)
    before = blocks.snapshot()
    assert not blocks.can_allocate(7)
    with pytest.raises(Overloaded, match="out of KV blocks: 7 requested, 6 free of 16"):
        blocks.allocate(7, OWNER)
    assert blocks.snapshot() == before


def test_a_block_is_freed_once_by_its_owner(blocks: BlockAllocator) -> None:
    a, b = blocks.allocate(2, OWNER, client_id=5)
    with pytest.raises(InvalidRequest, match="must not repeat"):
        blocks.free(OWNER, [a, a])
    assert blocks.free(OWNER, [a]) == 1
    with pytest.raises(InvalidRequest, match="cannot free block 0: it is free, not used"):
        blocks.free(OWNER, [a])
    assert blocks.num_client_blocks(5) == 1 and blocks.tables.blocks["state"][b] == BlockState.USED


def test_leases(blocks: BlockAllocator) -> None:
    leased = blocks.lease(OWNER, 4)
    assert blocks.num_leased == 4 and blocks.num_used == 4 and blocks.num_free == 12
    table = blocks.tables.blocks
    assert set(table["state"][leased].tolist()) == {BlockState.LEASED}
    assert table["owner"][leased].tolist() == [OWNER] * 4 and not table["client"][leased].any()
    assert blocks.owner_ids() == {OWNER}
    with pytest.raises(InvalidRequest, match="it is leased, not used"):
        blocks.free(OWNER, leased[:1])  # a lease goes back only with its holder
    assert blocks.free_owner(OWNER) == 4
    assert blocks.num_leased == 0 and blocks.num_free == 16 and blocks.owner_ids() == set()


def test_stats_count_every_block_once(blocks: BlockAllocator) -> None:
    blocks.allocate(3, OWNER, client_id=5)
    blocks.lease(OTHER, 2)
    stats = blocks.stats()
    assert (stats.num_blocks, stats.num_free, stats.num_used, stats.num_leased) == (16, 11, 5, 2)


BAD_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("allocate", (-1, OWNER), "block count must be in"),
    ("allocate", (17, OWNER), "block count must be in"),
    ("allocate", (True, OWNER), "must be an integer"),
    ("allocate", (1.0, OWNER), "must be an integer"),
    ("allocate", (1, -1), "owner id must be in"),
    ("allocate", (1, 2**32), "owner id must be in"),
    ("allocate", (1, OWNER, "x"), "client id must be an integer"),
    ("free", (OWNER, [16]), "block id must be in"),
    ("free", (OWNER, "ab"), "sequence of integers"),
    ("free", (OWNER, [5]), "it is free, not used"),
    ("free", (OTHER, [0]), "endpoint 8 does not own it"),
    ("free", (OWNER, [0, 1, 99]), "block id must be in"),
    ("free", (OWNER, [0, 1, 0]), "must not repeat"),
    ("free", (OWNER, [1, 5]), "cannot free block 5: it is free"),
    ("lease", (OWNER, 17), "block count must be in"),
    ("lease", (-1, 1), "owner id must be in"),
    ("free_owner", (0,), "owner 0 is the instance"),
    ("generation", (-1,), "block id must be in"),
]


@pytest.mark.parametrize(
    ("method", "args", "message"), BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)]
)
def test_bad_input_is_refused_and_changes_nothing(
    blocks: BlockAllocator, method: str, args: tuple[Any, ...], message: str
) -> None:
    blocks.allocate(2, OWNER)
    before = blocks.snapshot()
    with pytest.raises(InvalidRequest, match=message):
        getattr(blocks, method)(*args)
    assert blocks.snapshot() == before


def test_numpy_integers_are_accepted(blocks: BlockAllocator) -> None:
    ids = blocks.allocate(np.int64(2), np.uint32(OWNER))
    assert blocks.free(OWNER, np.array(ids)) == 2


def test_rebuild_gives_the_same_view(memory: MemoryManager) -> None:
    blocks = memory.blocks
    ids = blocks.allocate(6, OWNER, client_id=4)
    blocks.lease(OTHER, 3)
    blocks.allocate(2, OTHER)  # uncharged: the instance's
    blocks.free(OWNER, [ids[3], ids[2], ids[5]])
    again = MemoryManager.attach(memory.tables.arena)
    assert again.num_repairs == 0
    assert again.blocks.snapshot() == blocks.snapshot()
    assert again.blocks.num_client_blocks(4) == 3 and again.blocks.num_leased == 3
    assert again.blocks.owner_ids() == {OWNER, OTHER}
    # After a rebuild the lowest free ids go first.
    assert again.blocks.allocate(3, OWNER) == sorted([ids[2], ids[3], ids[5]])


def test_rebuild_repairs_what_a_crash_leaves(memory: MemoryManager) -> None:
    blocks = memory.blocks
    a, b, c = blocks.allocate(3, OWNER, client_id=4)
    table = blocks.tables.blocks
    table["state"][a] = 77  # garbage
    table["state"][c] = 2**32 - 1
    again = MemoryManager.attach(memory.tables.arena)
    assert again.blocks.num_repairs == 2
    assert table["state"][[a, b, c]].tolist() == [BlockState.FREE, BlockState.USED, BlockState.FREE]
    assert again.blocks.num_free == 15 and again.blocks.num_client_blocks(4) == 1
    assert MemoryManager.attach(memory.tables.arena).num_repairs == 0


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_generation_wraps_at_u32(blocks: BlockAllocator, num_blocks: int) -> None:
    blocks.tables.blocks["generation"][:] = 2**32 - 1
    ids = blocks.allocate(num_blocks, OWNER)
    assert [blocks.generation(b) for b in ids] == [0] * num_blocks


def test_large_batches(make_memory: MakeMemory) -> None:
    blocks = make_memory(num_blocks=64).blocks
    ids = blocks.allocate(40, OWNER, client_id=3)
    before = blocks.snapshot()
    with pytest.raises(InvalidRequest, match="endpoint 8 does not own it"):
        blocks.free(OTHER, ids)
    with pytest.raises(InvalidRequest, match="cannot free block 40: it is free"):
        blocks.free(OWNER, [*ids[:39], 40])
    assert blocks.snapshot() == before
    assert blocks.free(OWNER, ids[::-1]) == 40
    assert blocks.num_free == 64 and blocks.num_client_blocks(3) == 0
    assert blocks.allocate(3, OWNER) == [0, 1, 2]  # the last freed go first
