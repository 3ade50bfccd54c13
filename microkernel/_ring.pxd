# cython: language_level=3
# The ring's shared structs and the Ring/Doorbell fields. Struct layout must match
# microkernel/layout.py byte for byte (tests/microkernel/test_layout.py checks it).

from cpython.buffer cimport Py_buffer
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "atomics.h" nogil:
    uint64_t mk_load_acquire_u64(const uint64_t *p)
    uint64_t mk_load_relaxed_u64(const uint64_t *p)
    void mk_store_release_u64(uint64_t *p, uint64_t v)
    void mk_store_relaxed_u64(uint64_t *p, uint64_t v)
    uint64_t mk_fetch_add_u64(uint64_t *p, uint64_t v)
    uint32_t mk_load_acquire_u32(const uint32_t *p)
    uint32_t mk_load_seq_cst_u32(const uint32_t *p)
    void mk_store_release_u32(uint32_t *p, uint32_t v)
    void mk_store_seq_cst_u32(uint32_t *p, uint32_t v)
    uint32_t mk_fetch_add_u32(uint32_t *p, uint32_t v)
    uint32_t mk_fetch_sub_u32(uint32_t *p, uint32_t v)
    void mk_fence_seq_cst()
    void mk_cpu_relax()
    uint64_t mk_now_ns()
    int mk_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
    int mk_futex_wake(uint32_t *addr, int count)
    void mk_yield()


# A process's doorbell: 64 bytes, its own cache line.
cdef struct Bell:
    uint32_t word          # futex word, bumped by every ringer
    uint32_t sleepers      # waiters announced (seq_cst) before futex_wait
    uint64_t parks         # futex_wait calls (waiters)
    uint64_t wakes         # futex_wake calls (ringers)
    uint32_t owner_pid
    uint8_t _pad[36]


cdef struct RingHeader:
    # creator-only, immutable after create (magic is stored last, with release)
    uint32_t magic
    uint32_t version
    uint64_t capacity
    uint64_t generation
    uint64_t consumer_bell     # arena offsets of the doorbells this ring rings
    uint64_t producer_bell
    uint8_t _pad0[24]
    # producer-only
    uint64_t tail
    uint64_t sent_records
    uint64_t sent_bytes
    uint32_t producer_closed
    uint8_t _pad1[36]
    # consumer-only
    uint64_t head
    uint64_t recv_records
    uint64_t recv_bytes
    uint32_t consumer_closed
    uint8_t _pad2[36]
    # set by a producer that found the ring full, cleared by the consumer that frees space
    uint32_t want_space
    uint8_t _pad3[60]
    # doorbells used when the creator names no process doorbell
    Bell embedded_consumer_bell
    Bell embedded_producer_bell
    # consumer-only, fed by the Endpoint layer (note_message)
    uint32_t next_seq
    uint32_t seq_valid
    uint64_t seq_gaps
    uint64_t lat_count
    uint64_t lat_sum_ns
    uint64_t lat_max_ns
    uint8_t _pad4[24]
    uint64_t lat_hist[48]


cdef class Doorbell:
    cdef Bell *bell
    cdef Py_buffer _view
    cdef bint _has_view
    cdef readonly uint64_t offset
    cdef object _arena_buf


cdef class Ring:
    cdef RingHeader *h
    cdef uint8_t *data
    cdef Bell *cbell               # the consumer's doorbell
    cdef Bell *pbell               # the producer's doorbell
    cdef uint64_t cap
    cdef uint64_t mask
    cdef uint64_t max_record
    cdef uint64_t cached_head      # producer's last view of head (refreshed when short of space)
    cdef uint64_t cached_tail      # consumer's last view of tail (refreshed when empty)
    # Producer-private: records written past the published tail, published once per call.
    cdef uint64_t wtail
    cdef uint64_t pending_records
    cdef uint64_t pending_bytes
    cdef uint32_t pending_wake
    # Consumer-private: records read past the committed head, committed once per call.
    cdef uint64_t rhead
    cdef uint64_t consumed_records
    cdef uint64_t consumed_bytes
    cdef Py_buffer _view
    cdef bint _has_view
    cdef bint _closed
    cdef bint _view_open           # a recv_view slot is held
    cdef int _sides                # SIDE_* bits this handle has acted as
    cdef int _waiters              # threads inside a blocking wait on this handle
    cdef readonly uint64_t offset
    cdef public uint64_t spin_ns   # bounded spin before yielding and parking
    cdef object _arena_buf

    cdef int _push(self, const uint8_t *src, uint64_t length, uint32_t flags) noexcept nogil
    cdef void _publish(self) noexcept nogil
    cdef int _push_buffer(self, object data) except -1
    cdef int _peek(self, uint64_t *pos, uint64_t *length) noexcept nogil
    cdef void _consume(self, uint64_t length) noexcept nogil
    cdef void _commit(self) noexcept nogil
    cdef int _check_open(self, int side) except -1
    cdef int _map(self, object buf, uint64_t offset) except -1
    cdef int _bind(self, object generation, object side, uint64_t spin_ns) except -1
    cdef void _drop_mapping(self) noexcept
    cdef int _wait_writable(self, uint64_t length, uint64_t deadline) except -1
    cdef int _wait_readable(self, uint64_t deadline) except -1
    cdef void _waiter_done(self) noexcept
