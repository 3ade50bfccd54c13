"""Prefix cache: chained hashes, sharing, hit rate, LRU eviction of unreferenced blocks."""

from __future__ import annotations

import hashlib
import struct

import pytest

from microkernel import InvalidRequest, QuotaExceeded
from servers.memory import (
    ROOT_HASH,
    BlockState,
    ClientQuota,
    MemoryManager,
    PrefixCache,
    QuotaConfig,
    block_hashes,
    chain_hash,
)
from tests.servers.memory.conftest import MakeMemory

OWNER, OTHER = 3, 4
BT = 4  # tokens per block in these tests


def compute(
    memory: MemoryManager, prompt: list[int], owner: int = OWNER, client: int = 0
) -> list[int]:
    """What a scheduler does for a new sequence: share the cached prefix, allocate and
    publish the rest of the full blocks, then give back the sequence's block table."""
    cache = memory.prefix
    found = cache.lookup(prompt, owner, client)
    num_full = len(prompt) // BT
    fresh = memory.blocks.allocate(-(-len(prompt) // BT) - len(found.block_ids), owner, client)
    parent = found.parent_hash
    for i, block_id in enumerate(fresh[: num_full - len(found.block_ids)]):
        start = (len(found.block_ids) + i) * BT
        parent = cache.publish(owner, block_id, parent, prompt[start : start + BT])
    return [*found.block_ids, *fresh]


def test_chain_hash_is_blake2b_over_parent_and_le_u32_tokens() -> None:
    parent = 0x0102030405060708090A0B0C0D0E0F10
    expected = hashlib.blake2b(
        parent.to_bytes(16, "little") + struct.pack("<4I", 1, 2, 70000, 2**32 - 1), digest_size=16
    ).digest()
    assert chain_hash(parent, [1, 2, 70000, 2**32 - 1]) == int.from_bytes(expected, "little")
    hashes = block_hashes(list(range(10)), 4)
    assert len(hashes) == 2  # the partial third block has no hash
    assert hashes == [chain_hash(ROOT_HASH, [0, 1, 2, 3]), chain_hash(hashes[0], [4, 5, 6, 7])]
    # Same tokens, other parent: another block.
    assert chain_hash(1, [0, 1, 2, 3]) != hashes[0]


@pytest.mark.parametrize("tokens", [[-1], [2**32], [1.5], "abc", [[1, 2]], [True]])
def test_bad_token_ids_are_refused(memory: MemoryManager, tokens: object) -> None:
    with pytest.raises(InvalidRequest, match="token ids"):
        memory.prefix.lookup(tokens, OWNER)  # type: ignore[arg-type]
    assert memory.prefix.stats().num_lookup_tokens == 0


def test_a_shared_prefix_is_served_from_the_cache(memory: MemoryManager) -> None:
    system = list(range(100, 108))  # two full blocks
    first = compute(memory, [*system, 1, 2, 3])
    second_prompt = [*system, 9, 9, 9, 9, 5]
    found = memory.prefix.match(second_prompt, OWNER)
    assert found.num_tokens == 8 and found.block_ids == tuple(first[:2])
    second = compute(memory, second_prompt)
    assert second[:2] == first[:2]
    assert [memory.blocks.refcount(b) for b in first[:2]] == [2, 2]
    stats = memory.prefix.stats()
    assert (stats.num_lookup_tokens, stats.num_hit_tokens) == (11 + 13, 8)
    assert stats.hit_rate == pytest.approx(8 / 24)
    # max_tokens keeps the last token for the model to compute.
    assert memory.prefix.match(second_prompt[:8], OWNER, max_tokens=7).num_tokens == 4


def test_unreferenced_blocks_stay_cached_until_evicted_lru_first(make_memory: MakeMemory) -> None:
    memory = make_memory(num_blocks=6)
    a, b, c = ([i] * BT for i in (1, 2, 3))
    blocks = {name: compute(memory, prompt) for name, prompt in (("a", a), ("b", b), ("c", c))}
    for name in ("b", "a", "c"):  # release order = LRU order: b oldest
        memory.blocks.free(OWNER, blocks[name])
    assert memory.blocks.num_cached == 3
    # A hit refreshes a: b, then c, then a.
    memory.blocks.free(OWNER, compute(memory, a))
    assert memory.blocks.allocate(4, OWNER) and memory.blocks.num_evictions == 1
    assert memory.prefix.match(b, OWNER).num_tokens == 0
    assert memory.prefix.match(c, OWNER).num_tokens == BT
    memory.blocks.allocate(1, OWNER)
    assert memory.prefix.match(c, OWNER).num_tokens == 0
    assert memory.prefix.match(a, OWNER).num_tokens == BT
    assert memory.prefix.stats().num_evictions == 2


def test_cached_blocks_are_shared_across_owners_but_used_ones_are_not(
    memory: MemoryManager,
) -> None:
    prompt = [7] * BT
    (block,) = compute(memory, prompt, owner=OWNER)
    assert memory.prefix.match(prompt, OTHER).num_tokens == 0  # used by another endpoint
    memory.blocks.free(OWNER, [block])
    assert memory.blocks.tables.blocks["state"][block] == BlockState.CACHED
    found = memory.prefix.lookup(prompt, OTHER, client_id=5)
    assert found.block_ids == (block,)
    assert memory.blocks.tables.blocks["owner"][block] == OTHER
    assert memory.blocks.num_client_blocks(5) == 1


def test_duplicate_content_is_published_once(memory: MemoryManager) -> None:
    cache: PrefixCache = memory.prefix
    x, y = memory.blocks.allocate(2, OWNER)
    h = cache.publish(OWNER, x, ROOT_HASH, [1, 2, 3, 4])
    assert cache.publish(OWNER, y, ROOT_HASH, [1, 2, 3, 4]) == h
    assert memory.blocks.cached_block_id(h) == x
    memory.blocks.free(OWNER, [x, y])
    assert (memory.blocks.num_cached, memory.blocks.num_free) == (1, 15)
    with pytest.raises(InvalidRequest, match="a full block has 4 tokens"):
        cache.publish(OWNER, 0, ROOT_HASH, [1, 2, 3])


def test_reviving_cached_blocks_counts_against_the_quota(make_memory: MakeMemory) -> None:
    memory = make_memory(quotas=QuotaConfig(per_client={5: ClientQuota(max_blocks=1)}))
    prompt = list(range(8))
    memory.blocks.free(OWNER, compute(memory, prompt))
    before = memory.blocks.snapshot()
    with pytest.raises(QuotaExceeded, match=r"client 5 .* limit of 1 blocks"):
        memory.prefix.lookup(prompt, OWNER, client_id=5)
    assert memory.blocks.snapshot() == before
    assert memory.prefix.stats().num_lookup_tokens == 8  # only the first, successful lookup
