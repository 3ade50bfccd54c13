# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single-producer single-consumer rings of variable-length records in arena memory.

Linked by every process. A ring never parses payloads: a record is an 8-byte header
(u32 length, u32 flags) and the bytes. Head and tail are free-running u64 counters;
records are 8-byte aligned and never straddle the end (a PAD record fills the gap).
Blocking calls spin a bounded time, yield, then park on a futex doorbell with the
handshake of docs/design.md (Rings). Hot functions return status codes under nogil; one
function, `_raise_for`, turns them into exceptions.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_READ,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import os

from llmos.microkernel import layout as L
from llmos.microkernel.errors import Closed, PeerGone, ProtocolError, Timeout, WouldBlock
from llmos.microkernel.stats import DoorbellStats, RingStats

# status codes of the nogil paths
DEF ST_OK = 0
DEF ST_FULL = 1
DEF ST_EMPTY = 2
DEF ST_PEER_GONE = 3
DEF ST_CORRUPT = 4
DEF ST_TOO_BIG = 5

DEF SIDE_PRODUCER = 1
DEF SIDE_CONSUMER = 2

DEF REC_PAD = 1
DEF REC_WAKE = 2
DEF HDR = 8
DEF RING_HDR_SIZE = 1024           # layout.RING_HEADER_SIZE (checked at import)
DEF SLICE_NS = 100000000        # park in slices of at most 100 ms (signals, deadlines)
DEF YIELDS = 3                  # sched_yield calls between spinning and parking

DEFAULT_SPIN_NS = 20000
assert RING_HDR_SIZE == L.RING_HEADER_SIZE
MIN_CAPACITY = L.RING_MIN_CAPACITY
MAX_CAPACITY = L.RING_MAX_CAPACITY

cdef RingHeader _probe_header
cdef Bell _probe_bell


# --- small helpers ---------------------------------------------------------------------

cdef inline uint64_t _align8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline void _ring_bell(Bell *b) noexcept nogil:
    # Pairs with the waiter's announce (sleepers += 1, seq_cst) followed by its re-check:
    # we published before this fence, so either it sees our data or we see it asleep.
    mk_fence_seq_cst()
    if mk_load_seq_cst_u32(&b.sleepers) != 0:
        mk_fetch_add_u32(&b.word, 1)
        mk_fetch_add_u64(&b.wakes, 1)
        mk_futex_wake(&b.word, INT_MAX)


cdef inline bint _readable(RingHeader *h) noexcept nogil:
    # A closed end (the peer's, or our own from another thread) ends the wait too.
    return (mk_load_acquire_u64(&h.tail) != h.head
            or mk_load_acquire_u32(&h.producer_closed) != 0
            or mk_load_acquire_u32(&h.consumer_closed) != 0)


cdef inline bint _writable(RingHeader *h, uint64_t need) noexcept nogil:
    cdef uint64_t used = h.tail - mk_load_acquire_u64(&h.head)
    return (used > h.capacity or h.capacity - used >= need
            or mk_load_acquire_u32(&h.consumer_closed) != 0
            or mk_load_acquire_u32(&h.producer_closed) != 0)


cdef inline bint _any_ready(RingHeader **rings, Py_ssize_t n, uint64_t need, bint writable,
                            Bell *bell, uint32_t word0, bint bell_counts) noexcept nogil:
    cdef Py_ssize_t i
    if writable:
        return _writable(rings[0], need)
    for i in range(n):
        if _readable(rings[i]):
            return True
    return bell_counts and mk_load_acquire_u32(&bell.word) != word0


cdef uint64_t _deadline(object timeout) except? 0:
    if timeout is None:
        return UINT64_MAX
    t = float(timeout)
    if t < 0 or t != t:
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    if t > 1e9:
        return UINT64_MAX
    return mk_now_ns() + <uint64_t>(t * 1e9)


