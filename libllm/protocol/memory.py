"""The memory server's messages (0x03xx): KV blocks, segments, its figures.

`AllocBlocks(lease=True)` is internal: only the scheduler may hold a lease (the memory server
refuses anyone else)."""

from __future__ import annotations

import msgspec


class AllocBlocks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_ALLOC_BLOCKS: `num_blocks` KV blocks for the sender. With `lease`, they are charged
    to nobody (the scheduler's lease, kept until the scheduler goes); else to `client_id`."""

    num_blocks: int
    client_id: int = 0
    lease: bool = False


class BlockIds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reply to MEM_ALLOC_BLOCKS; payload of MEM_FREE_BLOCKS."""

    block_ids: list[int]


class AllocSegment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_ALLOC_SEGMENT: `size` bytes in the segment region for the sender."""

    size: int
    client_id: int = 0


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A segment: the handle servers take, and where it lies for its owner to map it."""

    segment_id: int
    generation: int
    offset: int
    size: int


class SegmentRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_FREE_SEGMENT: a handle, never an offset."""

    segment_id: int
    generation: int


class SegmentInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reply to MEM_SEGMENT_INFO (whose payload is a `SegmentRef`): where a live segment lies,
    for any endpoint of the instance. A stale or freed handle is an InvalidRequest."""

    segment_id: int
    generation: int
    offset: int  # arena offset of its first byte
    size: int  # bytes reserved (a multiple of the alignment)
    requested: int  # bytes its owner asked for
    owner_id: int  # endpoint that owns it; 0: the instance


class MemoryStatsReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_STATS: the memory server's figures (U of the KV pool, segments' F) and its
    reclamation counts. Paged F and H are the scheduler's (SCHED_STATS)."""

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int  # leased blocks included
    num_leased_blocks: int
    segment_bytes_total: int
    segment_bytes_used: int
    external_fragmentation: float
    owners: dict[int, int]  # endpoint id -> blocks + segments it holds
    num_reclaimed_blocks: int  # freed because their owner left (PEER_GONE or sweep)
    num_reclaimed_segments: int
    num_swept_blocks: int  # of those, found by the periodic sweep (should stay 0)
    num_swept_segments: int
    num_repairs: int  # table entries fixed when this server rebuilt its view
