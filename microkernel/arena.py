"""The arena: one POSIX shared-memory object per instance, mapped by every process.

The kernel creates it (O_EXCL, mode 0600, pre-faulted, header and region table written
once); every other process attaches, checking owner, magic, layout version and size.
Offsets, never pointers, cross process boundaries. This module never interprets what a
region holds: rings, allocator tables and pages belong to their own modules.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import posix_ipc

from llmos.microkernel import layout as L
from llmos.microkernel._ring import atomic_add_u64
from llmos.microkernel.errors import ArenaError

_MADV_POPULATE_WRITE = 23  # Linux 5.14+; the mmap module does not name it before 3.13
SHM_DIR = "/dev/shm"


@dataclass(slots=True, frozen=True)
class Region:
    """One contiguous part of the arena."""

    kind: L.RegionKind
    offset: int
    size: int


def shm_name(name: str) -> str:
    """The POSIX name for an arena: a leading slash, no other slash."""
    bare = name.lstrip("/")
    if not bare or "/" in bare or len(bare) > 200:
        raise ValueError(f"invalid arena name {name!r}: one non-empty path component expected")
    return "/" + bare


def free_shm_bytes() -> int:
    """Bytes an unprivileged process may still allocate in /dev/shm (statvfs, no allocation)."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def plan_regions(size: int, regions: Iterable[tuple[L.RegionKind, int]] | None) -> list[Region]:
    """Place regions page-aligned after the header; by default one RINGS region takes all."""
    offset = L.ARENA_HEADER_SIZE
    if regions is None:
        return [Region(L.RegionKind.RINGS, offset, size - offset)]
    placed = []
    for kind, region_size in regions:
        if region_size <= 0:
            raise ValueError(f"region {L.RegionKind(kind).name} needs a positive size, got {region_size}")
        offset = L.align_up(offset, L.PAGE_SIZE)
        placed.append(Region(L.RegionKind(kind), offset, region_size))
        offset += region_size
    if offset > size:
        raise ValueError(f"regions need {offset} bytes but the arena has {size}")
    if len(placed) > L.ARENA_MAX_REGIONS:
        raise ValueError(f"at most {L.ARENA_MAX_REGIONS} regions, got {len(placed)}")
    return placed


