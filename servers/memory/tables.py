"""The memory server's tables in the arena's ALLOC_TABLES region: layout, sizing, format, attach.

Run by the memory server (format at first start, attach after a restart) and by the
supervisor (sizing only). Owns the byte layout of the per-block and per-segment tables;
never decides who gets memory (allocator.py and segments.py do).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import numpy as np

from llmos.microkernel import layout as L
from llmos.microkernel.arena import Arena
from llmos.microkernel.errors import ArenaError

TABLES_MAGIC: Final = int.from_bytes(b"LLMOSMEM", "little")
TABLES_VERSION: Final = 2  # 2: 16-byte block entries (no prefix-cache hash, LRU, refcount)
TABLE_ALIGN: Final = L.CACHE_LINE
DEFAULT_SEGMENT_ALIGN: Final = 64
MIN_SEGMENT_BYTES_PER_ENTRY: Final = 4096  # default segment-count limit: one per 4 KiB


class BlockState(IntEnum):
    FREE = 0  # on the free list; zeroed memory formats as all-free
    USED = 1  # held by its owner, charged to its client
    LEASED = 2  # handed to its owner (the scheduler) in a lease, charged to nobody


class SegmentState(IntEnum):
    UNUSED = 0  # a spare table slot, describes no bytes
    FREE = 1  # a free extent
    USED = 2  # an allocated extent


# Every field is written by the memory server only; everyone else may read.
HEADER_DTYPE: Final = np.dtype(
    [
        ("magic", "<u8"),
        ("version", "<u4"),
        ("reserved0", "<u4"),
        ("num_blocks", "<u8"),
        ("block_bytes", "<u8"),
        ("block_tokens", "<u8"),
        ("num_segment_entries", "<u8"),
        ("segment_bytes", "<u8"),
        ("segment_align", "<u8"),
        ("pages_offset", "<u8"),  # arena offsets, to catch a region plan that moved
        ("segments_offset", "<u8"),
        ("reserved1", "<u8", (6,)),
    ]
)
BLOCK_DTYPE: Final = np.dtype(
    [
        ("state", "<u4"),  # BlockState
        ("owner", "<u4"),  # endpoint id; 0 = the instance
        ("client", "<u4"),  # charged client/tenant id; 0 = nobody
        ("generation", "<u4"),  # bumped on every (re)allocation
    ]
)
SEGMENT_DTYPE: Final = np.dtype(
    [
        ("offset", "<u8"),  # from the start of the SEGMENTS region
        ("size", "<u8"),  # bytes, a multiple of segment_align
        ("requested", "<u8"),  # bytes asked for (USED only)
        ("state", "<u4"),  # SegmentState
        ("owner", "<u4"),
        ("client", "<u4"),
        ("generation", "<u4"),  # bumped each time the slot becomes USED
        ("flags", "<u4"),  # reserved: e.g. a weights-ready flag
        ("reserved", "<u4"),
    ]
)
HEADER_BYTES: Final = HEADER_DTYPE.itemsize
BLOCK_ENTRY_BYTES: Final = BLOCK_DTYPE.itemsize
SEGMENT_ENTRY_BYTES: Final = SEGMENT_DTYPE.itemsize
assert HEADER_BYTES == 128 and BLOCK_ENTRY_BYTES == 16 and SEGMENT_ENTRY_BYTES == 48


@dataclass(slots=True, frozen=True)
class TableGeometry:
    num_blocks: int
    block_bytes: int
    block_tokens: int
    num_segment_entries: int  # 2 * max_segments + 1: used extents, free ones between them
    segment_bytes: int
    segment_align: int

    @property
    def max_segments(self) -> int:
        return max(0, (self.num_segment_entries - 1) // 2)

    @property
    def blocks_offset(self) -> int:
        return HEADER_BYTES

    @property
    def segments_offset(self) -> int:
        return L.align_up(HEADER_BYTES + self.num_blocks * BLOCK_ENTRY_BYTES, TABLE_ALIGN)

    @property
    def tables_bytes(self) -> int:
        return self.segments_offset + self.num_segment_entries * SEGMENT_ENTRY_BYTES


def default_max_segments(segment_bytes: int) -> int:
    return 0 if segment_bytes <= 0 else max(16, segment_bytes // MIN_SEGMENT_BYTES_PER_ENTRY)


def plan_geometry(
    pages_bytes: int,
    block_bytes: int,
    block_tokens: int,
    segment_bytes: int = 0,
    max_segments: int | None = None,
    segment_align: int = DEFAULT_SEGMENT_ALIGN,
) -> TableGeometry:
    """Check the sizes and derive the tables' geometry.

    Raises:
        ValueError: a size is not positive, not aligned, or the page region holds no block.
    """
    if block_bytes <= 0 or block_bytes % 8:
        raise ValueError(f"block_bytes must be a positive multiple of 8, got {block_bytes}")
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    if pages_bytes < block_bytes:
        raise ValueError(f"the page region ({pages_bytes} bytes) holds no {block_bytes}-byte block")
    if segment_bytes < 0:
        raise ValueError(f"segment_bytes must be >= 0, got {segment_bytes}")
    if not L.is_power_of_two(segment_align) or segment_align < 8:
        raise ValueError(f"segment_align must be a power of two >= 8, got {segment_align}")
    usable_segment_bytes = segment_bytes - segment_bytes % segment_align
    if max_segments is None:
        max_segments = default_max_segments(usable_segment_bytes)
    if max_segments < 0 or (usable_segment_bytes and max_segments == 0):
        raise ValueError(
            f"max_segments must be positive when there is a segment region, got {max_segments}"
        )
    num_entries = 2 * max_segments + 1 if usable_segment_bytes else 0
    return TableGeometry(
        pages_bytes // block_bytes,
        block_bytes,
        block_tokens,
        num_entries,
        usable_segment_bytes,
        segment_align,
    )


def tables_size(
    pages_bytes: int,
    block_bytes: int,
    segment_bytes: int = 0,
    max_segments: int | None = None,
    segment_align: int = DEFAULT_SEGMENT_ALIGN,
) -> int:
    """Bytes the ALLOC_TABLES region needs for these PAGES and SEGMENTS region sizes.

    The supervisor calls this to size the arena: 128 header bytes, 16 per KV block and
    48 per segment-table entry (2 * max_segments + 1 of them), rounded up to a page.
    """
    geometry = plan_geometry(
        pages_bytes, block_bytes, 1, segment_bytes, max_segments, segment_align
    )
    return L.align_up(geometry.tables_bytes, L.PAGE_SIZE)


def memory_regions(
    pages_bytes: int,
    block_bytes: int,
    segment_bytes: int = 0,
    max_segments: int | None = None,
    segment_align: int = DEFAULT_SEGMENT_ALIGN,
) -> list[tuple[L.RegionKind, int]]:
    """The memory server's part of an arena's region plan, for `Arena.create`."""
    regions = [
        (
            L.RegionKind.ALLOC_TABLES,
            tables_size(pages_bytes, block_bytes, segment_bytes, max_segments, segment_align),
        ),
        (L.RegionKind.PAGES, pages_bytes),
    ]
    if segment_bytes:
        regions.append((L.RegionKind.SEGMENTS, segment_bytes))
    return regions


def arena_bytes(regions: list[tuple[L.RegionKind, int]]) -> int:
    """Arena size that holds the header and these regions, each page-aligned."""
    return L.ARENA_HEADER_SIZE + sum(L.align_up(size, L.PAGE_SIZE) for _, size in regions)


class MemoryTables:
    """Numpy views of the header, block table and segment table inside one arena."""

    def __init__(self, arena: Arena, geometry: TableGeometry) -> None:
        self.arena = arena
        self.geometry = geometry
        base = arena.region(L.RegionKind.ALLOC_TABLES).offset
        self.header: np.ndarray[Any, Any] = arena.ndarray(base, (1,), HEADER_DTYPE)
        self.blocks: np.ndarray[Any, Any] = arena.ndarray(
            base + geometry.blocks_offset, (geometry.num_blocks,), BLOCK_DTYPE
        )
        self.segments: np.ndarray[Any, Any] = arena.ndarray(
            base + geometry.segments_offset, (geometry.num_segment_entries,), SEGMENT_DTYPE
        )
        self.pages_offset = arena.region(L.RegionKind.PAGES).offset
        self.segments_region_offset = (
            arena.region(L.RegionKind.SEGMENTS).offset if geometry.segment_bytes else 0
        )

    @classmethod
    def format(
        cls,
        arena: Arena,
        *,
        block_bytes: int,
        block_tokens: int,
        max_segments: int | None = None,
        segment_align: int = DEFAULT_SEGMENT_ALIGN,
    ) -> MemoryTables:
        """Write empty tables (all blocks free, one free extent): a fresh instance.

        Raises:
            ArenaError: the arena lacks a PAGES or ALLOC_TABLES region, or the latter is too small.
            ValueError: the sizes are invalid (see `plan_geometry`).
        """
        tables_region = arena.region(L.RegionKind.ALLOC_TABLES)
        pages = arena.region(L.RegionKind.PAGES)
        segment_bytes = (
            arena.regions[L.RegionKind.SEGMENTS].size
            if L.RegionKind.SEGMENTS in arena.regions
            else 0
        )
        geometry = plan_geometry(
            pages.size, block_bytes, block_tokens, segment_bytes, max_segments, segment_align
        )
        if geometry.tables_bytes > tables_region.size:
            raise ArenaError(
                f"ALLOC_TABLES region of arena {arena.name} has {tables_region.size} bytes; "
                f"these tables need {geometry.tables_bytes} (see servers.memory.tables_size)"
            )
        tables = cls(arena, geometry)
        tables.header[0]["magic"] = 0  # an interrupted format must not attach
        tables.blocks[:] = np.zeros((), BLOCK_DTYPE)
        tables.segments[:] = np.zeros((), SEGMENT_DTYPE)
        if geometry.num_segment_entries:
            tables.segments[0]["size"] = geometry.segment_bytes
            tables.segments[0]["state"] = SegmentState.FREE
        h = tables.header[0]
        h["version"] = TABLES_VERSION
        h["num_blocks"] = geometry.num_blocks
        h["block_bytes"] = geometry.block_bytes
        h["block_tokens"] = geometry.block_tokens
        h["num_segment_entries"] = geometry.num_segment_entries
        h["segment_bytes"] = geometry.segment_bytes
        h["segment_align"] = geometry.segment_align
        h["pages_offset"] = tables.pages_offset
        h["segments_offset"] = tables.segments_region_offset
        h["magic"] = TABLES_MAGIC  # last: a header with the magic is complete
        return tables

    @classmethod
    def attach(cls, arena: Arena) -> MemoryTables:
        """Map tables a previous memory server formatted (a restart rebuilds from these).

        Raises:
            ArenaError: no tables there, another version, or a geometry the regions contradict.
        """
        region = arena.region(L.RegionKind.ALLOC_TABLES)
        if region.size < HEADER_BYTES:
            raise ArenaError(f"ALLOC_TABLES region of arena {arena.name} is too small for a header")
        h = arena.ndarray(region.offset, (1,), HEADER_DTYPE)[0]
        if int(h["magic"]) != TABLES_MAGIC:
            raise ArenaError(f"arena {arena.name} has no formatted memory tables")
        if int(h["version"]) != TABLES_VERSION:
            raise ArenaError(
                f"memory tables in arena {arena.name} have version {int(h['version'])}; "
                f"this llmos reads {TABLES_VERSION}"
            )
        geometry = TableGeometry(
            int(h["num_blocks"]),
            int(h["block_bytes"]),
            int(h["block_tokens"]),
            int(h["num_segment_entries"]),
            int(h["segment_bytes"]),
            int(h["segment_align"]),
        )
        pages = arena.region(L.RegionKind.PAGES)
        segments = arena.regions.get(L.RegionKind.SEGMENTS)
        if (
            geometry.tables_bytes > region.size
            or geometry.block_bytes <= 0
            or geometry.num_blocks * geometry.block_bytes > pages.size
            or int(h["pages_offset"]) != pages.offset
            or geometry.segment_bytes > (segments.size if segments else 0)
            or (geometry.segment_bytes and int(h["segments_offset"]) != segments.offset)  # type: ignore[union-attr]
        ):
            raise ArenaError(
                f"memory tables in arena {arena.name} do not match its regions (corrupt)"
            )
        return cls(arena, geometry)

    def page_offset(self, block_id: int) -> int:
        """Arena offset of a KV block's bytes."""
        return self.pages_offset + block_id * self.geometry.block_bytes
