# cython: language_level=3, boundscheck=False, wraparound=False
"""C ping-pong over one shared word: the floor the ring's round trip is judged against.

Benchmark code only. `parked=True` waits in futex_wait every time (the floor for the
ring's parked mode); `parked=False` spins with a CPU pause (the floor for spin mode).
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t, uint64_t

import numpy as np


cdef extern from "atomics.h" nogil:
    uint32_t mk_load_acquire_u32(const uint32_t *p)
    void mk_store_seq_cst_u32(uint32_t *p, uint32_t v)
    void mk_cpu_relax()
    uint64_t mk_now_ns()
    int mk_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
    int mk_futex_wake(uint32_t *addr, int count)


cdef inline void _wait_for(uint32_t *word, uint32_t want, bint parked) noexcept nogil:
    cdef uint32_t seen = mk_load_acquire_u32(word)
    while seen != want:
        if parked:
            mk_futex_wait(word, seen, 100000000)
        else:
            mk_cpu_relax()
        seen = mk_load_acquire_u32(word)


cdef inline void _post(uint32_t *word, uint32_t value, bint parked) noexcept nogil:
    mk_store_seq_cst_u32(word, value)
    if parked:
        mk_futex_wake(word, 1)


def serve(object buf, Py_ssize_t offset, Py_ssize_t rounds, bint parked):
    """Answer `rounds` pings on the u32 at buf[offset]."""
    cdef Py_buffer view
    cdef uint32_t *word
    cdef Py_ssize_t i
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    word = <uint32_t *>(<char *>view.buf + offset)
    try:
        with nogil:
            for i in range(rounds):
                _wait_for(word, <uint32_t>(2 * i + 1), parked)
                _post(word, <uint32_t>(2 * i + 2), parked)
    finally:
        PyBuffer_Release(&view)


def ping(object buf, Py_ssize_t offset, Py_ssize_t rounds, bint parked):
    """Send `rounds` pings; returns each round trip in ns as an int64 array."""
    cdef Py_buffer view
    cdef uint32_t *word
    cdef Py_ssize_t i
    cdef uint64_t t0
    samples = np.empty(rounds, dtype=np.int64)
    cdef long long[::1] out = samples
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    word = <uint32_t *>(<char *>view.buf + offset)
    try:
        with nogil:
            for i in range(rounds):
                t0 = mk_now_ns()
                _post(word, <uint32_t>(2 * i + 1), parked)
                _wait_for(word, <uint32_t>(2 * i + 2), parked)
                out[i] = <long long>(mk_now_ns() - t0)
    finally:
        PyBuffer_Release(&view)
    return samples
