from __future__ import annotations

import os
import stat
import struct

import numpy as np
import posix_ipc
import pytest

from llmos.microkernel import Arena, ArenaError
from llmos.microkernel import layout as L
from llmos.microkernel.arena import free_shm_bytes
from tests.conftest import unique_name


def test_create_is_exclusive_private_and_sized(arena_name: str) -> None:
    with Arena.create(arena_name, 1 << 20) as a:
        st = os.stat(f"/dev/shm/{arena_name}")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == a.size == 1 << 20
        with pytest.raises(ArenaError, match="already exists"):
            Arena.create(arena_name, 1 << 20)
    assert not os.path.exists(f"/dev/shm/{arena_name}")


def test_attach_sees_the_same_memory_and_regions(arena_name: str) -> None:
    regions = [(L.RegionKind.RINGS, 64 << 10), (L.RegionKind.PAGES, 256 << 10)]
    with Arena.create(arena_name, 1 << 20, regions) as a:
        b = Arena.attach(arena_name)
        try:
            assert b.regions == a.regions
            assert not b.is_owner
            page = a.region(L.RegionKind.PAGES)
            assert page.offset % L.PAGE_SIZE == 0
            x = a.ndarray(page.offset, (16, 4), np.float32)
            y = b.ndarray(page.offset, (16, 4), np.float32)
            x[3, 2] = 7.5
            assert y[3, 2] == 7.5
            with pytest.raises(ArenaError, match="no SEGMENTS region"):
                b.region(L.RegionKind.SEGMENTS)
            del x, y
        finally:
            b.close()


def test_attach_to_missing_arena_says_how_to_start() -> None:
    with pytest.raises(ArenaError, match="llmos up"):
        Arena.attach(unique_name("missing"))


def test_attach_refuses_foreign_object() -> None:
    name = "/" + unique_name("foreign")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=1 << 16)
    try:
        shm.close_fd()
        with pytest.raises(ArenaError, match="not an llmos arena"):
            Arena.attach(name)
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_attach_refuses_other_layout_version_and_loose_mode(arena_name: str) -> None:
    with Arena.create(arena_name, 1 << 16) as a:
        struct.pack_into("<I", a.buf, L.AH_VERSION, L.ARENA_LAYOUT_VERSION + 1)
        with pytest.raises(ArenaError, match="layout version"):
            Arena.attach(arena_name)
        struct.pack_into("<I", a.buf, L.AH_VERSION, L.ARENA_LAYOUT_VERSION)
        struct.pack_into("<I", a.buf, L.AH_STATE, L.ARENA_STATE_CREATING)
        with pytest.raises(ArenaError, match="not ready"):
            Arena.attach(arena_name)
        struct.pack_into("<I", a.buf, L.AH_STATE, L.ARENA_STATE_READY)
        os.chmod(f"/dev/shm/{arena_name}", 0o644)
        with pytest.raises(ArenaError, match="mode 644"):
            Arena.attach(arena_name)


def test_too_large_arena_is_a_clear_error_and_leaves_nothing(arena_name: str) -> None:
    too_big = free_shm_bytes() + (1 << 30)
    with pytest.raises(ArenaError, match="MiB free"):
        Arena.create(arena_name, too_big)
    assert not os.path.exists(f"/dev/shm/{arena_name}")


@pytest.mark.parametrize("size", [0, 100, L.ARENA_MIN_SIZE - 1])
def test_too_small_arena_is_refused(arena_name: str, size: int) -> None:
    with pytest.raises(ValueError, match="minimum"):
        Arena.create(arena_name, size)


def test_regions_must_fit(arena_name: str) -> None:
    with pytest.raises(ValueError, match="regions need"):
        Arena.create(arena_name, 1 << 16, [(L.RegionKind.PAGES, 1 << 20)])
    assert not os.path.exists(f"/dev/shm/{arena_name}")


@pytest.mark.parametrize("name", ["", "/", "a/b"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid arena name"):
        Arena.create(name, 1 << 16)


def test_carve_is_aligned_and_bounded(arena: Arena) -> None:
    region = arena.region(L.RegionKind.RINGS)
    first = arena.carve(L.RegionKind.RINGS, 100)
    second = arena.carve(L.RegionKind.RINGS, 8, align=4096)
    assert first == region.offset and first % 64 == 0
    assert second % 4096 == 0 and second >= first + 100
    with pytest.raises(ArenaError, match="is full"):
        arena.carve(L.RegionKind.RINGS, region.size)
    # a refused carve takes nothing
    third = arena.carve(L.RegionKind.RINGS, 8, align=4096)
    assert third == second + 4096


def test_views_are_bounds_checked(arena: Arena) -> None:
    with pytest.raises(ValueError, match="outside"):
        arena.view(arena.size - 4, 8)
    with pytest.raises(ValueError, match="aligned"):
        arena.ndarray(4097, (2,), np.float64)


def test_close_with_live_views_defers_unmapping(arena_name: str) -> None:
    a = Arena.create(arena_name, 1 << 16)
    view = a.ndarray(L.ARENA_HEADER_SIZE, (4,), np.uint32)
    a.close()
    view[0] = 3  # still mapped while the view lives
    assert a.closed
    with pytest.raises(ArenaError, match="closed"):
        a.view(0, 8)
    a.unlink()
    del view