cdef int _wait(Bell *bell, RingHeader **rings, Py_ssize_t n, uint64_t need, bint writable,
               uint64_t deadline, uint64_t spin_ns, bint bell_counts) except -1:
    """Block until a ring is ready (1) or the deadline passes (0).

    Spin up to spin_ns, yield a few times, then park on `bell` in slices of at most
    100 ms, checking signals between slices so Ctrl-C interrupts promptly. spin_ns == 0
    parks at once (after one check), which is the "parked mode" of the benchmark.
    """
    cdef uint64_t now, until, slice_ns
    cdef uint32_t word0, w
    cdef bint ready = False
    cdef int k
    with nogil:
        word0 = mk_load_acquire_u32(&bell.word)
        now = mk_now_ns()
        if deadline <= now:
            until = now
        elif spin_ns < deadline - now:
            until = now + spin_ns
        else:
            until = deadline
        while True:
            if _any_ready(rings, n, need, writable, bell, word0, bell_counts):
                ready = True
                break
            if mk_now_ns() >= until:
                break
            for k in range(16):
                mk_cpu_relax()
        if not ready and spin_ns and mk_now_ns() < deadline:
            for k in range(YIELDS):
                mk_yield()
                if _any_ready(rings, n, need, writable, bell, word0, bell_counts):
                    ready = True
                    break
    if ready:
        return 1
    while True:
        now = mk_now_ns()
        if now >= deadline:
            return 0
        slice_ns = SLICE_NS if deadline - now > SLICE_NS else deadline - now
        with nogil:
            w = mk_load_acquire_u32(&bell.word)
            # Announce, then re-check: pairs with _ring_bell's publish-fence-check.
            mk_fetch_add_u32(&bell.sleepers, 1)
            if writable:
                mk_store_seq_cst_u32(&rings[0].want_space, 1)
            # The re-check below uses acquire loads: a full fence keeps them after the announce.
            mk_fence_seq_cst()
            if _any_ready(rings, n, need, writable, bell, word0, bell_counts):
                ready = True
            else:
                mk_fetch_add_u64(&bell.parks, 1)
                mk_futex_wait(&bell.word, w, <int64_t>slice_ns)
            mk_fetch_sub_u32(&bell.sleepers, 1)
        if ready:
            return 1
        PyErr_CheckSignals()
        if _any_ready(rings, n, need, writable, bell, word0, bell_counts):
            return 1


cdef int _check_capacity(uint64_t capacity) except -1:
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {capacity}")
    return 0


cdef int _get_buffer(object obj, Py_buffer *view, int flags) except -1:
    PyObject_GetBuffer(obj, view, flags)
    return 0


def atomic_add_u64(object buf, Py_ssize_t offset, int64_t delta):
    """Atomically add `delta` to the u64 at `buf[offset]` (8-aligned); return the old value."""
    cdef Py_buffer view
    cdef uint64_t old
    _get_buffer(buf, &view, PyBUF_WRITABLE)
    try:
        if offset < 0 or offset % 8 or offset + 8 > view.len:
            raise ValueError(f"offset {offset} is not an aligned u64 inside the buffer")
        old = mk_fetch_add_u64(<uint64_t *>(<char *>view.buf + offset), <uint64_t>delta)
    finally:
        PyBuffer_Release(&view)
    return old


def now_ns():
    """CLOCK_MONOTONIC in nanoseconds, the clock of every send_ns."""
    return mk_now_ns()


def header_offsets():
    """Byte offsets of the C structs' fields, for the layout test."""
    cdef char *r = <char *>&_probe_header
    cdef char *b = <char *>&_probe_bell
    return {
        "ring_header_size": sizeof(RingHeader),
        "bell_size": sizeof(Bell),
        "RH_MAGIC": <char *>&_probe_header.magic - r,
        "RH_VERSION": <char *>&_probe_header.version - r,
        "RH_CAPACITY": <char *>&_probe_header.capacity - r,
        "RH_GENERATION": <char *>&_probe_header.generation - r,
        "RH_CONSUMER_BELL": <char *>&_probe_header.consumer_bell - r,
        "RH_PRODUCER_BELL": <char *>&_probe_header.producer_bell - r,
        "RH_TAIL": <char *>&_probe_header.tail - r,
        "RH_SENT_RECORDS": <char *>&_probe_header.sent_records - r,
        "RH_SENT_BYTES": <char *>&_probe_header.sent_bytes - r,
        "RH_PRODUCER_CLOSED": <char *>&_probe_header.producer_closed - r,
        "RH_HEAD": <char *>&_probe_header.head - r,
        "RH_RECV_RECORDS": <char *>&_probe_header.recv_records - r,
        "RH_RECV_BYTES": <char *>&_probe_header.recv_bytes - r,
        "RH_CONSUMER_CLOSED": <char *>&_probe_header.consumer_closed - r,
        "RH_WANT_SPACE": <char *>&_probe_header.want_space - r,
        "RH_EMBEDDED_CONSUMER_BELL": <char *>&_probe_header.embedded_consumer_bell - r,
        "RH_EMBEDDED_PRODUCER_BELL": <char *>&_probe_header.embedded_producer_bell - r,
        "RH_NEXT_SEQ": <char *>&_probe_header.next_seq - r,
        "RH_SEQ_VALID": <char *>&_probe_header.seq_valid - r,
        "RH_SEQ_GAPS": <char *>&_probe_header.seq_gaps - r,
        "RH_LAT_COUNT": <char *>&_probe_header.lat_count - r,
        "RH_LAT_SUM_NS": <char *>&_probe_header.lat_sum_ns - r,
        "RH_LAT_MAX_NS": <char *>&_probe_header.lat_max_ns - r,
        "RH_LAT_HIST": <char *>&_probe_header.lat_hist[0] - r,
        "DB_WORD": <char *>&_probe_bell.word - b,
        "DB_SLEEPERS": <char *>&_probe_bell.sleepers - b,
        "DB_PARKS": <char *>&_probe_bell.parks - b,
        "DB_WAKES": <char *>&_probe_bell.wakes - b,
        "DB_OWNER_PID": <char *>&_probe_bell.owner_pid - b,
    }


