"""ClientBlocks: each client's KV blocks in the scheduler, and its quota.

Runs in the scheduler process; pure (no I/O). The scheduler holds every KV block that
generation uses (its lease from the memory server), so it is where a tenant's quota can
hold: a block counts against the client (``Sequence.client``: the tenant the gateway
names, or the connection) of each sequence holding it, once per client however many of
its sequences share it (the n choices of one prompt, a repeated system prompt). A client
at its quota makes room by preempting its own lower-ranked sequences, or waits; it never
takes another client's blocks. Cached blocks that no sequence holds are nobody's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable


class ClientBlocks:
    """Blocks held per client, against ``max_blocks`` each (None: unlimited)."""

    __slots__ = ("_held", "max_blocks")

    def __init__(self, max_blocks: int | None = None) -> None:
        self.max_blocks = max_blocks
        self._held: dict[Hashable, Counter[int]] = {}  # client -> block -> its sequences holding it

    def num_held(self, client: Hashable) -> int:
        held = self._held.get(client)
        return len(held) if held else 0

    def fits(self, client: Hashable, num_more: int) -> bool:
        """May ``client`` take ``num_more`` blocks it does not hold yet?"""
        return self.max_blocks is None or self.num_held(client) + num_more <= self.max_blocks

    def hold(self, client: Hashable, block_ids: Iterable[int]) -> None:
        """One of ``client``'s sequences now holds ``block_ids`` (it may exceed the quota
        for a moment: a prefix match, given back at once if its chunk then does not fit)."""
        self._held.setdefault(client, Counter()).update(block_ids)

    def let_go(self, client: Hashable, block_ids: Iterable[int]) -> None:
        """One of ``client``'s sequences no longer holds ``block_ids``."""
        held = self._held[client]
        for block_id in block_ids:
            left = held[block_id] - 1
            if left > 0:
                held[block_id] = left
            else:
                del held[block_id]
        if not held:
            del self._held[client]
