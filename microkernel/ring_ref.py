"""A pure-Python ring with the same memory layout, API and semantics as `_ring.Ring`.

The oracle the tests run every ring test against (and the hypothesis model checks the
Cython ring with). Single-process use only: Python gives no atomics, so it polls
instead of parking and never rings doorbells.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

from llmos.microkernel import layout as L
from llmos.microkernel.errors import Closed, PeerGone, ProtocolError, Timeout
from llmos.microkernel.stats import DoorbellStats, RingStats

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_REC = struct.Struct("<II")
_POLL_S = 0.0002
_PRODUCER, _CONSUMER = 1, 2

Buffer = bytes | bytearray | memoryview


class RefRing:
    """See `microkernel._ring.Ring`; this class mirrors it line for line in Python."""

    def __init__(self, buf: memoryview, offset: int, generation: int | None, side: str | None) -> None:
        if offset % L.CACHE_LINE or offset + L.RING_HEADER_SIZE > len(buf):
            raise ValueError(f"ring offset {offset} is outside the arena or not cache-line aligned")
        self._buf: memoryview | None = buf
        self.offset = offset
        if self._u32(L.RH_MAGIC) != L.RING_MAGIC or self._u32(L.RH_VERSION) != L.RING_VERSION:
            raise ProtocolError(f"no ring of version {L.RING_VERSION} at offset {offset}")
        cap = self._u64(L.RH_CAPACITY)
        if not L.is_power_of_two(cap) or not L.RING_MIN_CAPACITY <= cap <= L.RING_MAX_CAPACITY or offset + L.ring_footprint(cap) > len(buf):
            raise ProtocolError(f"ring at offset {offset} has an invalid capacity {cap}")
        for bell in (self._u64(L.RH_CONSUMER_BELL), self._u64(L.RH_PRODUCER_BELL)):
            if bell % 8 or bell + L.DOORBELL_SIZE > len(buf):
                raise ProtocolError(f"ring at offset {offset} names a doorbell outside the arena")
        if generation is not None and self._u64(L.RH_GENERATION) != generation:
            raise ProtocolError(
                f"ring at offset {offset} is generation {self._u64(L.RH_GENERATION)}, expected {generation} (stale)"
            )
        if side not in (None, "producer", "consumer"):
            raise ValueError(f"side must be None, 'producer' or 'consumer', got {side!r}")
        self.cap = cap
        self.max_record = cap // 2 - L.RECORD_HEADER_SIZE
        self._data = offset + L.RING_HEADER_SIZE
        self._sides = 0 if side is None else (_PRODUCER if side == "producer" else _CONSUMER)
        self._closed = False
        self._view_open = False

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        arena: Any,
        capacity: int,
        *,
        consumer_doorbell: Any = None,
        producer_doorbell: Any = None,
        generation: int = 1,
        side: str | None = None,
        spin_ns: int = 0,
    ) -> RefRing:
        if not L.is_power_of_two(capacity) or not L.RING_MIN_CAPACITY <= capacity <= L.RING_MAX_CAPACITY:
            raise ValueError(
                f"ring capacity must be a power of two in [{L.RING_MIN_CAPACITY}, {L.RING_MAX_CAPACITY}], got {capacity}"
            )
        offset = arena.carve(L.RegionKind.RINGS, L.ring_footprint(capacity), L.CACHE_LINE)
        buf: memoryview = arena.buf
        buf[offset : offset + L.RING_HEADER_SIZE] = bytes(L.RING_HEADER_SIZE)
        _U32.pack_into(buf, offset + L.RH_VERSION, L.RING_VERSION)
        _U64.pack_into(buf, offset + L.RH_CAPACITY, capacity)
        _U64.pack_into(buf, offset + L.RH_GENERATION, generation)
        cbell = consumer_doorbell.offset if consumer_doorbell is not None else offset + L.RH_EMBEDDED_CONSUMER_BELL
        pbell = producer_doorbell.offset if producer_doorbell is not None else offset + L.RH_EMBEDDED_PRODUCER_BELL
        _U64.pack_into(buf, offset + L.RH_CONSUMER_BELL, cbell)
        _U64.pack_into(buf, offset + L.RH_PRODUCER_BELL, pbell)
        _U32.pack_into(buf, offset + L.RH_MAGIC, L.RING_MAGIC)
        return cls(buf, offset, generation, side)

    @classmethod
    def attach(
        cls, arena: Any, offset: int, *, generation: int | None = None, side: str | None = None, spin_ns: int = 0
    ) -> RefRing:
        return cls(arena.buf, offset, generation, side)

    # -- field access --------------------------------------------------------------------

    def _mem(self) -> memoryview:
        assert self._buf is not None
        return self._buf

    def _u32(self, field: int) -> int:
        value: int = _U32.unpack_from(self._mem(), self.offset + field)[0]
        return value

    def _u64(self, field: int) -> int:
        value: int = _U64.unpack_from(self._mem(), self.offset + field)[0]
        return value

    def _set32(self, field: int, value: int) -> None:
        _U32.pack_into(self._mem(), self.offset + field, value)

    def _set64(self, field: int, value: int) -> None:
        _U64.pack_into(self._mem(), self.offset + field, value & 0xFFFF_FFFF_FFFF_FFFF)

    def _check_open(self, side: int) -> None:
        if self._closed:
            raise Closed(f"ring @{self.offset} was closed by this handle")
        self._sides |= side

    # -- core ------------------------------------------------------------------------

    def _push(self, data: Buffer) -> bool:
        length = len(memoryview(data).cast("B"))
        if length > self.max_record:
            raise ValueError(f"record larger than the ring's limit of {self.max_record} bytes (capacity/2 - 8)")
        if self._u32(L.RH_CONSUMER_CLOSED):
            raise PeerGone(f"ring @{self.offset}: the consumer closed its end")
        tail, head = self._u64(L.RH_TAIL), self._u64(L.RH_HEAD)
        used = tail - head
        if used > self.cap or used < 0:
            raise ProtocolError(f"ring @{self.offset}: corrupt counters (head {head}, tail {tail})")
        pos = tail % self.cap
        total = L.RECORD_HEADER_SIZE + L.align_up(length, L.RECORD_ALIGN)
        pad = self.cap - pos if pos + total > self.cap else 0
        if self.cap - used < pad + total:
            return False
        mem = self._mem()
        if pad:
            _REC.pack_into(mem, self._data + pos, pad - L.RECORD_HEADER_SIZE, L.REC_PAD)
            pos = 0
        start = self._data + pos + L.RECORD_HEADER_SIZE
        mem[start : start + length] = bytes(data)
        _REC.pack_into(mem, self._data + pos, length, 0)
        self._set64(L.RH_TAIL, tail + pad + total)
        self._set64(L.RH_SENT_RECORDS, self._u64(L.RH_SENT_RECORDS) + 1)
        self._set64(L.RH_SENT_BYTES, self._u64(L.RH_SENT_BYTES) + length)
        return True

    def _peek(self) -> tuple[int, int] | None:
        """(pos, length) of the next record; None when empty; PeerGone when drained+closed."""
        mem = self._mem()
        while True:
            head, tail = self._u64(L.RH_HEAD), self._u64(L.RH_TAIL)
            if head == tail:
                if self._u32(L.RH_PRODUCER_CLOSED):
                    raise PeerGone(f"ring @{self.offset}: the producer closed its end and the ring is drained")
                return None
            avail = tail - head
            if avail > self.cap or avail < L.RECORD_HEADER_SIZE or avail % 8:
                raise ProtocolError(f"ring @{self.offset}: corrupt counters (head {head}, tail {tail})")
            pos = head % self.cap
            length, flags = _REC.unpack_from(mem, self._data + pos)
            if flags & L.REC_PAD:
                if pos + L.RECORD_HEADER_SIZE + length != self.cap or avail < self.cap - pos:
                    raise ProtocolError(f"ring @{self.offset}: corrupt padding record at {pos}")
                self._set64(L.RH_HEAD, head + self.cap - pos)
                continue
            total = L.RECORD_HEADER_SIZE + L.align_up(length, L.RECORD_ALIGN)
            if length > self.max_record or pos + total > self.cap or total > avail:
                raise ProtocolError(f"ring @{self.offset}: corrupt record length {length} at {pos}")
            return pos, length

    def _release(self, length: int) -> None:
        total = L.RECORD_HEADER_SIZE + L.align_up(length, L.RECORD_ALIGN)
        self._set64(L.RH_HEAD, self._u64(L.RH_HEAD) + total)
        self._set64(L.RH_RECV_RECORDS, self._u64(L.RH_RECV_RECORDS) + 1)
        self._set64(L.RH_RECV_BYTES, self._u64(L.RH_RECV_BYTES) + length)
        self._set32(L.RH_WANT_SPACE, 0)

    def _poll(self, ready: Any, timeout: float | None, what: str) -> None:
        if timeout is not None and (timeout < 0 or timeout != timeout):
            raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"ring @{self.offset}: {what} within {timeout} s")
            time.sleep(_POLL_S)

    # -- producer --------------------------------------------------------------------

    def try_send(self, data: Buffer, wake: bool = True) -> bool:
        self._check_open(_PRODUCER)
        return self._push(data)

    def send(self, data: Buffer, timeout: float | None = None, wake: bool = True) -> None:
        self._check_open(_PRODUCER)
        if self._push(data):
            return
        self._set32(L.RH_WANT_SPACE, 1)
        self._poll(lambda: self._push(data), timeout, "still full")

    def send_many(self, items: Iterable[Buffer], timeout: float | None = None, wake: bool = True) -> int:
        sent = 0
        for item in items:
            self.send(item, timeout, wake=False)
            sent += 1
        return sent

    # -- consumer ----------------------------------------------------------------------

    def try_recv(self) -> bytes | None:
        self._check_open(_CONSUMER)
        if self._view_open:
            raise RuntimeError("a recv_view of this ring is still open")
        slot = self._peek()
        if slot is None:
            return None
        pos, length = slot
        start = self._data + pos + L.RECORD_HEADER_SIZE
        out = bytes(self._mem()[start : start + length])
        self._release(length)
        return out

    def recv(self, timeout: float | None = None) -> bytes:
        box: list[bytes] = []

        def ready() -> bool:
            got = self.try_recv()
            if got is None:
                return False
            box.append(got)
            return True

        self._poll(ready, timeout, "no record")
        return box[0]

    def try_recv_many(self, max_n: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < max_n:
            try:
                got = self.try_recv()
            except PeerGone:
                if out:
                    return out
                raise
            if got is None:
                break
            out.append(got)
        return out

    def recv_many(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        first = self.recv(timeout)
        return [first, *self.try_recv_many(max_n - 1)]

    @contextlib.contextmanager
    def recv_view(self, timeout: float | None = None) -> Iterator[memoryview]:
        self._check_open(_CONSUMER)
        if self._view_open:
            raise RuntimeError("another recv_view of this ring is still open")
        box: list[tuple[int, int]] = []

        def ready() -> bool:
            slot = self._peek()
            if slot is not None:
                box.append(slot)
            return slot is not None

        self._poll(ready, timeout, "no record")
        pos, length = box[0]
        start = self._data + pos + L.RECORD_HEADER_SIZE
        view = self._mem()[start : start + length].toreadonly()
        self._view_open = True
        try:
            yield view
        finally:
            view.release()
            self._view_open = False
            if self._buf is not None:
                self._release(length)

    def wait_readable(self, timeout: float | None = None) -> bool:
        self._check_open(_CONSUMER)
        try:
            self._poll(lambda: self._u64(L.RH_TAIL) != self._u64(L.RH_HEAD) or self._u32(L.RH_PRODUCER_CLOSED), timeout, "")
        except Timeout:
            return False
        return True

    def note_message(self, seq: int, send_ns: int) -> None:
        self._check_open(_CONSUMER)
        lat = max(0, time.monotonic_ns() - send_ns)
        bucket = min(max(lat.bit_length() - 1, 0), L.LATENCY_BUCKETS - 1)
        hist = L.RH_LAT_HIST + 8 * bucket
        self._set64(hist, self._u64(hist) + 1)
        self._set64(L.RH_LAT_COUNT, self._u64(L.RH_LAT_COUNT) + 1)
        self._set64(L.RH_LAT_SUM_NS, self._u64(L.RH_LAT_SUM_NS) + lat)
        self._set64(L.RH_LAT_MAX_NS, max(self._u64(L.RH_LAT_MAX_NS), lat))
        if self._u32(L.RH_SEQ_VALID):
            gap = (seq - self._u32(L.RH_NEXT_SEQ)) & 0xFFFF_FFFF
            if 0 < gap < 0x8000_0000:
                self._set64(L.RH_SEQ_GAPS, self._u64(L.RH_SEQ_GAPS) + gap)
        self._set32(L.RH_NEXT_SEQ, (seq + 1) & 0xFFFF_FFFF)
        self._set32(L.RH_SEQ_VALID, 1)

    # -- both sides ----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        sides = self._sides or (_PRODUCER | _CONSUMER)
        if sides & _PRODUCER:
            self._set32(L.RH_PRODUCER_CLOSED, 1)
        if sides & _CONSUMER:
            self._set32(L.RH_CONSUMER_CLOSED, 1)
        self._closed = True
        if not self._view_open:
            self._buf = None

    def stats(self) -> RingStats:
        if self._closed:
            raise Closed(f"ring @{self.offset} was closed by this handle")
        mem = self._mem()

        def bell(field: int) -> DoorbellStats:
            at = self._u64(field)
            return DoorbellStats(
                parks=_U64.unpack_from(mem, at + L.DB_PARKS)[0],
                wakes=_U64.unpack_from(mem, at + L.DB_WAKES)[0],
                sleepers=_U32.unpack_from(mem, at + L.DB_SLEEPERS)[0],
            )

        return RingStats(
            capacity=self.cap,
            generation=self._u64(L.RH_GENERATION),
            sent_records=self._u64(L.RH_SENT_RECORDS),
            sent_bytes=self._u64(L.RH_SENT_BYTES),
            recv_records=self._u64(L.RH_RECV_RECORDS),
            recv_bytes=self._u64(L.RH_RECV_BYTES),
            used_bytes=self._u64(L.RH_TAIL) - self._u64(L.RH_HEAD),
            producer_closed=bool(self._u32(L.RH_PRODUCER_CLOSED)),
            consumer_closed=bool(self._u32(L.RH_CONSUMER_CLOSED)),
            want_space=bool(self._u32(L.RH_WANT_SPACE)),
            seq_gaps=self._u64(L.RH_SEQ_GAPS),
            latency_count=self._u64(L.RH_LAT_COUNT),
            latency_sum_ns=self._u64(L.RH_LAT_SUM_NS),
            latency_max_ns=self._u64(L.RH_LAT_MAX_NS),
            latency_hist=tuple(self._u64(L.RH_LAT_HIST + 8 * i) for i in range(L.LATENCY_BUCKETS)),
            consumer_bell=bell(L.RH_CONSUMER_BELL),
            producer_bell=bell(L.RH_PRODUCER_BELL),
        )

    @property
    def capacity(self) -> int:
        return self.cap

    @property
    def max_record_size(self) -> int:
        return self.max_record

    @property
    def generation(self) -> int:
        return self._u64(L.RH_GENERATION) if self._buf is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RefRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RefRing @{self.offset} {'closed' if self._closed else f'capacity={self.cap}'}>"
