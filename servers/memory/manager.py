"""MemoryManager: the memory server's whole state, formatted or rebuilt from one arena.

Runs inside the memory server; the server loop decodes a message and calls one method
here. Owns the block allocator, the segment allocator and their quotas, and the
reclamation of a gone endpoint's memory; never reclaims owner 0 (the instance).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llmos.microkernel.arena import Arena
from llmos.servers.memory._validate import as_endpoint_id
from llmos.servers.memory.allocator import BlockAllocator, BlockStats
from llmos.servers.memory.quotas import INSTANCE_ID, QuotaConfig
from llmos.servers.memory.segments import SegmentAllocator, SegmentStats
from llmos.servers.memory.tables import DEFAULT_SEGMENT_ALIGN, MemoryTables


@dataclass(slots=True, frozen=True)
class MemoryConfig:
    block_bytes: int  # bytes of one KV block (all layers, K and V)
    block_tokens: int  # token slots per KV block
    max_segments: int | None = None  # None: one per 4 KiB of segment region, at least 16
    segment_align: int = DEFAULT_SEGMENT_ALIGN
    quotas: QuotaConfig = field(default_factory=QuotaConfig)

    def __post_init__(self) -> None:
        if self.block_bytes <= 0 or self.block_tokens <= 0:
            raise ValueError(
                f"block_bytes and block_tokens must be positive, got {self.block_bytes}, {self.block_tokens}"
            )


@dataclass(slots=True, frozen=True)
class Reclaimed:
    """What `free_owner` or `sweep` gave back to the pools."""

    owner_ids: tuple[int, ...] = ()
    num_blocks: int = 0
    num_segments: int = 0
    num_segment_bytes: int = 0

    def __add__(self, other: Reclaimed) -> Reclaimed:
        return Reclaimed(
            self.owner_ids + other.owner_ids,
            self.num_blocks + other.num_blocks,
            self.num_segments + other.num_segments,
            self.num_segment_bytes + other.num_segment_bytes,
        )


@dataclass(slots=True, frozen=True)
class MemoryStats:
    blocks: BlockStats
    segments: SegmentStats

    @property
    def external_fragmentation(self) -> float:
        return self.segments.external_fragmentation


class MemoryManager:
    def __init__(self, tables: MemoryTables, quotas: QuotaConfig | None = None) -> None:
        self.tables = tables
        self.blocks = BlockAllocator(tables, quotas)
        self.segments = SegmentAllocator(tables, quotas)

    @classmethod
    def format(cls, arena: Arena, config: MemoryConfig) -> MemoryManager:
        """Fresh, empty tables: the first memory server of an instance."""
        tables = MemoryTables.format(
            arena,
            block_bytes=config.block_bytes,
            block_tokens=config.block_tokens,
            max_segments=config.max_segments,
            segment_align=config.segment_align,
        )
        return cls(tables, config.quotas)

    @classmethod
    def attach(cls, arena: Arena, quotas: QuotaConfig | None = None) -> MemoryManager:
        """Rebuild from the tables in the arena: a restarted memory server."""
        return cls(MemoryTables.attach(arena), quotas)

    @property
    def num_repairs(self) -> int:
        return self.blocks.num_repairs + self.segments.num_repairs

    def owner_ids(self) -> set[int]:
        """Endpoints holding anything (blocks, leases or segments), the instance excluded."""
        return (self.blocks.owner_ids() | self.segments.owner_ids()) - {INSTANCE_ID}

    def free_owner(self, endpoint_id: int) -> Reclaimed:
        """Free every block, lease and segment of a gone endpoint.

        Raises:
            InvalidRequest: a bad id, or 0 (the instance, never reclaimed).
        """
        owner = as_endpoint_id(endpoint_id)
        num_blocks = self.blocks.free_owner(owner)
        num_segments, num_bytes = self.segments.free_owner(owner)
        held = num_blocks or num_segments
        return Reclaimed((owner,) if held else (), num_blocks, num_segments, num_bytes)

    def sweep(self, live_endpoint_ids: Iterable[int]) -> Reclaimed:
        """Free whatever no live endpoint owns (owner 0 always counts as live)."""
        live = {as_endpoint_id(e, "live endpoint id") for e in live_endpoint_ids}
        total = Reclaimed()
        for owner in sorted(self.owner_ids() - live):
            total += self.free_owner(owner)
        return total

    def stats(self) -> MemoryStats:
        return MemoryStats(self.blocks.stats(), self.segments.stats())
