"""The kernel's bookkeeping of the arena's RINGS region: which carved blocks (doorbells,
control rings, channel rings) are free for reuse. Pure: the carving is passed in.

The region is carved by bump allocation and nothing carved goes back to it, so a freed block
is kept by its size and handed out again. A block of one size also serves a smaller need when
nothing else is left (a channel ring becomes a control ring for a new client), and returns to
its own size when freed: space that clients used and gave back is never lost to a size no one
asks for any more. `available` counts what is left, for limits that keep room for servers.
"""

from __future__ import annotations

from collections.abc import Callable

from llmos.microkernel.errors import ArenaError


class RingSpace:
    def __init__(self, carve: Callable[[int], int], uncarved: Callable[[], int]) -> None:
        self._carve = carve  # footprint -> offset; raises ArenaError when the region is full
        self._uncarved = uncarved  # bytes the region has not handed out yet
        self._free: dict[int, list[int]] = {}  # footprint -> free offsets
        self._footprint: dict[int, int] = {}  # every block handed out: offset -> its true footprint

    def take(self, footprint: int) -> int:
        """A block of at least `footprint` bytes: a freed one of that size, a new one, or
        else the smallest freed one that is larger.

        Raises:
            ArenaError: none is left.
        """
        free = self._free.get(footprint)
        if free:
            offset = free.pop()
        else:
            try:
                offset = self._carve(footprint)
            except ArenaError:
                larger = sorted(size for size, offsets in self._free.items() if size > footprint and offsets)
                if not larger:
                    raise
                offset = self._free[larger[0]].pop()
                footprint = larger[0]
        self._footprint[offset] = footprint
        return offset

    def give(self, offset: int) -> None:
        """Free a block `take` handed out (to the size it was carved at)."""
        footprint = self._footprint.pop(offset)
        self._free.setdefault(footprint, []).append(offset)

    def available(self, size: int = 0) -> int:
        """Bytes that could still be handed out in blocks of `size`: never carved, plus freed
        blocks of at least that size (a smaller one never serves a larger need)."""
        return self._uncarved() + sum(s * len(offsets) for s, offsets in self._free.items() if s >= size)
