"""Where the scheduler's KV blocks come from: the BlockSource protocol, and FreeListBlocks.

Runs in the scheduler process. In production the source is the lease of free blocks the
memory server grants (refilled asynchronously by the server loop); FreeListBlocks is a
plain free list that can hold such a lease, or stand in for it in tests. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class BlockSource(Protocol):
    """Query/act pair plus its inverse. ``allocate(n)`` is only called after
    ``can_allocate(n)`` said yes, so a refused allocation changes nothing."""

    def can_allocate(self, num_blocks: int) -> bool: ...

    def allocate(self, num_blocks: int) -> list[int]: ...

    def free(self, block_ids: list[int]) -> None: ...


class FreeListBlocks:
    """A LIFO free list of block ids: a memory-server lease, or a whole test pool.

    Checks ownership: freeing a block that is not out, or twice, raises ValueError (a
    double free would let two sequences write one block).
    """

    __slots__ = ("_free_ids", "_used_ids")

    def __init__(self, block_ids: Iterable[int] = ()) -> None:
        self._free_ids: list[int] = []
        self._used_ids: set[int] = set()
        self.add(block_ids)

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    @property
    def num_used(self) -> int:
        return len(self._used_ids)

    @property
    def num_total(self) -> int:
        return len(self._free_ids) + len(self._used_ids)

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free} free")
        if num_blocks == 0:
            return []
        taken = self._free_ids[-num_blocks:][::-1]
        del self._free_ids[-num_blocks:]
        self._used_ids.update(taken)
        return taken

    def free(self, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if b not in self._used_ids]
        if bad or len(set(block_ids)) != len(block_ids):
            raise ValueError(
                f"freeing blocks that are not allocated (or twice): {bad or block_ids}"
            )
        self._used_ids.difference_update(block_ids)
        # Reversed, so the next allocate hands back the same order: tables stay ascending.
        self._free_ids.extend(reversed(block_ids))

    def add(self, block_ids: Iterable[int]) -> None:
        """Take more blocks (a lease refill)."""
        new_ids = list(block_ids)
        known = set(self._free_ids) | self._used_ids
        if len(set(new_ids)) != len(new_ids) or known.intersection(new_ids):
            raise ValueError("a block id was added twice")
        self._free_ids.extend(reversed(new_ids))

    def take_free(self, num_blocks: int) -> list[int]:
        """Give up to ``num_blocks`` free blocks back (a lease returned to the memory server)."""
        num_blocks = min(max(num_blocks, 0), len(self._free_ids))
        if num_blocks == 0:
            return []
        given = self._free_ids[:num_blocks]
        del self._free_ids[:num_blocks]
        return given
