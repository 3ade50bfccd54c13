"""Every limit and offset of the shared arena on one page (xv6's param.h).

Imported by every process. The Cython ring's struct in `_ring.pxd` must match the ring
offsets here byte for byte; `tests/microkernel/test_layout.py` checks that it does.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

CACHE_LINE: Final = 64
PAGE_SIZE: Final = 4096

# --- arena header (page 0 of the arena) -------------------------------------------
ARENA_MAGIC: Final = int.from_bytes(b"LLMOSARN", "little")
ARENA_LAYOUT_VERSION: Final = 1
ARENA_HEADER_SIZE: Final = PAGE_SIZE
ARENA_MIN_SIZE: Final = 2 * PAGE_SIZE
ARENA_MAX_REGIONS: Final = 16

# Header fields: (offset, struct format). Written by the creator only, at create time,
# except `state` (creator, once, with release order) and each region's `used` counter.
AH_MAGIC: Final = 0  # u64
AH_VERSION: Final = 8  # u32
AH_STATE: Final = 12  # u32: ARENA_STATE_*
AH_TOTAL_SIZE: Final = 16  # u64
AH_CREATOR_PID: Final = 24  # u32
AH_CREATOR_UID: Final = 28  # u32
AH_CREATED_NS: Final = 32  # u64, CLOCK_REALTIME
AH_NUM_REGIONS: Final = 40  # u32
AH_REGION_TABLE: Final = 64
REGION_ENTRY_SIZE: Final = 32
# Region entry fields, relative to the entry.
RE_KIND: Final = 0  # u32: RegionKind
RE_FLAGS: Final = 4  # u32
RE_OFFSET: Final = 8  # u64, from the start of the arena
RE_SIZE: Final = 16  # u64
RE_USED: Final = 24  # u64, bump counter for regions carved at run time (atomic add)

ARENA_STATE_CREATING: Final = 0
ARENA_STATE_READY: Final = 1


class RegionKind(IntEnum):
    """What a region of the arena holds."""

    RINGS = 1  # ring headers + data, and doorbells; carved by bump allocation
    ALLOC_TABLES = 2  # the memory server's per-block and per-segment tables
    PAGES = 3  # KV blocks
    SEGMENTS = 4  # variable-size tensors and the shared weights


# --- doorbells -----------------------------------------------------------------------
# A process owns one doorbell: a futex word every ring it consumes (or is blocked
# producing into) can ring. 64 bytes, so two doorbells never share a cache line.
DOORBELL_SIZE: Final = CACHE_LINE
DB_WORD: Final = 0  # u32 futex word; bumped by whoever rings
DB_SLEEPERS: Final = 4  # u32 threads announced as parked on this bell
DB_PARKS: Final = 8  # u64 times a waiter went to futex_wait (owner-written)
DB_WAKES: Final = 16  # u64 futex_wake calls issued on this bell (any ringer)
DB_OWNER_PID: Final = 24  # u32 informational

# --- rings ---------------------------------------------------------------------------
RING_MAGIC: Final = int.from_bytes(b"RING", "little")
RING_VERSION: Final = 1
RING_HEADER_SIZE: Final = 1024
RING_MIN_CAPACITY: Final = 64
RING_MAX_CAPACITY: Final = 1 << 30
RECORD_HEADER_SIZE: Final = 8  # u32 length, u32 flags
RECORD_ALIGN: Final = 8
LATENCY_BUCKETS: Final = 48  # bucket i counts latencies in [2**i, 2**(i+1)) ns

# Record flags (the record header's u32 flags; the ring never parses the payload).
REC_PAD: Final = 1  # filler up to the end of the data area; skip and wrap
REC_WAKE: Final = 2  # wake a parked consumer for this record

# Ring header field offsets, grouped by writer, each group on its own cache line.
# Creator-only, immutable after create:
RH_MAGIC: Final = 0  # u32
RH_VERSION: Final = 4  # u32
RH_CAPACITY: Final = 8  # u64
RH_GENERATION: Final = 16  # u64
RH_CONSUMER_BELL: Final = 24  # u64 arena offset of the consumer's doorbell
RH_PRODUCER_BELL: Final = 32  # u64 arena offset of the producer's doorbell
# Producer-only:
RH_TAIL: Final = 64  # u64 free-running write counter
RH_SENT_RECORDS: Final = 72  # u64
RH_SENT_BYTES: Final = 80  # u64 payload bytes
RH_PRODUCER_CLOSED: Final = 88  # u32
# Consumer-only:
RH_HEAD: Final = 128  # u64 free-running read counter
RH_RECV_RECORDS: Final = 136  # u64
RH_RECV_BYTES: Final = 144  # u64
RH_CONSUMER_CLOSED: Final = 152  # u32
# Shared flag: set by a producer that found the ring full, cleared by the consumer.
RH_WANT_SPACE: Final = 192  # u32
# Doorbells embedded in the ring, used when the creator names no process doorbell.
RH_EMBEDDED_CONSUMER_BELL: Final = 256
RH_EMBEDDED_PRODUCER_BELL: Final = 320
# Consumer-only, fed by the Endpoint layer (seq and send_ns of each message):
RH_NEXT_SEQ: Final = 384  # u32 next expected seq
RH_SEQ_VALID: Final = 388  # u32 1 once a seq was seen
RH_SEQ_GAPS: Final = 392  # u64 messages missing by seq (L_r numerator)
RH_LAT_COUNT: Final = 400  # u64
RH_LAT_SUM_NS: Final = 408  # u64
RH_LAT_MAX_NS: Final = 416  # u64
RH_LAT_HIST: Final = 448  # u64[LATENCY_BUCKETS]
RH_END: Final = RH_LAT_HIST + 8 * LATENCY_BUCKETS

assert RH_END <= RING_HEADER_SIZE


def ring_footprint(capacity: int) -> int:
    """Bytes a ring of `capacity` takes in the arena (header + data)."""
    return RING_HEADER_SIZE + capacity


def max_record_size(capacity: int) -> int:
    """Largest payload a ring of `capacity` accepts: a record is at most capacity/2."""
    return capacity // 2 - RECORD_HEADER_SIZE


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
