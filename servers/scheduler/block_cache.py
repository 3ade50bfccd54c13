"""CachedBlocks: the scheduler's KV blocks with reference counts and a prefix index.

Runs in the scheduler process; pure (no I/O). A BlockSource (like FreeListBlocks) over the
memory server's lease, that also remembers which full blocks hold the KV of which token
prefix, named by the chained 128-bit hash of `libllm.blockhash`.
A block whose last holder lets go keeps its KV and its name and waits in an LRU list; it is
handed out again by `match` (a later request with the same prefix: a preempted sequence
coming back, the n choices of one prompt, a shared system prompt, a follow-up that repeats
a conversation) or, least recently used first, recycled by `allocate` when no block is
free. The cache lives and dies with the scheduler: after a scheduler restart, libllm's
resubmissions compute their prefixes again.

This is the instance's one prefix cache. Why here and not in the memory server: the
scheduler holds every KV block the runners write (its lease) and plans every step, so
looking a prompt up is a dict probe in its own loop instead of a round trip per admission,
and the blocks never change hands. The memory server keeps the pool itself: the lease, the
blocks clients allocate for themselves, segments, quotas on those, and reclamation. The
quota on generation's blocks is the scheduler's too (quotas.py).

A block held by more than one sequence is only ever read: sequences share full blocks below
the position where they start computing, and a step writes only at or above it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from llmos.servers.scheduler.blocks import FreeListBlocks


class CachedBlocks:
    """Free list + reference counts + hash -> block index with LRU recycling.

    ``num_free`` counts blocks `allocate` can hand out: free ones and cached ones no one
    holds. ``free`` drops one reference per id; ``match`` takes one per matched block.
    """

    __slots__ = ("_by_hash", "_free", "_hash_of", "_idle", "_refs", "num_evictions")

    def __init__(self, block_ids: Iterable[int] = ()) -> None:
        self._free = FreeListBlocks(block_ids)  # blocks with no KV worth keeping
        self._refs: dict[int, int] = {}  # held block -> number of holders
        self._hash_of: dict[int, int] = {}  # named block -> its prefix hash
        self._by_hash: dict[int, int] = {}  # prefix hash -> block
        self._idle: OrderedDict[int, None] = OrderedDict()  # named, unheld; oldest first
        self.num_evictions = 0  # named blocks recycled for new KV

    # ------------------------------------------------------------------ BlockSource
    @property
    def num_free(self) -> int:
        return self._free.num_free + len(self._idle)

    @property
    def num_cached(self) -> int:
        """Named blocks no one holds (reusable by `match`, recyclable by `allocate`)."""
        return len(self._idle)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_total(self) -> int:
        return self._free.num_total

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free} free")
        from_free = min(num_blocks, self._free.num_free)
        taken = self._free.allocate(from_free)
        for _ in range(num_blocks - from_free):
            block_id, _ = self._idle.popitem(last=False)  # the least recently used
            del self._by_hash[self._hash_of.pop(block_id)]
            self.num_evictions += 1
            taken.append(block_id)
        for block_id in taken:
            self._refs[block_id] = 1
        return taken

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is cached if named, else free.

        Raises:
            ValueError: a block that is not held (nothing is changed then).
        """
        bad = [b for b in block_ids if b not in self._refs]
        if bad:
            raise ValueError(f"freeing blocks that are not allocated: {bad}")
        counts: dict[int, int] = {}
        for b in block_ids:
            counts[b] = counts.get(b, 0) + 1
        if any(n > self._refs[b] for b, n in counts.items()):
            raise ValueError(f"freeing blocks more often than they are held: {block_ids}")
        unnamed = []
        # Last block first: the LRU then recycles a sequence's deepest blocks before its first
        # ones, which every longer match needs.
        for block_id, n in reversed(counts.items()):
            left = self._refs[block_id] - n
            if left:
                self._refs[block_id] = left
                continue
            del self._refs[block_id]
            if block_id in self._hash_of:
                self._idle[block_id] = None  # the most recently used end
            else:
                unnamed.append(block_id)
        if unnamed:
            self._free.free(unnamed[::-1])  # in table order again (see FreeListBlocks.free)

    def add(self, block_ids: Iterable[int]) -> None:
        """Take more blocks (a lease refill)."""
        self._free.add(block_ids)

    def take_free(self, num_blocks: int) -> list[int]:
        """Give up to ``num_blocks`` free blocks back (cached ones are kept)."""
        return self._free.take_free(num_blocks)

    # ------------------------------------------------------------------ prefixes
    def match(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached run of ``hashes`` from the first; each
        returned block gains a holder (give it back with `free`)."""
        found: list[int] = []
        for h in hashes:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        for block_id in found:
            if block_id in self._idle:
                del self._idle[block_id]
                self._refs[block_id] = 1
            else:
                self._refs[block_id] += 1
        return found

    def publish(self, block_id: int, prefix_hash: int) -> bool:
        """Name a held, full block by the hash of the prefix its KV holds. False (and no
        change) when another block already has that name or this one has another."""
        if block_id not in self._refs:
            raise ValueError(f"block {block_id} is not held")
        if prefix_hash in self._by_hash or block_id in self._hash_of:
            return False
        self._by_hash[prefix_hash] = block_id
        self._hash_of[block_id] = prefix_hash
        return True

    def refcount(self, block_id: int) -> int:
        """Holders of ``block_id`` (0 for a free or an idle cached block)."""
        return self._refs.get(block_id, 0)
