"""BlockAllocator: fixed-size KV blocks over the PAGES region, state in the arena's block table.

Runs inside the memory server. Owns each block's state, owner, charged client and
generation (in ALLOC_TABLES), plus derived in-process views (free list, blocks charged per
client, lease count) that `rebuild()` recomputes from the table alone. A block has one
holder: the endpoint it was allocated or leased to. Sharing blocks between sequences and
caching prefixes happen inside the scheduler's lease (servers/scheduler/block_cache.py).
It never touches page contents and never talks to a process: callers copy pages, servers
send.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos.microkernel.errors import InvalidRequest, Overloaded
from llmos.servers.memory._validate import as_distinct_ids, as_endpoint_id, as_in_range
from llmos.servers.memory.quotas import INSTANCE_ID, QuotaConfig
from llmos.servers.memory.tables import BlockState, MemoryTables

FREE, USED, LEASED = BlockState.FREE, BlockState.USED, BlockState.LEASED


@dataclass(slots=True, frozen=True)
class BlockStats:
    """num_free + num_used == num_blocks; leased blocks count as used."""

    num_blocks: int
    num_free: int
    num_used: int
    num_leased: int


@dataclass(slots=True, frozen=True)
class BlockSnapshot:
    """Everything the allocator knows, in a canonical order: equal iff same state."""

    table: bytes
    free_ids: tuple[int, ...]
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
        self._owner = blocks["owner"]
        self._client = blocks["client"]
        self._generation = blocks["generation"]
        self.num_repairs = self.rebuild()

    # -- rebuild -----------------------------------------------------------------------

    def rebuild(self) -> int:
        """Recompute every in-process view from the block table; returns entries repaired.

        Every act writes a block's state last, so a memory server killed mid-operation
        leaves each entry either before or after it; what is repaired is a state that is
        no BlockState at all (a corrupt entry), which becomes FREE.
        """
        state = self._state
        bad = np.flatnonzero(~np.isin(state, [int(s) for s in BlockState]))
        state[bad] = FREE
        # pop() takes from the end: lowest ids are handed out first after a rebuild.
        self._free: list[int] = np.flatnonzero(state == FREE)[::-1].tolist()
        clients, counts = np.unique(self._client[state == USED], return_counts=True)
        self._client_blocks: Counter[int] = Counter(
            {
                c: n
                for c, n in zip(clients.tolist(), counts.tolist(), strict=True)
                if c != INSTANCE_ID
            }
        )
        self._num_leased = int(np.count_nonzero(state == LEASED))
        return len(bad)

    # -- queries -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_leased(self) -> int:
        return self._num_leased

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def num_client_blocks(self, client_id: int) -> int:
        return self._client_blocks[as_endpoint_id(client_id, "client id")]

    def can_allocate(self, num_blocks: int, client_id: int = INSTANCE_ID) -> bool:
        n = self._as_count(num_blocks)
        client = as_endpoint_id(client_id, "client id")
        return n <= self.num_free and self.quotas.can_use_blocks(
            client, self._client_blocks[client], n
        )

    def generation(self, block_id: int) -> int:
        return int(self._generation[as_in_range(block_id, "block id", 0, self.num_blocks - 1)])

    def owner_ids(self) -> set[int]:
        """Endpoints holding a used or leased block."""
        held = (self._state == USED) | (self._state == LEASED)
        return set(np.unique(self._owner[held]).tolist())

    # -- allocation --------------------------------------------------------------------

    def allocate(self, num_blocks: int, owner_id: int, client_id: int = INSTANCE_ID) -> list[int]:
        """Take `num_blocks` blocks for `owner_id`, charged to `client_id`'s quota.

        Raises:
            InvalidRequest: a bad count or id. QuotaExceeded: over the client's block quota.
            Overloaded: not enough free blocks.
        """
        n = self._as_count(num_blocks)
        owner = as_endpoint_id(owner_id, "owner id")
        client = as_endpoint_id(client_id, "client id")
        self.quotas.check_blocks(client, self._client_blocks[client], n)
        self._check_space(n)
        ids = self._take(n, USED, owner, client)
        if client != INSTANCE_ID:
            self._client_blocks[client] += n
        return ids

    def free(self, owner_id: int, block_ids: Iterable[int]) -> int:
        """Give back blocks `owner_id` allocated (each id once); returns how many."""
        owner = as_endpoint_id(owner_id, "owner id")
        ids = as_distinct_ids(block_ids, "block id", self.num_blocks)
        arr = np.array(ids, dtype=np.intp)
        bad = np.flatnonzero((self._state[arr] != USED) | (self._owner[arr] != owner))
        if bad.size:
            self._check_owned(ids[int(bad[0])], owner, USED, "free")
        self._uncharge(self._client[arr])
        self._state[arr] = FREE
        self._free.extend(ids)
        return len(ids)

    # -- leases ------------------------------------------------------------------------

    def lease(self, owner_id: int, num_blocks: int) -> list[int]:
        """Move `num_blocks` blocks to the lessee, charged to nobody; they are its own until
        it goes (`free_owner`)."""
        n = self._as_count(num_blocks)
        owner = as_endpoint_id(owner_id, "owner id")
        self._check_space(n)
        ids = self._take(n, LEASED, owner, INSTANCE_ID)
        self._num_leased += n
        return ids

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
        leased = np.flatnonzero(mine & (self._state == LEASED))
        used = np.flatnonzero(mine & (self._state == USED))
        self._uncharge(self._client[used])
        self._state[leased] = FREE
        self._state[used] = FREE
        self._free.extend(leased.tolist())
        self._free.extend(used.tolist())
        self._num_leased -= len(leased)
        return len(leased) + len(used)

    # -- reports -----------------------------------------------------------------------

    def stats(self) -> BlockStats:
        return BlockStats(self.num_blocks, self.num_free, self.num_used, self.num_leased)

    def snapshot(self) -> BlockSnapshot:
        return BlockSnapshot(
            self.tables.blocks.tobytes(),
            tuple(sorted(self._free)),
            tuple(sorted((c, n) for c, n in self._client_blocks.items() if n)),
            self._num_leased,
        )

    # -- internals ---------------------------------------------------------------------

    def _as_count(self, value: object) -> int:
        return as_in_range(value, "block count", 0, self.num_blocks)

    def _check_space(self, n: int) -> None:
        if n > self.num_free:
            raise Overloaded(
                f"out of KV blocks: {n} requested, {self.num_free} free of {self.num_blocks}"
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

    def _take(self, n: int, state: BlockState, owner: int, client: int) -> list[int]:
        """The `n` most recently freed blocks, now `state`, held by `owner` for `client`."""
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        ids.reverse()
        arr = np.array(ids, dtype=np.intp)
        self._owner[arr] = owner
        self._client[arr] = client
        self._generation[arr] += 1  # u32 array arithmetic wraps silently, as wanted
        self._state[arr] = state  # last: a crash before this leaves the block FREE
        return ids

    def _uncharge(self, clients: np.ndarray[Any, Any]) -> None:
        for client, n in Counter(clients.tolist()).items():
            if client != INSTANCE_ID:
                self._client_blocks[client] -= n
                if not self._client_blocks[client]:
                    del self._client_blocks[client]
