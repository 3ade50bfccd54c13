"""Segments: best fit, coalescing, handles and generations, fragmentation, rebuild."""

from __future__ import annotations

from typing import Any

import pytest

from llmos.microkernel import InvalidRequest, Overloaded
from llmos.microkernel import layout as L
from llmos.servers.memory import MemoryManager, SegmentAllocator, SegmentHandle
from llmos.servers.memory.tables import SegmentState
from tests.servers.memory.conftest import MakeMemory

OWNER, OTHER = 5, 6
KIB = 1024


@pytest.fixture
def segments(make_memory: MakeMemory) -> SegmentAllocator:
    return make_memory(segment_bytes=16 * KIB, max_segments=8).segments


def extents(segments: SegmentAllocator) -> list[tuple[int, int, str]]:
    table = segments.tables.segments
    live = [i for i in range(len(table)) if table["state"][i] != SegmentState.UNUSED]
    rows = sorted(
        (int(table["offset"][i]), int(table["size"][i]), SegmentState(int(table["state"][i])).name)
        for i in live
    )
    return [(o // KIB, s // KIB, st) for o, s, st in rows]


def test_allocate_rounds_up_and_resolves(segments: SegmentAllocator) -> None:
    handle = segments.allocate(100, OWNER, client_id=9)
    info = segments.resolve(handle, OWNER)
    assert info.size == 128 and info.requested_bytes == 100 and info.client_id == 9
    assert info.offset == segments.tables.arena.region(L.RegionKind.SEGMENTS).offset
    assert segments.client_bytes(9) == 128
    stats = segments.stats()
    assert (stats.num_segments, stats.used_bytes, stats.requested_bytes) == (1, 128, 100)


def test_best_fit_and_coalescing(segments: SegmentAllocator) -> None:
    a, b, c, d, e = (segments.allocate(n * KIB, OWNER) for n in (1, 4, 1, 2, 1))
    segments.free(b, OWNER)  # a 4 KiB hole
    segments.free(d, OWNER)  # a 2 KiB hole
    assert extents(segments) == [
        (0, 1, "USED"),
        (1, 4, "FREE"),
        (5, 1, "USED"),
        (6, 2, "FREE"),
        (8, 1, "USED"),
        (9, 7, "FREE"),
    ]
    f = segments.allocate(2 * KIB, OWNER)  # best fit: the 2 KiB hole, not the first one
    assert segments.resolve(f, OWNER).offset - segments.region_offset == 6 * KIB
    stats = segments.stats()
    assert (stats.free_bytes, stats.largest_free) == (11 * KIB, 7 * KIB)
    assert stats.external_fragmentation == pytest.approx(1 - 7 / 11)
    segments.free(c, OWNER)  # merges with the hole before it
    segments.free(f, OWNER)  # merges with the hole before it
    segments.free(e, OWNER)  # merges both sides: everything but a is free
    assert extents(segments) == [(0, 1, "USED"), (1, 15, "FREE")]
    segments.free(a, OWNER)
    assert extents(segments) == [(0, 16, "FREE")]
    assert segments.stats().external_fragmentation == 0.0


def test_handles_go_stale_and_are_owner_checked(segments: SegmentAllocator) -> None:
    handle = segments.allocate(KIB, OWNER)
    with pytest.raises(InvalidRequest, match="does not belong to endpoint 6"):
        segments.resolve(handle, OTHER)
    with pytest.raises(InvalidRequest, match="does not belong to endpoint 6"):
        segments.free(handle, OTHER)
    segments.free(handle, OWNER)
    again = segments.allocate(KIB, OWNER)
    assert again != handle
    whole = segments.allocate(15 * KIB, OWNER)  # an exact fit keeps the free extent's slot
    segments.free(whole, OWNER)
    reused = segments.allocate(15 * KIB, OWNER)
    assert reused.segment_id == whole.segment_id and reused.generation == whole.generation + 1
    for stale in (handle, whole, SegmentHandle(handle.segment_id, 0)):
        with pytest.raises(InvalidRequest, match="stale or unknown"):
            segments.resolve(stale, OWNER)


def test_instance_segments_resolve_for_everyone(segments: SegmentAllocator) -> None:
    weights = segments.allocate(8 * KIB, 0)
    assert segments.resolve(weights, OTHER).owner_id == 0
    with pytest.raises(InvalidRequest, match="does not belong"):
        segments.free(weights, OTHER)
    with pytest.raises(InvalidRequest, match="owner 0 is the instance"):
        segments.free_owner(0)


def test_lookup_answers_anyone_with_a_live_handle_and_refuses_a_stale_one(segments: SegmentAllocator) -> None:
    handle = segments.allocate(100, OWNER)
    info = segments.lookup(handle)
    assert info == segments.resolve(handle, OWNER)
    assert (info.owner_id, info.requested_bytes, info.size) == (OWNER, 100, 128)
    with pytest.raises(InvalidRequest, match="does not belong"):
        segments.resolve(handle, OTHER)  # resolve keeps its owner check
    segments.free(handle, OWNER)
    with pytest.raises(InvalidRequest, match="stale"):
        segments.lookup(handle)
    again = segments.allocate(100, OTHER)  # the same bytes, someone else's now
    assert segments.lookup(again).offset == info.offset
    with pytest.raises(InvalidRequest, match="stale"):
        segments.lookup(handle)
    assert segments.lookup(again).owner_id == OTHER


BAD: list[tuple[str, tuple[Any, ...], str]] = [
    ("allocate", (0, OWNER), "segment size must be in"),
    ("allocate", (16 * KIB + 1, OWNER), "segment size must be in"),
    ("allocate", (2.5, OWNER), "must be an integer"),
    ("allocate", (64, -3), "owner id must be in"),
    ("resolve", ((0, 1), OWNER), "a segment handle is expected"),
    ("resolve", (SegmentHandle(17, 1), OWNER), "segment id must be in"),
    ("resolve", (SegmentHandle(0, -1), OWNER), "segment generation must be in"),
    ("resolve", (SegmentHandle(3, 1), OWNER), "stale or unknown"),
    ("free", (SegmentHandle("0", 1), OWNER), "must be an integer"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("method", "args", "message"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_is_refused_and_changes_nothing(
    segments: SegmentAllocator, method: str, args: tuple[Any, ...], message: str
) -> None:
    segments.allocate(KIB, OWNER)
    before = segments.snapshot()
    with pytest.raises(InvalidRequest, match=message):
        getattr(segments, method)(*args)
    assert segments.snapshot() == before


def test_out_of_space_and_a_full_table_are_overloaded(segments: SegmentAllocator) -> None:
    handles = [segments.allocate(KIB, OWNER) for _ in range(8)]
    assert not segments.can_allocate(64)
    with pytest.raises(Overloaded, match="segment table full: 8 segments"):
        segments.allocate(64, OWNER)
    for h in handles[::2]:
        segments.free(h, OWNER)  # 4 holes of 1 KiB and 8 KiB at the end
    before = segments.snapshot()
    assert not segments.can_allocate(9 * KIB)
    with pytest.raises(
        Overloaded,
        match=r"no free extent of 9216 bytes: the largest is 8192 of 12288 free bytes \(fragmentation 0.33\)",
    ):
        segments.allocate(9 * KIB, OWNER)
    assert segments.snapshot() == before


def test_no_segment_region(make_memory: MakeMemory) -> None:
    memory = make_memory(segment_bytes=0)
    assert memory.segments.stats().total_bytes == 0
    with pytest.raises(InvalidRequest, match="no segment region"):
        memory.segments.allocate(64, OWNER)


def test_rebuild_gives_the_same_view_and_repairs_gaps(make_memory: MakeMemory) -> None:
    memory = make_memory(segment_bytes=16 * KIB, max_segments=8)
    segments = memory.segments
    hs = [segments.allocate(n * KIB, OWNER, client_id=2) for n in (1, 2, 3, 1)]
    segments.free(hs[1], OWNER)
    again = MemoryManager.attach(memory.tables.arena)
    assert again.num_repairs == 0 and again.segments.snapshot() == segments.snapshot()
    # Simulate a crash in the middle of a coalesce: the neighbour retired, the survivor
    # not yet grown, so its bytes are in no extent.
    table = segments.tables.segments
    segments.free(hs[2], OWNER)
    survivor = hs[1].segment_id
    table["size"][survivor] = 2 * KIB
    repaired = MemoryManager.attach(memory.tables.arena).segments
    assert repaired.num_repairs == 2  # the gap became a free extent, then merged
    assert extents(repaired) == [(0, 1, "USED"), (1, 5, "FREE"), (6, 1, "USED"), (7, 9, "FREE")]
    assert repaired.client_bytes(2) == 2 * KIB


def test_overlapping_extents_are_corruption(make_memory: MakeMemory) -> None:
    from llmos.microkernel import ArenaError

    memory = make_memory(segment_bytes=16 * KIB, max_segments=8)
    handle = memory.segments.allocate(KIB, OWNER)
    memory.segments.tables.segments["size"][handle.segment_id] = 2 * KIB
    with pytest.raises(ArenaError, match="overlaps"):
        MemoryManager.attach(memory.tables.arena)
