"""The scheduler's lease of KV blocks: when to ask the memory server for more.

Pure: `Lease` remembers whether a request is in flight and whether the pool said it is
spent, and `to_ask` decides from the block counts; the server loop sends the request.
Free blocks are kept on hand so that only admission ever waits for memory, never on a reply.
"""

from __future__ import annotations

LEASE_CHUNK = 64  # blocks per lease request (bounded by the reply size)


class Lease:
    def __init__(self) -> None:
        self.pending = False  # a request is in flight: one at a time
        self.exhausted = False  # the pool said no: ask again only once it may have blocks

    def to_ask(self, free: int, total: int, num_kv_blocks: int, *, stalled: bool) -> int:
        """How many blocks to ask for now (0: none): up to LEASE_CHUNK once fewer than half
        of that are free or the scheduler is stalled on memory, never beyond the pool
        (`num_kv_blocks`) we may hold in all."""
        if self.pending or self.exhausted or total >= num_kv_blocks:
            return 0
        if free >= LEASE_CHUNK // 2 and not stalled:
            return 0
        return min(LEASE_CHUNK, num_kv_blocks - total)

    def asked(self) -> None:
        self.pending = True

    def lost(self) -> None:
        """The request could not be sent, or went with a memory server that left: nothing
        will answer it, so ask again."""
        self.pending = False

    def answered(self, *, granted: bool) -> None:
        # Refused: the pool is spent for now. What we hold is what there is, until a block
        # is given back (a finished client's, after PEER_GONE) and `reset` lets us ask again.
        self.pending = False
        if not granted:
            self.exhausted = True

    def reset(self) -> None:
        """Someone left, so the pool may have blocks again."""
        self.exhausted = False
