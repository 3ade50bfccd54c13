"""SegmentAllocator: variable-size extents of the SEGMENTS region, best fit, free neighbours coalesced.

Runs inside the memory server. Owns the segment table in ALLOC_TABLES (one entry per used
or free extent: the boundary tags), handing clients (segment id, generation) handles and
never raw offsets; only `resolve` maps a checked handle to arena bytes. Every table write
is ordered so a crash leaves at worst a gap, which `rebuild()` turns back into free space.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass

import numpy as np

from llmos.microkernel import layout as L
from llmos.microkernel.errors import ArenaError, InvalidRequest, Overloaded
from llmos.servers.memory._validate import U32_MAX, as_endpoint_id, as_in_range
from llmos.servers.memory.quotas import INSTANCE_ID, QuotaConfig
from llmos.servers.memory.tables import MemoryTables, SegmentState

UNUSED, FREE, USED = SegmentState.UNUSED, SegmentState.FREE, SegmentState.USED


@dataclass(slots=True, frozen=True)
class SegmentHandle:
    """What a client holds: valid until the segment is freed, then stale forever."""

    segment_id: int
    generation: int


@dataclass(slots=True, frozen=True)
class SegmentInfo:
    handle: SegmentHandle
    offset: int  # arena offset: for servers, never sent to clients
    size: int  # bytes reserved (a multiple of the alignment)
    requested_bytes: int
    owner_id: int
    client_id: int


@dataclass(slots=True, frozen=True)
class SegmentStats:
    total_bytes: int
    num_segments: int
    used_bytes: int
    requested_bytes: int
    free_bytes: int
    largest_free: int
    num_free_extents: int

    @property
    def external_fragmentation(self) -> float:
        """F: 1 - largest free extent / total free bytes (0 when nothing is free)."""
        return 1.0 - self.largest_free / self.free_bytes if self.free_bytes else 0.0


@dataclass(slots=True, frozen=True)
class SegmentSnapshot:
    table: bytes
    by_start: tuple[tuple[int, int], ...]
    by_end: tuple[tuple[int, int], ...]
    free_index: tuple[tuple[int, int, int], ...]
    spare_ids: tuple[int, ...]
    client_bytes: tuple[tuple[int, int], ...]
    num_segments: int


class SegmentAllocator:
    def __init__(self, tables: MemoryTables, quotas: QuotaConfig | None = None) -> None:
        self.tables = tables
        self.quotas = quotas if quotas is not None else QuotaConfig()
        g = tables.geometry
        self.total_bytes = g.segment_bytes
        self.align = g.segment_align
        self.max_segments = g.max_segments
        self.num_entries = g.num_segment_entries
        self.region_offset = tables.segments_region_offset
        seg = tables.segments
        self._offset, self._size, self._requested = seg["offset"], seg["size"], seg["requested"]
        self._state, self._owner, self._client = seg["state"], seg["owner"], seg["client"]
        self._generation, self._flags = seg["generation"], seg["flags"]
        self.num_repairs = self.rebuild()

    # -- rebuild -----------------------------------------------------------------------

    def rebuild(self) -> int:
        """Recompute the boundary tags and free index from the table; returns repairs made.

        Raises:
            ArenaError: extents overlap or are misaligned: the table is corrupt.
        """
        repairs = self._repair_table()
        self._by_start: dict[int, int] = {}
        self._by_end: dict[int, int] = {}
        self._free_index: list[tuple[int, int, int]] = []  # (size, offset, entry), sorted
        self._client_bytes: Counter[int] = Counter()
        self._num_used = 0
        for entry in np.flatnonzero(self._state != UNUSED).tolist():
            offset, size = int(self._offset[entry]), int(self._size[entry])
            self._by_start[offset] = entry
            self._by_end[offset + size] = entry
            if self._state[entry] == FREE:
                self._free_index.append((size, offset, entry))
            else:
                self._num_used += 1
                client = int(self._client[entry])
                if client != INSTANCE_ID:
                    self._client_bytes[client] += size
        self._free_index.sort()
        self._spare: list[int] = np.flatnonzero(self._state == UNUSED)[::-1].tolist()
        return repairs

    def _repair_table(self) -> int:
        """Fix what an interrupted operation leaves: gaps, adjacent free extents, bad states."""
        state = self._state
        bad = np.flatnonzero(~np.isin(state, [int(s) for s in SegmentState]))
        state[bad] = UNUSED
        repairs = len(bad)
        live = np.flatnonzero(state != UNUSED)
        live = live[np.argsort(self._offset[live], kind="stable")].tolist()
        extents: list[int] = []
        expected = 0
        for entry in live:
            offset, size = int(self._offset[entry]), int(self._size[entry])
            if (
                size == 0
                or offset % self.align
                or size % self.align
                or offset + size > self.total_bytes
            ):
                raise ArenaError(
                    f"segment table entry {entry} [{offset}, +{size}) is invalid (corrupt)"
                )
            if offset < expected:
                raise ArenaError(f"segment table entry {entry} overlaps its neighbour (corrupt)")
            if offset > expected:  # a gap: bytes a crash left unaccounted for
                extents.append(self._new_free_entry(expected, offset - expected))
                repairs += 1
            extents.append(entry)
            expected = offset + size
        if expected < self.total_bytes:
            extents.append(self._new_free_entry(expected, self.total_bytes - expected))
            repairs += 1
        previous = -1
        for entry in extents:
            if previous >= 0 and state[previous] == FREE and state[entry] == FREE:
                self._size[previous] += self._size[entry]
                state[entry] = UNUSED
                repairs += 1
            else:
                previous = entry
        return repairs

    def _new_free_entry(self, offset: int, size: int) -> int:
        spare = np.flatnonzero(self._state == UNUSED)
        if not len(spare):
            raise ArenaError("segment table has a gap but no spare entry to describe it (corrupt)")
        entry = int(spare[0])
        self._offset[entry], self._size[entry], self._requested[entry] = offset, size, 0
        self._state[entry] = FREE
        return entry

    # -- queries -----------------------------------------------------------------------

    @property
    def num_segments(self) -> int:
        return self._num_used

    def client_bytes(self, client_id: int) -> int:
        return self._client_bytes[as_endpoint_id(client_id, "client id")]

    def can_allocate(self, size: int, client_id: int = INSTANCE_ID) -> bool:
        rounded = self._rounded(size)
        client = as_endpoint_id(client_id, "client id")
        return (
            self.quotas.can_use_segment_bytes(client, self._client_bytes[client], rounded)
            and self._num_used < self.max_segments
            and bool(self._free_index)
            and self._largest_free() >= rounded
        )

    def resolve(self, handle: SegmentHandle, owner_id: int) -> SegmentInfo:
        """Check a handle and who presents it. Segments of owner 0 (the instance, e.g. the
        shared weights) resolve for every endpoint; any other only for its owner.

        Raises:
            InvalidRequest: malformed, stale or unknown handle, or not the owner's.
        """
        owner = as_endpoint_id(owner_id, "owner id")
        info = self.lookup(handle)
        if info.owner_id not in (owner, INSTANCE_ID):
            raise InvalidRequest(f"segment {info.handle.segment_id} does not belong to endpoint {owner}")
        return info

    def lookup(self, handle: SegmentHandle) -> SegmentInfo:
        """Where a live segment lies, whoever owns it (`resolve` adds the owner check).

        Raises:
            InvalidRequest: malformed, stale or unknown handle.
        """
        entry = self._check_handle(handle)
        return SegmentInfo(
            SegmentHandle(entry, int(self._generation[entry])),
            self.region_offset + int(self._offset[entry]),
            int(self._size[entry]),
            int(self._requested[entry]),
            int(self._owner[entry]),
            int(self._client[entry]),
        )

    def owner_ids(self) -> set[int]:
        return set(np.unique(self._owner[self._state == USED]).tolist())

    # -- acts --------------------------------------------------------------------------

    def allocate(self, size: int, owner_id: int, client_id: int = INSTANCE_ID) -> SegmentHandle:
        """Reserve `size` bytes (rounded up to the alignment) from the best-fitting free extent.

        Raises:
            InvalidRequest: a bad size or id. QuotaExceeded: over the client's byte quota.
            Overloaded: the segment table is full or no free extent is large enough.
        """
        rounded = self._rounded(size)
        owner = as_endpoint_id(owner_id, "owner id")
        client = as_endpoint_id(client_id, "client id")
        self.quotas.check_segment_bytes(client, self._client_bytes[client], rounded)
        if self._num_used >= self.max_segments:
            raise Overloaded(f"segment table full: {self._num_used} segments is the limit")
        i = bisect_left(self._free_index, (rounded, -1, -1))
        if i == len(self._free_index):
            stats = self.stats()
            raise Overloaded(
                f"no free extent of {rounded} bytes: the largest is {stats.largest_free} of "
                f"{stats.free_bytes} free bytes (fragmentation {stats.external_fragmentation:.2f})"
            )
        free_size, offset, entry = self._free_index.pop(i)
        if free_size == rounded:
            used = entry
        else:
            used = self._spare.pop()
            # Shrink the free extent first: a crash here leaves a gap, never an overlap.
            rest = offset + rounded
            del self._by_start[offset]
            self._offset[entry], self._size[entry] = rest, free_size - rounded
            self._by_start[rest] = entry
            insort(self._free_index, (free_size - rounded, rest, entry))
            self._offset[used], self._size[used] = offset, rounded
            self._by_start[offset] = used
            self._by_end[offset + rounded] = used
        self._requested[used] = int(size)
        self._owner[used], self._client[used], self._flags[used] = owner, client, 0
        self._generation[used] = (int(self._generation[used]) + 1) & U32_MAX
        self._state[used] = USED  # last: until now the bytes are not handed out
        self._num_used += 1
        if client != INSTANCE_ID:
            self._client_bytes[client] += rounded
        return SegmentHandle(used, int(self._generation[used]))

    def free(self, handle: SegmentHandle, owner_id: int) -> int:
        """Free a segment its owner presents; returns the bytes released."""
        owner = as_endpoint_id(owner_id, "owner id")
        entry = self._check_handle(handle)
        if self._owner[entry] != owner:
            raise InvalidRequest(f"segment {entry} does not belong to endpoint {owner}")
        return self._release(entry)

    def free_owner(self, owner_id: int) -> tuple[int, int]:
        """Free every segment of `owner_id`; returns (segments, bytes).

        Raises:
            InvalidRequest: owner 0, the instance, is never reclaimed.
        """
        owner = as_endpoint_id(owner_id, "owner id")
        if owner == INSTANCE_ID:
            raise InvalidRequest("owner 0 is the instance: its segments are never reclaimed")
        entries = np.flatnonzero((self._state == USED) & (self._owner == owner)).tolist()
        return len(entries), sum(self._release(e) for e in entries)

    # -- reports -----------------------------------------------------------------------

    def stats(self) -> SegmentStats:
        used = self._state == USED
        return SegmentStats(
            self.total_bytes,
            self._num_used,
            int(self._size[used].sum()),
            int(self._requested[used].sum()),
            sum(size for size, _, _ in self._free_index),
            self._largest_free(),
            len(self._free_index),
        )

    def snapshot(self) -> SegmentSnapshot:
        return SegmentSnapshot(
            self.tables.segments.tobytes(),
            tuple(sorted(self._by_start.items())),
            tuple(sorted(self._by_end.items())),
            tuple(self._free_index),
            tuple(sorted(self._spare)),
            tuple(sorted((c, n) for c, n in self._client_bytes.items() if n)),
            self._num_used,
        )

    # -- internals ---------------------------------------------------------------------

    def _rounded(self, size: object) -> int:
        if not self.total_bytes:
            raise InvalidRequest("this instance has no segment region")
        return L.align_up(as_in_range(size, "segment size", 1, self.total_bytes), self.align)

    def _largest_free(self) -> int:
        return max((size for size, _, _ in self._free_index[-1:]), default=0)

    def _check_handle(self, handle: object) -> int:
        if not isinstance(handle, SegmentHandle):
            raise InvalidRequest(f"a segment handle is expected, got {type(handle).__name__}")
        if not self.num_entries:
            raise InvalidRequest("this instance has no segment region")
        entry = as_in_range(handle.segment_id, "segment id", 0, self.num_entries - 1)
        generation = as_in_range(handle.generation, "segment generation", 0, U32_MAX)
        if self._state[entry] != USED or self._generation[entry] != generation:
            raise InvalidRequest(f"segment handle ({entry}, {generation}) is stale or unknown")
        return entry

    def _release(self, entry: int) -> int:
        offset, size = int(self._offset[entry]), int(self._size[entry])
        client = int(self._client[entry])
        if client != INSTANCE_ID:
            self._client_bytes[client] -= size
            if not self._client_bytes[client]:
                del self._client_bytes[client]
        self._num_used -= 1
        self._state[entry] = FREE
        # Coalesce. Each neighbour is retired (UNUSED) before the survivor grows over it,
        # so an interruption leaves a gap or two adjacent free extents: both repairable.
        end = offset + size
        after = self._by_start.get(end)
        if after is not None and self._state[after] == FREE:
            after_size = int(self._size[after])
            self._unindex_free(after_size, end, after)
            del self._by_start[end]
            del self._by_end[end]
            self._state[after] = UNUSED
            self._spare.append(after)
            end += after_size
            self._size[entry] = end - offset
            self._by_end[end] = entry
        before = self._by_end.get(offset)
        if before is not None and self._state[before] == FREE:
            start = int(self._offset[before])
            self._unindex_free(offset - start, start, before)
            del self._by_start[offset]
            del self._by_end[offset]
            self._state[entry] = UNUSED
            self._spare.append(entry)
            self._size[before] = end - start
            self._by_end[end] = before
            entry, offset = before, start
        insort(self._free_index, (end - offset, offset, entry))
        return size

    def _unindex_free(self, size: int, offset: int, entry: int) -> None:
        i = bisect_left(self._free_index, (size, offset, entry))
        assert self._free_index[i] == (size, offset, entry), "free index out of step with the table"
        del self._free_index[i]