class Arena:
    """A mapped arena. Use `Arena.create` (the kernel) or `Arena.attach` (everyone else)."""

    def __init__(self, name: str, mm: mmap.mmap, regions: list[Region], *, is_owner: bool) -> None:
        self.name = name
        self.size = len(mm)
        self.is_owner = is_owner
        self._mm: mmap.mmap | None = mm
        self.buf = memoryview(mm)
        self.regions = {r.kind: r for r in regions}
        self._region_index = {r.kind: i for i, r in enumerate(regions)}

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        regions: Iterable[tuple[L.RegionKind, int]] | None = None,
    ) -> Arena:
        """Create, size and pre-fault a new arena; fail if the name exists.

        Raises:
            ArenaError: the name is taken, or /dev/shm has too little space.
            ValueError: the size or region plan is invalid.
        """
        posix = shm_name(name)
        if size < L.ARENA_MIN_SIZE:
            raise ValueError(f"arena size {size} is below the minimum {L.ARENA_MIN_SIZE}")
        size = L.align_up(size, L.PAGE_SIZE)
        placed = plan_regions(size, regions)
        available = free_shm_bytes()
        if size > available:
            raise ArenaError(
                f"arena {posix} needs {size / 2**20:.1f} MiB but {SHM_DIR} has only "
                f"{available / 2**20:.1f} MiB free; free space there or enlarge it "
                f"(mount -o remount,size=... {SHM_DIR}), or lower the memory budget"
            )
        try:
            shm = posix_ipc.SharedMemory(posix, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError:
            raise ArenaError(
                f"arena {posix} already exists: another instance runs under this name, "
                "or a crashed one left it behind (`llmos down` cleans it)"
            ) from None
        try:
            try:
                # posix_fallocate reserves the pages now, so a full /dev/shm is ENOSPC here
                # rather than SIGBUS on first touch later.
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as exc:
                raise ArenaError(f"cannot reserve {size} bytes for arena {posix} in {SHM_DIR}: {exc}") from None
            mm = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(posix)
            raise
        shm.close_fd()
        _prefault(mm)
        _write_header(mm, size, placed)
        return cls(posix, mm, placed, is_owner=True)

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Map an existing arena after checking who owns it and what it holds.

        Raises:
            ArenaError: no such arena, another uid owns it, its mode lets others in, or
                its header is foreign, of another layout version, or not ready.
        """
        posix = shm_name(name)
        try:
            shm = posix_ipc.SharedMemory(posix)
        except posix_ipc.ExistentialError:
            raise ArenaError(f"no arena {posix}: is the instance running? (`llmos up`)") from None
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.getuid():
                raise ArenaError(f"arena {posix} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
            if st.st_mode & 0o077:
                raise ArenaError(f"arena {posix} has mode {st.st_mode & 0o777:o}; 0600 expected")
            if st.st_size < L.ARENA_MIN_SIZE:
                raise ArenaError(f"{posix} is {st.st_size} bytes: not an llmos arena")
            mm = mmap.mmap(shm.fd, st.st_size)
        finally:
            shm.close_fd()
        try:
            regions = _read_header(mm, posix)
        except BaseException:
            mm.close()
            raise
        return cls(posix, mm, regions, is_owner=False)

    def close(self) -> None:
        """Unmap. Views still exported (numpy arrays, live rings) keep the pages mapped
        until they are gone; the arena object is unusable either way."""
        if self._mm is None:
            return
        mm, self._mm = self._mm, None
        try:
            self.buf.release()
            mm.close()
        except BufferError:
            pass  # a ring or array still maps it; the pages go when the last one dies

    def unlink(self) -> None:
        """Remove the name from /dev/shm (mappings stay valid until closed)."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> Arena:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        finally:
            if self.is_owner:
                self.unlink()

    # -- access ----------------------------------------------------------------------

    def region(self, kind: L.RegionKind) -> Region:
        try:
            return self.regions[kind]
        except KeyError:
            raise ArenaError(f"arena {self.name} has no {L.RegionKind(kind).name} region") from None

    def view(self, offset: int, length: int) -> memoryview:
        """A zero-copy view of `[offset, offset + length)`, bounds-checked."""
        self._check_range(offset, length)
        return self.buf[offset : offset + length]

    def ndarray(self, offset: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray[Any, Any]:
        """A numpy array over arena bytes without a copy."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        self._check_range(offset, count * dt.itemsize)
        if offset % dt.alignment:
            raise ValueError(f"offset {offset} is not aligned for {dt}")
        return np.frombuffer(self.buf, dtype=dt, count=count, offset=offset).reshape(shape)

    def carve(self, kind: L.RegionKind, size: int, align: int = L.CACHE_LINE) -> int:
        """Take `size` bytes from a region by atomic bump allocation; returns the offset.

        Safe from any number of processes at once. Nothing carved is ever returned: the
        kernel carves rings and doorbells at boot and recycles them by generation.

        Raises:
            ArenaError: the region is exhausted.
        """
        region = self.region(kind)
        if size <= 0 or align <= 0 or not L.is_power_of_two(align):
            raise ValueError(f"invalid carve of {size} bytes aligned to {align}")
        # Take size + align - 1 and align the start inside it: one atomic add, no CAS loop.
        need = L.align_up(size + align - 1, L.RECORD_ALIGN)
        used_off = _region_entry_offset(self._region_index[kind]) + L.RE_USED
        start = atomic_add_u64(self.buf, used_off, need)
        if start + need > region.size:
            atomic_add_u64(self.buf, used_off, -need)
            raise ArenaError(
                f"{L.RegionKind(kind).name} region of arena {self.name} is full "
                f"({region.size} bytes); cannot carve {size} more"
            )
        return L.align_up(region.offset + start, align)

    def carved_bytes(self, kind: L.RegionKind) -> int:
        """Bytes `carve` has handed out of a region so far."""
        self.region(kind)
        offset = _region_entry_offset(self._region_index[kind]) + L.RE_USED
        used: int = struct.unpack_from("<Q", self.buf, offset)[0]
        return used

    def _check_range(self, offset: int, length: int) -> None:
        if self._mm is None:
            raise ArenaError(f"arena {self.name} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, +{length}) lies outside the {self.size}-byte arena")


def _region_entry_offset(index: int) -> int:
    return L.AH_REGION_TABLE + index * L.REGION_ENTRY_SIZE


def _prefault(mm: mmap.mmap) -> None:
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # older kernel: touch every page by hand
        pages = np.frombuffer(mm, dtype=np.uint8)
        pages[:: L.PAGE_SIZE] = 0
        del pages


def _write_header(mm: mmap.mmap, size: int, regions: list[Region]) -> None:
    struct.pack_into("<QII", mm, L.AH_MAGIC, L.ARENA_MAGIC, L.ARENA_LAYOUT_VERSION, L.ARENA_STATE_CREATING)
    struct.pack_into("<Q", mm, L.AH_TOTAL_SIZE, size)
    struct.pack_into("<II", mm, L.AH_CREATOR_PID, os.getpid(), os.getuid())
    struct.pack_into("<Q", mm, L.AH_CREATED_NS, time.time_ns())
    struct.pack_into("<I", mm, L.AH_NUM_REGIONS, len(regions))
    for i, r in enumerate(regions):
        struct.pack_into("<IIQQQ", mm, _region_entry_offset(i), r.kind, 0, r.offset, r.size, 0)
    # The state word goes last: an attacher that sees READY sees the whole header.
    # (A store through the mmap is ordered after the stores above on the same thread.)
    struct.pack_into("<I", mm, L.AH_STATE, L.ARENA_STATE_READY)


def _read_header(mm: mmap.mmap, name: str) -> list[Region]:
    magic, version, state = struct.unpack_from("<QII", mm, L.AH_MAGIC)
    if magic != L.ARENA_MAGIC:
        raise ArenaError(f"{name} is not an llmos arena (magic {magic:#018x})")
    if version != L.ARENA_LAYOUT_VERSION:
        raise ArenaError(
            f"arena {name} has layout version {version}; this llmos speaks {L.ARENA_LAYOUT_VERSION}: "
            "restart the instance with this version (`llmos down`, then `llmos up`)"
        )
    if state != L.ARENA_STATE_READY:
        raise ArenaError(f"arena {name} is not ready (its creator is still writing it, or died doing so)")
    (total,) = struct.unpack_from("<Q", mm, L.AH_TOTAL_SIZE)
    if total != len(mm):
        raise ArenaError(f"arena {name} header says {total} bytes but the object has {len(mm)}")
    (count,) = struct.unpack_from("<I", mm, L.AH_NUM_REGIONS)
    if count > L.ARENA_MAX_REGIONS:
        raise ArenaError(f"arena {name} header names {count} regions (corrupt)")
    regions = []
    for i in range(count):
        kind, _flags, offset, size, _used = struct.unpack_from("<IIQQQ", mm, _region_entry_offset(i))
        if offset < L.ARENA_HEADER_SIZE or offset + size > total:
            raise ArenaError(f"arena {name} region {i} [{offset}, +{size}) is out of bounds (corrupt)")
        try:
            regions.append(Region(L.RegionKind(kind), offset, size))
        except ValueError:
            raise ArenaError(f"arena {name} region {i} has unknown kind {kind} (corrupt)") from None
    return regions
