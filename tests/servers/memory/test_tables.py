"""Table layout, the sizing helpers, format and attach."""

from __future__ import annotations

import pytest

from llmos.microkernel import Arena, ArenaError
from llmos.microkernel import layout as L
from llmos.servers.memory import MemoryTables, arena_bytes, memory_regions, tables_size
from llmos.servers.memory.tables import (
    BLOCK_ENTRY_BYTES,
    HEADER_BYTES,
    SEGMENT_ENTRY_BYTES,
    TABLES_MAGIC,
    TABLES_VERSION,
    plan_geometry,
)
from tests.conftest import unique_name
from tests.servers.memory.conftest import MakeArena


def test_entry_sizes() -> None:
    assert (HEADER_BYTES, BLOCK_ENTRY_BYTES, SEGMENT_ENTRY_BYTES) == (128, 16, 48)


def test_tables_size_counts_every_entry() -> None:
    # 1000 blocks, 100 segments -> 201 entries, rounded up to a page.
    expected = L.align_up(L.align_up(128 + 1000 * 16, 64) + 201 * 48, L.PAGE_SIZE)
    assert tables_size(1000 * 512, 512, 1 << 20, max_segments=100) == expected
    # No segment region: no segment table at all.
    assert tables_size(1000 * 512, 512) == L.align_up(128 + 1000 * 16, L.PAGE_SIZE)
    # The default: one segment per 4 KiB of segment region, at least 16.
    assert plan_geometry(4096, 256, 4, 1 << 20).max_segments == 256
    assert plan_geometry(4096, 256, 4, 8192).max_segments == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4096, 0, 4), "block_bytes"),
        ((4096, 100, 4), "block_bytes"),
        ((4096, 256, 0), "block_tokens"),
        ((128, 256, 4), "holds no"),
        ((4096, 256, 4, -1), "segment_bytes"),
        ((4096, 256, 4, 4096, None, 48), "segment_align"),
        ((4096, 256, 4, 4096, 0), "max_segments"),
    ],
)
def test_plan_geometry_rejects_bad_sizes(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_geometry(*args)


def test_format_then_attach_sees_the_same_geometry(make_arena: MakeArena) -> None:
    arena = make_arena(num_blocks=10, segment_bytes=8192, max_segments=5)
    tables = MemoryTables.format(arena, block_bytes=256, block_tokens=4, max_segments=5)
    again = MemoryTables.attach(arena)
    assert again.geometry == tables.geometry
    assert tables.geometry.num_blocks == 10 and tables.geometry.num_segment_entries == 11
    assert int(tables.header[0]["magic"]) == TABLES_MAGIC
    assert tables.page_offset(3) == arena.region(L.RegionKind.PAGES).offset + 3 * 256
    # One free extent covers the segment region; every block is free.
    assert int(again.segments[0]["size"]) == 8192 and int(again.segments[0]["state"]) == 1
    assert not again.blocks["state"].any()


def test_attach_refuses_unformatted_and_foreign_tables(make_arena: MakeArena) -> None:
    arena = make_arena()
    with pytest.raises(ArenaError, match="no formatted memory tables"):
        MemoryTables.attach(arena)
    tables = MemoryTables.format(arena, block_bytes=256, block_tokens=4)
    for version in (99, 1):  # 1: the layout with the memory server's own prefix cache
        tables.header[0]["version"] = version
        with pytest.raises(ArenaError, match=f"version {version}"):
            MemoryTables.attach(arena)
    tables.header[0]["version"] = TABLES_VERSION
    tables.header[0]["num_blocks"] = 10**6
    with pytest.raises(ArenaError, match="corrupt"):
        MemoryTables.attach(arena)


def test_format_refuses_a_small_table_region() -> None:
    regions = [(L.RegionKind.ALLOC_TABLES, 4096), (L.RegionKind.PAGES, 256 * 400)]
    with (
        Arena.create(unique_name("mem"), arena_bytes(regions), regions) as arena,
        pytest.raises(ArenaError, match="tables_size"),
    ):
        MemoryTables.format(arena, block_bytes=256, block_tokens=4)


def test_memory_regions_fit_an_arena() -> None:
    regions = memory_regions(64 * 256, 256, 16384)
    assert [kind for kind, _ in regions] == [
        L.RegionKind.ALLOC_TABLES,
        L.RegionKind.PAGES,
        L.RegionKind.SEGMENTS,
    ]
    with Arena.create(unique_name("mem"), arena_bytes(regions), regions) as arena:
        tables = MemoryTables.format(arena, block_bytes=256, block_tokens=4)
        assert tables.geometry.num_blocks == 64 and tables.geometry.segment_bytes == 16384
        del tables