# --- the one status -> exception map ----------------------------------------------------

cdef int _raise_for(int status, Ring ring, str op) except -1:
    if status == ST_PEER_GONE:
        if op == "send":
            raise PeerGone(f"ring @{ring.offset}: the consumer closed its end")
        raise PeerGone(f"ring @{ring.offset}: the producer closed its end and the ring is drained")
    if status == ST_CORRUPT:
        raise ProtocolError(
            f"ring @{ring.offset}: corrupt record or counters (head {ring.h.head}, "
            f"tail {mk_load_acquire_u64(&ring.h.tail)}, capacity {ring.cap})"
        )
    if status == ST_TOO_BIG:
        raise ValueError(f"record larger than the ring's limit of {ring.max_record} bytes (capacity/2 - 8)")
    if status == ST_FULL:
        raise WouldBlock(f"ring @{ring.offset} is full")
    if status == ST_EMPTY:
        raise WouldBlock(f"ring @{ring.offset} is empty")
    raise AssertionError(f"unknown ring status {status}")


# Outside the cycle collector: a Doorbell or Ring holds a buffer export on the arena's
# memoryview (its Py_buffer), and Cython's generated tp_traverse/tp_clear would report that
# reference and drop it without releasing the export. A session caught in a reference cycle
# then had the arena's memoryview cleared while exports were live, and the process crashed
# later. Neither type can be part of a cycle (their only object field is that memoryview),
# so plain reference counting frees them, and __dealloc__ releases the export properly.
@cython.no_gc
cdef class Doorbell:
    """A process's futex word in the arena. Every ring the process consumes (and every
    ring it is blocked producing into) rings it; `wait` parks on all of them at once."""

    def __cinit__(self):
        self.bell = NULL
        self._has_view = False

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    @staticmethod
    def create(arena):
        """Carve a new doorbell from the arena's ring region."""
        return Doorbell.format(arena, arena.carve(L.RegionKind.RINGS, L.DOORBELL_SIZE, L.CACHE_LINE))

    @staticmethod
    def format(arena, uint64_t offset, owner_pid=None):
        """(Re)initialise the doorbell at `offset` for a new owner."""
        cdef Doorbell bell = Doorbell.attach(arena, offset)
        memset(bell.bell, 0, sizeof(Bell))
        bell.bell.owner_pid = os.getpid() if owner_pid is None else owner_pid
        return bell

    @staticmethod
    def attach(arena, uint64_t offset):
        cdef Doorbell self = Doorbell.__new__(Doorbell)
        _get_buffer(arena.buf, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        if offset % 8 or offset + sizeof(Bell) > <uint64_t>self._view.len:
            raise ValueError(f"doorbell offset {offset} is outside the arena or misaligned")
        self.offset = offset
        self.bell = <Bell *>(<char *>self._view.buf + offset)
        return self

    def ring(self):
        """Wake whoever waits on this bell (a `wait` returns True)."""
        with nogil:
            mk_fetch_add_u32(&self.bell.word, 1)
            _ring_bell(self.bell)

    def wait(self, rings, timeout=None, spin_ns=DEFAULT_SPIN_NS):
        """Park until any of `rings` has a record or a closed producer, or the bell rings.

        Args:
            rings: rings whose consumer doorbell is this bell.
            timeout: seconds, or None to wait forever.
        Returns:
            True when woken, False when the timeout passed.
        """
        cdef Py_ssize_t n = len(rings), i
        cdef RingHeader **hs = <RingHeader **>malloc(max(n, 1) * sizeof(RingHeader *))
        cdef Ring r
        if hs == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                r = rings[i]
                r._check_open(SIDE_CONSUMER)
                if r.cbell != self.bell:
                    raise ValueError(f"ring @{r.offset} rings another doorbell, not this one")
                hs[i] = r.h
            return _wait(self.bell, hs, n, 0, False, _deadline(timeout), spin_ns, True) == 1
        finally:
            free(hs)

    def stats(self):
        return DoorbellStats(
            parks=mk_load_relaxed_u64(&self.bell.parks),
            wakes=mk_load_relaxed_u64(&self.bell.wakes),
            sleepers=mk_load_acquire_u32(&self.bell.sleepers),
        )


cdef class RecvView:
    """`with ring.recv_view() as mv:` a read-only view of the next record, in place.
    The slot is released, and the view invalidated, when the block exits."""

    cdef Ring ring
    cdef object timeout
    cdef uint64_t pos
    cdef uint64_t length
    cdef object mv

    def __enter__(self):
        cdef Ring ring = self.ring
        cdef int st
        ring._check_open(SIDE_CONSUMER)
        if ring._view_open:
            raise RuntimeError("another recv_view of this ring is still open")
        deadline = _deadline(self.timeout)
        while True:
            st = ring._peek(&self.pos, &self.length)
            if st == ST_OK:
                break
            if st != ST_EMPTY:
                _raise_for(st, ring, "recv")
            if not ring._wait_readable(deadline):
                raise Timeout(f"ring @{ring.offset}: no record within {self.timeout} s")
        ring._view_open = True
        self.mv = PyMemoryView_FromMemory(<char *>ring.data + self.pos + HDR, <Py_ssize_t>self.length, PyBUF_READ)
        return self.mv

    def __exit__(self, *exc):
        cdef Ring ring = self.ring
        try:
            self.mv.release()  # BufferError if the caller still holds something derived from it
        finally:
            self.mv = None
            ring._view_open = False
            if ring.h != NULL:
                ring._consume(self.length)
                ring._commit()
            if ring._closed and ring._waiters == 0:
                ring._drop_mapping()
        return False


@cython.no_gc  # see Doorbell
cdef class Ring:
    """One direction of a connection: a single-producer single-consumer record ring.

    A handle may act as producer, consumer, or (in one process) both; `close()` closes
    the side(s) it acted as, or the side named at create/attach. Not thread-safe per
    side: one thread produces, one consumes (libllm serialises its threads).
    """

    def __cinit__(self):
        self.h = NULL
        self._has_view = False
        self._closed = False
        self._view_open = False
        self.spin_ns = DEFAULT_SPIN_NS

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def create(arena, uint64_t capacity, *, consumer_doorbell=None, producer_doorbell=None,
               uint64_t generation=1, side=None, spin_ns=DEFAULT_SPIN_NS):
        """Carve and initialise a ring in the arena's ring region.

        Args:
            capacity: data bytes, a power of two in [64, 2**30]; a record is at most half.
            consumer_doorbell / producer_doorbell: the `Doorbell` of each end's process;
                by default the ring uses doorbells embedded in its own header.
            generation: stamped in the header so a reused ring is never mistaken for an old one.
            side: "producer" or "consumer" to fix which side this handle closes.
        Returns:
            The ring; its `.offset` lets another process `attach`.
        """
        _check_capacity(capacity)
        offset = arena.carve(L.RegionKind.RINGS, L.RING_HEADER_SIZE + capacity, L.CACHE_LINE)
        return Ring.format(arena, offset, capacity, consumer_doorbell=consumer_doorbell,
                           producer_doorbell=producer_doorbell, generation=generation,
                           side=side, spin_ns=spin_ns)

    @staticmethod
    def format(arena, uint64_t offset, uint64_t capacity, *, consumer_doorbell=None,
               producer_doorbell=None, uint64_t generation=1, side=None, spin_ns=DEFAULT_SPIN_NS):
        """(Re)initialise a ring at `offset`, which must span header + capacity bytes.

        The kernel uses it to recycle a retired ring under a new generation; nobody may
        still use the old one (both ends closed).
        """
        cdef Ring self
        cdef RingHeader *h
        _check_capacity(capacity)
        self = Ring.__new__(Ring)
        self._map(arena.buf, offset)
        if offset + L.RING_HEADER_SIZE + capacity > <uint64_t>self._view.len:
            raise ValueError(f"a ring of capacity {capacity} at offset {offset} does not fit the arena")
        h = self.h
        mk_store_release_u32(&h.magic, 0)
        memset(h, 0, L.RING_HEADER_SIZE)
        h.version = L.RING_VERSION
        h.capacity = capacity
        h.generation = generation
        h.consumer_bell = consumer_doorbell.offset if consumer_doorbell is not None else offset + L.RH_EMBEDDED_CONSUMER_BELL
        h.producer_bell = producer_doorbell.offset if producer_doorbell is not None else offset + L.RH_EMBEDDED_PRODUCER_BELL
        # Magic last, with release: an attacher that sees it sees the whole header.
        mk_store_release_u32(&h.magic, L.RING_MAGIC)
        self._bind(generation, side, spin_ns)
        return self

    @staticmethod
    def attach(arena, uint64_t offset, *, generation=None, side=None, spin_ns=DEFAULT_SPIN_NS):
        """Map a ring another process created, checking its header (and generation).

        Raises:
            ProtocolError: no ring at `offset`, or a ring of another generation.
        """
        cdef Ring self = Ring.__new__(Ring)
        self._map(arena.buf, offset)
        self._bind(generation, side, spin_ns)
        return self

    cdef int _map(self, object buf, uint64_t offset) except -1:
        _get_buffer(buf, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        if offset % L.CACHE_LINE or offset + L.RING_HEADER_SIZE > <uint64_t>self._view.len:
            raise ValueError(f"ring offset {offset} is outside the arena or not cache-line aligned")
        self.offset = offset
        self.h = <RingHeader *>(<char *>self._view.buf + offset)
        return 0

    cdef int _bind(self, object generation, object side, uint64_t spin_ns) except -1:
        cdef RingHeader *h = self.h
        cdef uint64_t size = <uint64_t>self._view.len
        if mk_load_acquire_u32(&h.magic) != L.RING_MAGIC or h.version != L.RING_VERSION:
            raise ProtocolError(f"no ring of version {L.RING_VERSION} at offset {self.offset}")
        cap = h.capacity
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or cap & (cap - 1) or self.offset + L.RING_HEADER_SIZE + cap > size:
            raise ProtocolError(f"ring at offset {self.offset} has an invalid capacity {cap}")
        for bell_off in (h.consumer_bell, h.producer_bell):
            if bell_off % 8 or bell_off + sizeof(Bell) > size:
                raise ProtocolError(f"ring at offset {self.offset} names a doorbell outside the arena")
        if generation is not None and h.generation != generation:
            raise ProtocolError(f"ring at offset {self.offset} is generation {h.generation}, expected {generation} (stale)")
        if side not in (None, "producer", "consumer"):
            raise ValueError(f"side must be None, 'producer' or 'consumer', got {side!r}")
        self.cap = cap
        self.mask = cap - 1
        self.max_record = cap // 2 - HDR
        self.data = <uint8_t *>h + RING_HDR_SIZE
        self.cbell = <Bell *>(<char *>self._view.buf + h.consumer_bell)
        self.pbell = <Bell *>(<char *>self._view.buf + h.producer_bell)
        self.cached_head = mk_load_acquire_u64(&h.head)
        self.cached_tail = mk_load_acquire_u64(&h.tail)
        if self.cached_head & 7 or self.cached_tail & 7 or self.cached_tail - self.cached_head > cap:
            raise ProtocolError(f"ring at offset {self.offset} has corrupt counters "
                                f"(head {self.cached_head}, tail {self.cached_tail})")
        self.wtail = self.cached_tail
        self.rhead = self.cached_head
        self._sides = 0 if side is None else (SIDE_PRODUCER if side == "producer" else SIDE_CONSUMER)
        self.spin_ns = spin_ns
        return 0

    # -- the nogil core ---------------------------------------------------------------

    cdef int _push(self, const uint8_t *src, uint64_t length, uint32_t flags) noexcept nogil:
        """Write one record past the published tail; `_publish` makes it visible."""
        cdef RingHeader *h = self.h
        cdef uint64_t tail = self.wtail, pos = tail & self.mask
        cdef uint64_t total = HDR + _align8(length), pad = 0, need, used
        cdef uint32_t *rec
        if length > self.max_record:
            return ST_TOO_BIG
        if mk_load_acquire_u32(&h.consumer_closed):
            return ST_PEER_GONE
        if pos + total > self.cap:
            pad = self.cap - pos
        need = pad + total
        used = tail - self.cached_head
        if used > self.cap or self.cap - used < need:
            self.cached_head = mk_load_acquire_u64(&h.head)  # pairs with the consumer's release of head
            used = tail - self.cached_head
            if used > self.cap:
                return ST_CORRUPT
            if self.cap - used < need:
                return ST_FULL
        if pad:
            rec = <uint32_t *>(self.data + pos)
            rec[0] = <uint32_t>(pad - HDR)
            rec[1] = REC_PAD
            pos = 0
        memcpy(self.data + pos + HDR, src, length)
        rec = <uint32_t *>(self.data + pos)
        rec[0] = <uint32_t>length
        rec[1] = flags
        self.wtail = tail + need
        self.pending_records += 1
        self.pending_bytes += length
        self.pending_wake |= flags & REC_WAKE
        return ST_OK

    cdef void _publish(self) noexcept nogil:
        """Make written records visible, then apply the wake rules once for all of them."""
        cdef RingHeader *h = self.h
        cdef uint64_t old_tail = h.tail, used_before, used_after, half = self.cap >> 1
        if self.wtail == old_tail:
            return
        mk_store_release_u64(&h.tail, self.wtail)  # pairs with the consumer's acquire of tail
        h.sent_records += self.pending_records
        h.sent_bytes += self.pending_bytes
        used_before = old_tail - self.cached_head
        used_after = self.wtail - self.cached_head
        if used_after >= half and used_before < half:
            # Possibly crossing half full: decide on a fresh head, not a stale one.
            self.cached_head = mk_load_acquire_u64(&h.head)
            used_before = old_tail - self.cached_head
            used_after = self.wtail - self.cached_head
        if self.pending_wake or (used_before < half and used_after >= half):
            _ring_bell(self.cbell)
        self.pending_records = 0
        self.pending_bytes = 0
        self.pending_wake = 0

    cdef int _peek(self, uint64_t *pos, uint64_t *length) noexcept nogil:
        """Find the next record past the consumer's private read position."""
        cdef RingHeader *h = self.h
        cdef uint64_t head = self.rhead, avail, p, total
        cdef uint32_t *rec
        cdef uint32_t rlen
        while True:
            if head == self.cached_tail:
                self.cached_tail = mk_load_acquire_u64(&h.tail)  # pairs with the producer's release
                if head == self.cached_tail:
                    if not mk_load_acquire_u32(&h.producer_closed):
                        if self.rhead != h.head:
                            self._commit()  # a skipped PAD must not look like unread data
                        return ST_EMPTY
                    # The producer publishes before it closes: look once more.
                    self.cached_tail = mk_load_acquire_u64(&h.tail)
                    if head == self.cached_tail:
                        return ST_PEER_GONE
            avail = self.cached_tail - head
            if avail > self.cap or avail < HDR or avail & 7:
                return ST_CORRUPT
            p = head & self.mask
            rec = <uint32_t *>(self.data + p)
            rlen = rec[0]
            if rec[1] & REC_PAD:
                if p + HDR + rlen != self.cap or avail < self.cap - p:
                    return ST_CORRUPT
                head += self.cap - p
                self.rhead = head
                continue
            total = HDR + _align8(rlen)
            if rlen > self.max_record or p + total > self.cap or total > avail:
                return ST_CORRUPT
            pos[0] = p
            length[0] = rlen
            return ST_OK

    cdef void _consume(self, uint64_t length) noexcept nogil:
        self.rhead += HDR + _align8(length)
        self.consumed_records += 1
        self.consumed_bytes += length

    cdef void _commit(self) noexcept nogil:
        """Hand consumed space back to the producer, waking it if it asked for space."""
        cdef RingHeader *h = self.h
        if self.rhead == h.head:
            return
        mk_store_release_u64(&h.head, self.rhead)  # pairs with the producer's acquire of head
        h.recv_records += self.consumed_records
        h.recv_bytes += self.consumed_bytes
        self.consumed_records = 0
        self.consumed_bytes = 0
        # Pairs with the producer's "want_space = 1 (seq_cst); re-check head" in _wait.
        mk_fence_seq_cst()
        if mk_load_seq_cst_u32(&h.want_space):
            mk_store_seq_cst_u32(&h.want_space, 0)
            mk_fetch_add_u32(&self.pbell.word, 1)
            _ring_bell(self.pbell)

    cdef int _check_open(self, int side) except -1:
        if self._closed:
            raise Closed(f"ring @{self.offset} was closed by this handle")
        self._sides |= side
        return 0

    cdef int _wait_writable(self, uint64_t length, uint64_t deadline) except -1:
        cdef uint64_t pos = self.wtail & self.mask, total = HDR + _align8(length)
        cdef uint64_t need = total + (self.cap - pos if pos + total > self.cap else 0)
        cdef RingHeader *h = self.h  # a local: close() in another thread may clear self.h
        self._waiters += 1
        try:
            return _wait(self.pbell, &h, 1, need, True, deadline, self.spin_ns, False)
        finally:
            self._waiter_done()

    cdef int _wait_readable(self, uint64_t deadline) except -1:
        cdef RingHeader *h = self.h
        self._waiters += 1
        try:
            return _wait(self.cbell, &h, 1, 0, False, deadline, self.spin_ns, False)
        finally:
            self._waiter_done()

    cdef void _waiter_done(self) noexcept:
        # The mapping outlives every wait on it: the last waiter out of a closed ring drops it.
        self._waiters -= 1
        if self._closed and self._waiters == 0 and not self._view_open:
            self._drop_mapping()

    # -- producer -----------------------------------------------------------------------

    cdef int _push_buffer(self, object data) except -1:
        cdef Py_buffer view
        _get_buffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._push(<const uint8_t *>view.buf, <uint64_t>view.len, 0)
        finally:
            PyBuffer_Release(&view)

    def try_send(self, data, bint wake=True):
        """Append one record if it fits now. Returns False when the ring is full.

        Raises:
            PeerGone: the consumer closed its end.  Closed: this handle was closed.
            ValueError: the record is larger than capacity/2 - 8.
        """
        cdef Py_buffer view
        cdef int st
        self._check_open(SIDE_PRODUCER)
        if type(data) is bytes:
            st = self._push(<const uint8_t *>PyBytes_AS_STRING(data), <uint64_t>PyBytes_GET_SIZE(data), REC_WAKE if wake else 0)
        else:
            _get_buffer(data, &view, PyBUF_SIMPLE)
            try:
                st = self._push(<const uint8_t *>view.buf, <uint64_t>view.len, REC_WAKE if wake else 0)
            finally:
                PyBuffer_Release(&view)
        if st == ST_OK:
            self._publish()
            return True
        if st == ST_FULL:
            return False
        _raise_for(st, self, "send")

    def send(self, data, timeout=None, bint wake=True):
        """Append one record, waiting for space (backpressure) up to `timeout` seconds.

        Raises:
            Timeout: still full at the deadline.  PeerGone, Closed, ValueError as try_send.
        """
        cdef uint64_t deadline
        if self.try_send(data, wake):
            return
        deadline = _deadline(timeout)
        while True:
            if not self._wait_writable(memoryview(data).nbytes if type(data) is not bytes else PyBytes_GET_SIZE(data), deadline):
                raise Timeout(f"ring @{self.offset}: still full after {timeout} s")
            if self.try_send(data, wake):
                return

    def send_many(self, items, timeout=None, bint wake=True):
        """Send every record of `items` in order, blocking on a full ring; one wake at
        the end (plus the half-full wakes). Returns the number sent."""
        cdef Py_ssize_t sent = 0
        cdef uint64_t deadline = 0
        cdef int st
        cdef bint have_deadline = False
        self._check_open(SIDE_PRODUCER)
        try:
            for item in items:
                while True:
                    if type(item) is bytes:
                        st = self._push(<const uint8_t *>PyBytes_AS_STRING(item), <uint64_t>PyBytes_GET_SIZE(item), 0)
                    else:
                        st = self._push_buffer(item)
                    if st == ST_OK:
                        if self.wtail - self.h.tail >= self.cap >> 2:
                            self._publish()  # let the consumer start on a long batch
                        break
                    if st != ST_FULL:
                        _raise_for(st, self, "send")
                    # Full: publish what we have, make sure the consumer drains, wait for space.
                    with nogil:
                        self._publish()
                        _ring_bell(self.cbell)
                    if not have_deadline:
                        deadline = _deadline(timeout)
                        have_deadline = True
                    if not self._wait_writable(memoryview(item).nbytes, deadline):
                        raise Timeout(f"ring @{self.offset}: full for {timeout} s after {sent} records")
                sent += 1
        finally:
            if wake and sent:
                self.pending_wake = REC_WAKE
            with nogil:
                self._publish()
        return sent

    # -- consumer -----------------------------------------------------------------------

    def try_recv(self):
        """The next record as bytes, or None when the ring is empty.

        Raises:
            PeerGone: empty and the producer closed its end.  ProtocolError: corrupt record.
        """
        cdef uint64_t pos, length
        cdef int st
        self._check_open(SIDE_CONSUMER)
        if self._view_open:
            raise RuntimeError("a recv_view of this ring is still open")
        st = self._peek(&pos, &length)
        if st == ST_OK:
            out = PyBytes_FromStringAndSize(<char *>self.data + pos + HDR, <Py_ssize_t>length)
            self._consume(length)
            self._commit()
            return out
        if st == ST_EMPTY:
            return None
        _raise_for(st, self, "recv")

    def recv(self, timeout=None):
        """The next record, waiting up to `timeout` seconds.

        Raises:
            Timeout: nothing arrived in time.  PeerGone, ProtocolError, Closed as try_recv.
        """
        out = self.try_recv()
        if out is not None:
            return out
        deadline = _deadline(timeout)
        while True:
            if not self._wait_readable(deadline):
                raise Timeout(f"ring @{self.offset}: no record within {timeout} s")
            out = self.try_recv()
            if out is not None:
                return out

    def try_recv_many(self, Py_ssize_t max_n):
        """Up to `max_n` records that are ready now (possibly none)."""
        cdef uint64_t pos, length
        cdef int st = ST_OK
        cdef list out = []
        self._check_open(SIDE_CONSUMER)
        if self._view_open:
            raise RuntimeError("a recv_view of this ring is still open")
        while len(out) < max_n:
            st = self._peek(&pos, &length)
            if st != ST_OK:
                break
            out.append(PyBytes_FromStringAndSize(<char *>self.data + pos + HDR, <Py_ssize_t>length))
            self._consume(length)
            if self.rhead - self.h.head >= self.cap >> 2:
                self._commit()  # give the producer room during a long batch
        self._commit()  # one release of head (and one fence) for the whole batch
        if st == ST_EMPTY or st == ST_OK or out:  # an error waits for the next call
            return out
        _raise_for(st, self, "recv")

    def recv_many(self, Py_ssize_t max_n, timeout=None):
        """Wait for at least one record (up to `timeout`), then take up to `max_n`."""
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        out = self.try_recv_many(max_n)
        if out:
            return out
        deadline = _deadline(timeout)
        while True:
            if not self._wait_readable(deadline):
                raise Timeout(f"ring @{self.offset}: no record within {timeout} s")
            out = self.try_recv_many(max_n)
            if out:
                return out

    def recv_view(self, timeout=None):
        """A context manager yielding the next record as a read-only memoryview, zero copy."""
        cdef RecvView v = RecvView.__new__(RecvView)
        v.ring = self
        v.timeout = timeout
        return v

    def wait_readable(self, timeout=None):
        """Block until a record (or a closed producer) is there; False on timeout."""
        self._check_open(SIDE_CONSUMER)
        return self._wait_readable(_deadline(timeout)) == 1

    def note_message(self, uint32_t seq, uint64_t send_ns):
        """Endpoint layer, consumer side: record one message's seq and send time (L_s, L_r)."""
        cdef RingHeader *h = self.h
        cdef uint64_t now = mk_now_ns(), lat = 0
        cdef uint32_t gap
        cdef int bucket = 0
        self._check_open(SIDE_CONSUMER)
        if now > send_ns:
            lat = now - send_ns
        while bucket < 47 and (lat >> (bucket + 1)) != 0:
            bucket += 1
        h.lat_hist[bucket] += 1
        h.lat_count += 1
        h.lat_sum_ns += lat
        if lat > h.lat_max_ns:
            h.lat_max_ns = lat
        if h.seq_valid:
            gap = seq - h.next_seq
            if gap != 0 and gap < 0x80000000u:
                h.seq_gaps += gap
        h.next_seq = seq + 1
        h.seq_valid = 1

    # -- both sides -----------------------------------------------------------------------

    def close(self):
        """Close this handle's side(s); the peer's blocking calls end in PeerGone. Idempotent."""
        if self._closed:
            return
        sides = self._sides or (SIDE_PRODUCER | SIDE_CONSUMER)
        with nogil:
            # Ring both bells: the peer's, and ours, for a thread of ours blocked on this ring.
            if sides & SIDE_PRODUCER:
                mk_store_seq_cst_u32(&self.h.producer_closed, 1)
            if sides & SIDE_CONSUMER:
                mk_store_seq_cst_u32(&self.h.consumer_closed, 1)
            mk_fetch_add_u32(&self.cbell.word, 1)
            _ring_bell(self.cbell)
            mk_fetch_add_u32(&self.pbell.word, 1)
            _ring_bell(self.pbell)
        self._closed = True
        if not self._view_open and self._waiters == 0:
            self._drop_mapping()

    cdef void _drop_mapping(self) noexcept:
        self.h = NULL
        if self._has_view:
            self._has_view = False
            PyBuffer_Release(&self._view)

    def stats(self):
        """Counters from the ring header: records, bytes, fill, seq gaps, latency histogram."""
        cdef RingHeader *h = self.h
        if self._closed:
            raise Closed(f"ring @{self.offset} was closed by this handle")
        tail = mk_load_acquire_u64(&h.tail)
        head = mk_load_acquire_u64(&h.head)
        return RingStats(
            capacity=h.capacity,
            generation=h.generation,
            sent_records=mk_load_relaxed_u64(&h.sent_records),
            sent_bytes=mk_load_relaxed_u64(&h.sent_bytes),
            recv_records=mk_load_relaxed_u64(&h.recv_records),
            recv_bytes=mk_load_relaxed_u64(&h.recv_bytes),
            used_bytes=tail - head,
            producer_closed=bool(mk_load_acquire_u32(&h.producer_closed)),
            consumer_closed=bool(mk_load_acquire_u32(&h.consumer_closed)),
            want_space=bool(mk_load_acquire_u32(&h.want_space)),
            seq_gaps=mk_load_relaxed_u64(&h.seq_gaps),
            latency_count=mk_load_relaxed_u64(&h.lat_count),
            latency_sum_ns=mk_load_relaxed_u64(&h.lat_sum_ns),
            latency_max_ns=mk_load_relaxed_u64(&h.lat_max_ns),
            latency_hist=tuple(mk_load_relaxed_u64(&h.lat_hist[i]) for i in range(48)),
            consumer_bell=DoorbellStats(parks=self.cbell.parks, wakes=self.cbell.wakes, sleepers=self.cbell.sleepers),
            producer_bell=DoorbellStats(parks=self.pbell.parks, wakes=self.pbell.wakes, sleepers=self.pbell.sleepers),
        )

    @property
    def capacity(self):
        return self.cap

    @property
    def max_record_size(self):
        return self.max_record

    @property
    def generation(self):
        return self.h.generation if self.h != NULL else 0

    @property
    def closed(self):
        return self._closed

    @property
    def consumer_doorbell_offset(self):
        self._check_open(0)
        return self.h.consumer_bell

    @property
    def producer_doorbell_offset(self):
        self._check_open(0)
        return self.h.producer_bell

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self._closed else f"capacity={self.cap}"
        return f"<Ring @{self.offset} {state}>"
