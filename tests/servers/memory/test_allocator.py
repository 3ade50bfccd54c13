"""BlockAllocator: allocation, refcounts, copy-on-write, leases, validation, rebuild."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from microkernel import InvalidRequest, Overloaded
from servers.memory import BlockAllocator, BlockState, MemoryManager
from servers.memory.allocator import SMALL_BATCH
from servers.memory.tables import BLOCK_HASHED
from tests.servers.memory.conftest import MakeMemory

OWNER, OTHER = 7, 8


@pytest.fixture
def blocks(memory: MemoryManager) -> BlockAllocator:
    return memory.blocks


def test_allocate_hands_out_lowest_ids_and_free_returns_them(blocks: BlockAllocator) -> None:
    assert blocks.can_allocate(3)
    ids = blocks.allocate(3, OWNER, client_id=5)
    assert ids == [0, 1, 2]
    assert [blocks.refcount(b) for b in ids] == [1, 1, 1]
    assert blocks.num_client_blocks(5) == 3
    assert (blocks.num_free, blocks.num_used, blocks.num_cached) == (13, 3, 0)
    table = blocks.tables.blocks
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
    with pytest.raises(Overloaded, match="out of KV blocks: 7 requested, 6 free"):
        blocks.allocate(7, OWNER)
    assert blocks.snapshot() == before


def test_refcounts_share_and_free(blocks: BlockAllocator) -> None:
    (b,) = blocks.allocate(1, OWNER)
    blocks.share(OWNER, [b, b])
    assert blocks.refcount(b) == 3
    assert blocks.free(OWNER, [b, b]) == 0
    assert blocks.refcount(b) == 1
    with pytest.raises(InvalidRequest, match="cannot free block 0 2 times: it has 1 references"):
        blocks.free(OWNER, [b, b])
    assert blocks.free(OWNER, [b]) == 1
    assert blocks.refcount(b) == 0


def test_copy_on_write(blocks: BlockAllocator) -> None:
    (b,) = blocks.allocate(1, OWNER)
    assert blocks.can_write(b)
    assert blocks.cow(OWNER, b).copy_from is None
    blocks.share(OWNER, [b])
    assert not blocks.can_write(b)
    result = blocks.cow(OWNER, b, client_id=3)
    assert result.copy_from == b and result.block_id != b
    assert blocks.refcount(b) == 2  # the caller drops its reference once it has copied
    assert blocks.can_write(result.block_id)
    blocks.free(OWNER, [b])
    assert blocks.can_write(b)
    # A published block is immutable even when private.
    blocks.publish(OWNER, b, 12345)
    assert not blocks.can_write(b)
    assert blocks.cow(OWNER, b).copy_from == b


def test_leases(blocks: BlockAllocator) -> None:
    leased = blocks.lease(OWNER, 4)
    assert blocks.num_leased == 4 and blocks.num_used == 4 and blocks.num_free == 12
    assert set(blocks.tables.blocks["state"][leased].tolist()) == {BlockState.LEASED}
    with pytest.raises(InvalidRequest, match="endpoint 8 does not own it"):
        blocks.claim(OTHER, leased[:1])
    blocks.claim(OWNER, leased[:2], client_id=9)
    assert blocks.num_leased == 2 and blocks.num_client_blocks(9) == 2
    with pytest.raises(InvalidRequest, match="it is used, not leased"):
        blocks.return_lease(OWNER, leased[:1])
    blocks.return_lease(OWNER, leased[2:])
    assert blocks.num_leased == 0 and blocks.num_free == 14
    assert blocks.free(OWNER, leased[:2]) == 2


def test_fill_counts_give_internal_fragmentation(blocks: BlockAllocator) -> None:
    ids = blocks.allocate(2, OWNER)
    assert blocks.stats().internal_fragmentation == 1.0
    blocks.set_fill(OWNER, ids, [4, 1])  # 8 slots, 5 filled
    assert blocks.stats().internal_fragmentation == pytest.approx(3 / 8)
    with pytest.raises(InvalidRequest, match="fill count must be in"):
        blocks.set_fill(OWNER, ids, [5, 0])
    with pytest.raises(InvalidRequest, match="2 block ids but 1 fill counts"):
        blocks.set_fill(OWNER, ids, [1])


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
    ("share", (OTHER, [0]), "does not own it"),
    ("cow", (OWNER, 3), "it is free"),
    ("claim", (OWNER, [0]), "it is used, not leased"),
    ("claim", (OWNER, [1, 1]), "must not repeat"),
    ("return_lease", (OWNER, [2]), "not leased"),
    ("publish", (OWNER, 0, -5), "content hash must be in"),
    ("publish", (OWNER, 0, 2**128), "content hash must be in"),
    ("acquire", (OWNER, [0]), "not a cached block"),
    ("free_owner", (0,), "owner 0 is the instance"),
    ("can_write", (-1,), "block id must be in"),
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
    blocks.share(OWNER, ids[:2])
    blocks.publish(OWNER, ids[2], 111)
    blocks.publish(OWNER, ids[3], 222)
    blocks.free(OWNER, [ids[3], ids[2], ids[5]])  # two cached (222 older), one free
    blocks.lease(OTHER, 3)
    again = MemoryManager.attach(memory.tables.arena)
    assert again.num_repairs == 0
    assert again.blocks.snapshot() == blocks.snapshot()
    # LRU order survived: the 8 free blocks, then the cached ones, oldest release first.
    assert again.blocks.allocate(10, OWNER)[:2] == [ids[3], ids[2]]
    assert again.blocks.num_evictions == 2


def test_rebuild_repairs_what_a_crash_leaves(memory: MemoryManager) -> None:
    blocks = memory.blocks
    a, b, c, d = blocks.allocate(4, OWNER)
    table = blocks.tables.blocks
    table["refcount"][a] = 0  # used with no references: freed mid-operation
    table["refcount"][b] = 0
    table["flags"][b] = BLOCK_HASHED  # ... and hashed: goes to the cache
    table["hash_lo"][b] = 1
    table["state"][c] = 77  # garbage
    table["flags"][d] = BLOCK_HASHED  # a duplicate of b's hash: dropped
    table["hash_lo"][d] = 1
    again = MemoryManager.attach(memory.tables.arena)
    assert again.blocks.num_repairs == 4
    states = table["state"][[a, b, c, d]].tolist()
    assert states == [BlockState.FREE, BlockState.CACHED, BlockState.FREE, BlockState.USED]
    assert again.blocks.cached_block_id(1) == b and not table["flags"][d]
    assert MemoryManager.attach(memory.tables.arena).num_repairs == 0


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_generation_wraps_at_u32(blocks: BlockAllocator, num_blocks: int) -> None:
    blocks.tables.blocks["generation"][:] = 2**32 - 1
    ids = blocks.allocate(num_blocks, OWNER)
    assert [blocks.generation(b) for b in ids] == [0] * num_blocks


def test_large_batches_keep_the_release_order(make_memory: MakeMemory) -> None:
    blocks = make_memory(num_blocks=64).blocks
    ids = blocks.allocate(40, OWNER, client_id=3)  # past SMALL_BATCH: the vectorised path
    assert len(ids) > SMALL_BATCH
    for i, block_id in enumerate(ids[:30]):
        blocks.publish(OWNER, block_id, 1000 + i)
    blocks.share(OWNER, ids[:1])
    before = blocks.snapshot()
    with pytest.raises(InvalidRequest, match="cannot free block 0 3 times: it has 2 references"):
        blocks.free(OWNER, [*ids[1:], ids[0], ids[0], ids[0]])
    with pytest.raises(InvalidRequest, match="endpoint 8 does not own it"):
        blocks.free(OTHER, ids)
    assert blocks.snapshot() == before
    assert blocks.free(OWNER, ids[::-1]) == 39  # block 0 keeps a reference
    assert blocks.snapshot().lru_ids == tuple(ids[29:0:-1])  # hashed ones, in release order
    assert blocks.num_free == 64 - 1 - 29 and blocks.num_client_blocks(3) == 1
