"""BlockAllocator: fixed-size KV blocks over the PAGES region, state in the arena's block table.

Runs inside the memory server. Owns each block's state, refcount, owner, charged client,
generation and content hash (in ALLOC_TABLES), plus derived in-process views (free list,
LRU of cached blocks, hash index) that `rebuild()` recomputes from the table alone. It
never touches page contents and never talks to a process: callers copy pages, servers send.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from microkernel.errors import InvalidRequest, Overloaded
from servers.memory._validate import U32_MAX, as_distinct_ids, as_endpoint_id, as_ids, as_in_range
from servers.memory.quotas import INSTANCE_ID, QuotaConfig
from servers.memory.tables import BLOCK_HASHED, BlockState, MemoryTables

FREE, USED, CACHED, LEASED = BlockState.FREE, BlockState.USED, BlockState.CACHED, BlockState.LEASED
HASH_MAX = (1 << 128) - 1
SMALL_BATCH = 24  # below this, per-element numpy scalar access beats building index arrays


@dataclass(slots=True, frozen=True)
class CowResult:
    """What `cow` decided. If `copy_from` is set, copy that page into `block_id`, then
    drop the reference to `copy_from` with `free` (it stays valid until then)."""

    block_id: int
    copy_from: int | None


@dataclass(slots=True, frozen=True)
class BlockStats:
    """num_free + num_used + num_cached == num_blocks; leased blocks count as used."""

    num_blocks: int
    num_free: int
    num_used: int
    num_cached: int
    num_leased: int
    num_evictions: int
    internal_fragmentation: float  # unfilled token slots / slots of used blocks


@dataclass(slots=True, frozen=True)
class BlockSnapshot:
    """Everything the allocator knows, in a canonical order: equal iff same state."""

    table: bytes
    free_ids: tuple[int, ...]
    lru_ids: tuple[int, ...]
    index: tuple[tuple[int, int], ...]
    client_blocks: tuple[tuple[int, int], ...]
    num_leased: int


class BlockAllocator:
    """The KV block pool. Each act (`allocate`, `lease`, ...) has a query (`can_*`);
    an act that raises has changed nothing."""

    def __init__(self, tables: MemoryTables, quotas: QuotaConfig | None = None) -> None:
        self.tables = tables
        self.quotas = quotas if quotas is not None else QuotaConfig()
        self.num_blocks = tables.geometry.num_blocks
        self.block_tokens = tables.geometry.block_tokens
        blocks = tables.blocks
        self._state = blocks["state"]
        self._flags = blocks["flags"]
        self._refcount = blocks["refcount"]
        self._owner = blocks["owner"]
        self._client = blocks["client"]
        self._generation = blocks["generation"]
        self._num_filled = blocks["num_filled"]
        self._last_used = blocks["last_used"]
        self._hash_lo = blocks["hash_lo"]
        self._hash_hi = blocks["hash_hi"]
        self.num_evictions = 0
        self.num_repairs = self.rebuild()

    # -- rebuild -----------------------------------------------------------------------

    def rebuild(self) -> int:
        """Recompute every in-process view from the block table; returns entries repaired.

        Repairs are what a memory server killed mid-operation can leave: a USED block with
        no references, a CACHED one with some, a hash on a free block, a duplicate hash.
        """
        state, refs, flags = self._state, self._refcount, self._flags
        fixes: list[np.ndarray[Any, Any]] = []
        fixes.append(np.flatnonzero(~np.isin(state, [int(s) for s in BlockState])))
        state[fixes[-1]] = FREE
        hashed = (flags & BLOCK_HASHED) != 0
        fixes.append(np.flatnonzero((state == USED) & (refs == 0)))
        state[fixes[-1]] = np.where(hashed[fixes[-1]], CACHED, FREE)
        fixes.append(np.flatnonzero((state == CACHED) & (refs != 0)))
        state[fixes[-1]] = USED
        idle = (state == FREE) | (state == LEASED)
        fixes.append(np.flatnonzero(idle & ((refs != 0) | hashed)))
        refs[fixes[-1]] = 0
        self._clear_hash(fixes[-1])
        self._index: dict[int, int] = {}
        for block_id in np.flatnonzero((flags & BLOCK_HASHED) != 0).tolist():
            content_hash = self._hash_of(block_id)
            if content_hash in self._index:  # two blocks claim one content: keep the first
                self._clear_hash(np.array([block_id]))
                if state[block_id] == CACHED:
                    state[block_id] = FREE
                fixes.append(np.array([block_id]))
            else:
                self._index[content_hash] = block_id
        # pop() takes from the end: lowest ids are handed out first after a rebuild.
        self._free: list[int] = np.flatnonzero(state == FREE)[::-1].tolist()
        cached = np.flatnonzero(state == CACHED)
        order = cached[np.argsort(self._last_used[cached], kind="stable")]
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(order.tolist())
        self._tick = int(self._last_used.max(initial=0)) + 1
        used = state == USED
        clients, counts = np.unique(self._client[used], return_counts=True)
        self._client_blocks: Counter[int] = Counter(
            {
                c: n
                for c, n in zip(clients.tolist(), counts.tolist(), strict=True)
                if c != INSTANCE_ID
            }
        )
        self._num_leased = int(np.count_nonzero(state == LEASED))
        return len(np.unique(np.concatenate(fixes)))

    # -- queries -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_leased(self) -> int:
        return self._num_leased

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    def num_client_blocks(self, client_id: int) -> int:
        return self._client_blocks[as_endpoint_id(client_id, "client id")]

    def can_allocate(self, num_blocks: int, client_id: int = INSTANCE_ID) -> bool:
        n = self._as_count(num_blocks)
        client = as_endpoint_id(client_id, "client id")
        return n <= self.num_free + self.num_cached and self.quotas.can_use_blocks(
            client, self._client_blocks[client], n
        )

    def can_write(self, block_id: int) -> bool:
        """True if the block is private and unhashed, so it may be written in place."""
        b = as_in_range(block_id, "block id", 0, self.num_blocks - 1)
        return bool(
            self._state[b] == USED and self._refcount[b] == 1 and not self._flags[b] & BLOCK_HASHED
        )

    def refcount(self, block_id: int) -> int:
        return int(self._refcount[as_in_range(block_id, "block id", 0, self.num_blocks - 1)])

    def generation(self, block_id: int) -> int:
        return int(self._generation[as_in_range(block_id, "block id", 0, self.num_blocks - 1)])

    def owner_ids(self) -> set[int]:
        """Endpoints holding a used or leased block."""
        held = (self._state == USED) | (self._state == LEASED)
        return set(np.unique(self._owner[held]).tolist())

    def cached_block_id(self, content_hash: int) -> int | None:
        return self._index.get(content_hash)

    def is_shareable(self, block_id: int, owner_id: int) -> bool:
        """A hashed block `owner_id` may take a reference to: unreferenced, or already its own."""
        state = self._state[block_id]
        if not self._flags[block_id] & BLOCK_HASHED:
            return False
        return bool(state == CACHED or (state == USED and self._owner[block_id] == owner_id))

    # -- allocation --------------------------------------------------------------------

    def allocate(self, num_blocks: int, owner_id: int, client_id: int = INSTANCE_ID) -> list[int]:
        """Take `num_blocks` private blocks (refcount 1), evicting cached ones LRU-first.

        Raises:
            InvalidRequest: a bad count or id. QuotaExceeded: over the client's block quota.
            Overloaded: not enough free or evictable blocks.
        """
        n = self._as_count(num_blocks)
        owner = as_endpoint_id(owner_id, "owner id")
        client = as_endpoint_id(client_id, "client id")
        self.quotas.check_blocks(client, self._client_blocks[client], n)
        self._check_space(n)
        ids = self._take(n)
        self._reset(ids, USED, owner, client, refcount=1)
        if client != INSTANCE_ID:
            self._client_blocks[client] += n
        return ids

    def free(self, owner_id: int, block_ids: Iterable[int]) -> int:
        """Drop one reference per id (an id may repeat); returns blocks left unreferenced,
        which become CACHED if hashed, FREE otherwise."""
        owner = as_endpoint_id(owner_id, "owner id")
        counts = Counter(as_ids(block_ids, "block id", self.num_blocks))
        if len(counts) <= SMALL_BATCH:
            return self._free_small(owner, counts)
        ids = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))  # caller's order
        times = np.fromiter(counts.values(), dtype=np.uint32, count=len(counts))
        refs = self._refcount[ids]
        bad = (self._state[ids] != USED) | (self._owner[ids] != owner) | (refs < times)
        if bad.any():
            block_id, n = int(ids[bad][0]), int(times[bad][0])
            self._check_owned(block_id, owner, USED, "free")
            raise InvalidRequest(
                f"cannot free block {block_id} {n} times: it has {int(refs[bad][0])} references"
            )
        refs -= times
        self._refcount[ids] = refs
        released = ids[refs == 0].tolist()
        self._release(released)
        return len(released)

    def _free_small(self, owner: int, counts: Counter[int]) -> int:
        for block_id, times in counts.items():
            self._check_owned(block_id, owner, USED, "free")
            if self._refcount[block_id] < times:
                raise InvalidRequest(
                    f"cannot free block {block_id} {times} times: it has {int(self._refcount[block_id])} references"
                )
        released = []
        for block_id, times in counts.items():
            left = int(self._refcount[block_id]) - times
            self._refcount[block_id] = left
            if left == 0:
                released.append(block_id)
        self._release(released)
        return len(released)

    def share(self, owner_id: int, block_ids: Iterable[int]) -> None:
        """Add one reference per id (a forked sequence now also points at these blocks)."""
        owner = as_endpoint_id(owner_id, "owner id")
        counts = Counter(as_ids(block_ids, "block id", self.num_blocks))
        for block_id, times in counts.items():
            self._check_owned(block_id, owner, USED, "share")
            if int(self._refcount[block_id]) + times > U32_MAX:
                raise InvalidRequest(f"block {block_id} cannot take {times} more references")
        for block_id, times in counts.items():
            self._refcount[block_id] += times

    def cow(self, owner_id: int, block_id: int, client_id: int = INSTANCE_ID) -> CowResult:
        """Copy-on-write: the block itself if the caller may write it, else a fresh copy target.

        Raises:
            InvalidRequest, QuotaExceeded, Overloaded: as `allocate`; nothing changes then.
        """
        owner = as_endpoint_id(owner_id, "owner id")
        b = as_in_range(block_id, "block id", 0, self.num_blocks - 1)
        self._check_owned(b, owner, USED, "write")
        if self.can_write(b):
            return CowResult(b, None)
        return CowResult(self.allocate(1, owner, client_id)[0], b)

    def set_fill(self, owner_id: int, block_ids: Sequence[int], num_filled: Sequence[int]) -> None:
        """Record how many token slots of each block hold data (for internal fragmentation)."""
        owner = as_endpoint_id(owner_id, "owner id")
        ids = as_ids(block_ids, "block id", self.num_blocks)
        if len(num_filled) != len(ids):
            raise InvalidRequest(f"{len(ids)} block ids but {len(num_filled)} fill counts")
        fills = [as_in_range(f, "fill count", 0, self.block_tokens) for f in num_filled]
        for block_id in ids:
            self._check_owned(block_id, owner, USED, "fill")
        self._num_filled[ids] = fills

    # -- leases ------------------------------------------------------------------------

    def lease(self, owner_id: int, num_blocks: int) -> list[int]:
        """Move `num_blocks` blocks to the lessee; they stay its own until claimed or returned."""
        n = self._as_count(num_blocks)
        owner = as_endpoint_id(owner_id, "owner id")
        self._check_space(n)
        ids = self._take(n)
        self._reset(ids, LEASED, owner, INSTANCE_ID, refcount=0)
        self._num_leased += n
        return ids

    def claim(self, owner_id: int, block_ids: Iterable[int], client_id: int = INSTANCE_ID) -> None:
        """Turn leased blocks into used ones (refcount 1), charged to `client_id`."""
        owner = as_endpoint_id(owner_id, "owner id")
        client = as_endpoint_id(client_id, "client id")
        ids = as_distinct_ids(block_ids, "block id", self.num_blocks)
        for block_id in ids:
            self._check_owned(block_id, owner, LEASED, "claim")
        self.quotas.check_blocks(client, self._client_blocks[client], len(ids))
        self._refcount[ids] = 1
        self._client[ids] = client
        self._state[ids] = USED
        self._num_leased -= len(ids)
        if client != INSTANCE_ID:
            self._client_blocks[client] += len(ids)

    def return_lease(self, owner_id: int, block_ids: Iterable[int]) -> None:
        owner = as_endpoint_id(owner_id, "owner id")
        ids = as_distinct_ids(block_ids, "block id", self.num_blocks)
        for block_id in ids:
            self._check_owned(block_id, owner, LEASED, "return")
        self._state[ids] = FREE
        self._free.extend(ids)
        self._num_leased -= len(ids)

    # -- prefix cache support (prefix_cache.py decides what to look up) -----------------

    def acquire(
        self, owner_id: int, block_ids: Iterable[int], client_id: int = INSTANCE_ID
    ) -> None:
        """Take a reference to each hashed block; cached ones come back to life charged to
        `client_id`. Only blocks `is_shareable` by the owner qualify."""
        owner = as_endpoint_id(owner_id, "owner id")
        client = as_endpoint_id(client_id, "client id")
        ids = as_distinct_ids(block_ids, "block id", self.num_blocks)
        for block_id in ids:
            if not self.is_shareable(block_id, owner):
                raise InvalidRequest(
                    f"block {block_id} is not a cached block endpoint {owner} may share"
                )
        revived = [b for b in ids if self._state[b] == CACHED]
        self.quotas.check_blocks(client, self._client_blocks[client], len(revived))
        for block_id in ids:
            if self._state[block_id] == USED:
                self._refcount[block_id] += 1
        for block_id in revived:
            del self._lru[block_id]
        self._refcount[revived] = 1
        self._owner[revived] = owner
        self._client[revived] = client
        self._state[revived] = USED
        if client != INSTANCE_ID:
            self._client_blocks[client] += len(revived)

    def publish(self, owner_id: int, block_id: int, content_hash: int) -> bool:
        """Give a full, computed block its content hash so later prompts can share it.

        Returns False (and leaves the block private) if another block already holds it.
        """
        owner = as_endpoint_id(owner_id, "owner id")
        b = as_in_range(block_id, "block id", 0, self.num_blocks - 1)
        content_hash = as_in_range(content_hash, "content hash", 0, HASH_MAX)
        self._check_owned(b, owner, USED, "publish")
        if self._flags[b] & BLOCK_HASHED:
            raise InvalidRequest(f"block {b} is already published")
        if content_hash in self._index:
            return False
        self._hash_lo[b] = content_hash & 0xFFFF_FFFF_FFFF_FFFF
        self._hash_hi[b] = content_hash >> 64
        self._num_filled[b] = self.block_tokens
        self._flags[b] |= BLOCK_HASHED
        self._index[content_hash] = b
        return True

    # -- reclamation -------------------------------------------------------------------

    def free_owner(self, owner_id: int) -> int:
        """Drop every block (used or leased) `owner_id` holds; returns how many.

        Raises:
            InvalidRequest: owner 0, the instance, is never reclaimed.
        """
        owner = as_endpoint_id(owner_id, "owner id")
        if owner == INSTANCE_ID:
            raise InvalidRequest("owner 0 is the instance: its blocks are never reclaimed")
        mine = self._owner == owner
        leased = np.flatnonzero(mine & (self._state == LEASED)).tolist()
        used = np.flatnonzero(mine & (self._state == USED)).tolist()
        self._state[leased] = FREE
        self._free.extend(leased)
        self._num_leased -= len(leased)
        self._refcount[used] = 0
        self._release(used)
        return len(leased) + len(used)

    # -- reports -----------------------------------------------------------------------

    def stats(self) -> BlockStats:
        used = self._state == USED
        num_slots = int(np.count_nonzero(used)) * self.block_tokens
        num_filled = int(np.minimum(self._num_filled[used], self.block_tokens).sum())
        return BlockStats(
            self.num_blocks,
            self.num_free,
            self.num_used,
            self.num_cached,
            self.num_leased,
            self.num_evictions,
            (num_slots - num_filled) / num_slots if num_slots else 0.0,
        )

    def snapshot(self) -> BlockSnapshot:
        return BlockSnapshot(
            self.tables.blocks.tobytes(),
            tuple(sorted(self._free)),
            tuple(self._lru),
            tuple(sorted(self._index.items())),
            tuple(sorted((c, n) for c, n in self._client_blocks.items() if n)),
            self._num_leased,
        )

    # -- internals ---------------------------------------------------------------------

    def _as_count(self, value: object) -> int:
        return as_in_range(value, "block count", 0, self.num_blocks)

    def _check_space(self, n: int) -> None:
        if n > self.num_free + self.num_cached:
            raise Overloaded(
                f"out of KV blocks: {n} requested, {self.num_free} free and {self.num_cached} "
                f"evictable of {self.num_blocks}"
            )

    def _check_owned(self, block_id: int, owner: int, state: BlockState, verb: str) -> None:
        actual = int(self._state[block_id])
        if actual != state:
            raise InvalidRequest(
                f"cannot {verb} block {block_id}: it is {BlockState(actual).name.lower()}, not {state.name.lower()}"
            )
        if self._owner[block_id] != owner:
            raise InvalidRequest(
                f"cannot {verb} block {block_id}: endpoint {owner} does not own it"
            )

    def _take(self, n: int) -> list[int]:
        if n == 0:
            return []
        if len(self._free) < n:
            self._evict(n - len(self._free))
        ids = self._free[-n:]
        del self._free[-n:]
        ids.reverse()
        return ids

    def _evict(self, n: int) -> None:
        victims = [self._lru.popitem(last=False)[0] for _ in range(n)]
        for block_id in victims:
            del self._index[self._hash_of(block_id)]
        self._clear_hash(np.array(victims, dtype=np.intp))
        self._state[victims] = FREE
        self._free.extend(reversed(victims))
        self.num_evictions += n

    def _reset(
        self, ids: list[int], state: BlockState, owner: int, client: int, refcount: int
    ) -> None:
        arr: Any = ids[0] if len(ids) == 1 else np.array(ids, dtype=np.intp)
        self._refcount[arr] = refcount
        self._owner[arr] = owner
        self._client[arr] = client
        if isinstance(arr, int):  # numpy scalar arithmetic would warn on the u32 wrap
            self._generation[arr] = (int(self._generation[arr]) + 1) & U32_MAX
        else:
            self._generation[arr] += 1  # u32 array arithmetic wraps silently, as wanted
        self._num_filled[arr] = 0
        self._last_used[arr] = 0
        self._flags[arr] = 0
        self._state[arr] = state  # last: a crash before this leaves the block FREE

    def _release(self, ids: list[int]) -> None:
        """Blocks whose refcount just reached 0, in release order: uncharge, then cache
        (hashed; the LRU order is this order) or free them."""
        if len(ids) <= SMALL_BATCH:
            self._release_small(ids)
            return
        for client, n in Counter(self._client[ids].tolist()).items():
            if client != INSTANCE_ID:
                self._client_blocks[client] -= n
                if not self._client_blocks[client]:
                    del self._client_blocks[client]
        hashed = (self._flags[ids] & BLOCK_HASHED) != 0
        arr = np.array(ids, dtype=np.intp)
        cached, freed = arr[hashed], arr[~hashed]
        self._last_used[cached] = np.arange(self._tick, self._tick + len(cached), dtype=np.uint64)
        self._tick += len(cached)
        self._state[cached] = CACHED
        self._state[freed] = FREE
        self._lru.update(dict.fromkeys(cached.tolist()))
        self._free.extend(freed.tolist())

    def _release_small(self, ids: list[int]) -> None:
        for block_id in ids:
            client = int(self._client[block_id])
            if client != INSTANCE_ID:
                self._client_blocks[client] -= 1
                if not self._client_blocks[client]:
                    del self._client_blocks[client]
            if self._flags[block_id] & BLOCK_HASHED:
                self._last_used[block_id] = self._tick
                self._tick += 1
                self._state[block_id] = CACHED
                self._lru[block_id] = None
            else:
                self._state[block_id] = FREE
                self._free.append(block_id)

    def _hash_of(self, block_id: int) -> int:
        return (int(self._hash_hi[block_id]) << 64) | int(self._hash_lo[block_id])

    def _clear_hash(self, ids: np.ndarray[Any, Any]) -> None:
        self._flags[ids] &= ~np.uint32(BLOCK_HASHED)
        self._hash_lo[ids] = 0
        self._hash_hi[ids] = 0
