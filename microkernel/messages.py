"""The wire format: one 48-byte little-endian header, then a typed payload.

Pure functions, no I/O; every process imports it, it imports nothing from servers/.
`decode` checks the header (type range, flags, lengths, arena reference) before anyone
touches the payload or the arena, so a malformed record is a `ProtocolError`, never a
crash. Types are numbered in one range per server, as in QNX.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Final, NamedTuple

from llmos.microkernel.errors import ProtocolError

# type u16, flags u16, txid u32, src u32, status i32, length u32, seq u32,
# send_ns u64, arena_off u64, arena_len u64
HEADER: Final = struct.Struct("<HHIIiIIQQQ")
HEADER_SIZE: Final = HEADER.size
assert HEADER_SIZE == 48

U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


class MsgFlag(IntFlag):
    NONE = 0
    REPLY = 0x1  # this message answers the request with the same txid
    WAKE = 0x2  # wake the consumer now (streaming); otherwise it may batch
    MORE = 0x4  # more records of the same reply follow


KNOWN_FLAGS: Final = int(MsgFlag.REPLY | MsgFlag.WAKE | MsgFlag.MORE)


class MsgRange(IntEnum):
    """The high byte of a message type: which server's table it belongs to."""

    KERNEL = 0x01
    SCHEDULER = 0x02
    MEMORY = 0x03
    RUNNER = 0x04
    TEST = 0x7F


class MsgType(IntEnum):
    # kernel 0x01xx
    KERNEL_ERROR = 0x0100  # error answer to a request whose type could not be read
    KERNEL_HELLO = 0x0101
    KERNEL_REGISTER = 0x0102
    KERNEL_CONNECT = 0x0103
    KERNEL_PEER_JOINED = 0x0104
    KERNEL_PEER_GONE = 0x0105
    KERNEL_HEARTBEAT = 0x0106
    KERNEL_STATS = 0x0107
    KERNEL_CLOSE = 0x0108
    # scheduler 0x02xx
    SCHED_SUBMIT = 0x0201
    SCHED_CANCEL = 0x0202
    # 0x0203 retired (SCHED_TOKENS: tokens travel as REPLY|MORE records of SCHED_SUBMIT): do not reuse
    SCHED_MODEL_INFO = 0x0204
    SCHED_STATS = 0x0205
    # memory 0x03xx
    MEM_ALLOC_BLOCKS = 0x0301
    MEM_FREE_BLOCKS = 0x0302
    MEM_ALLOC_SEGMENT = 0x0303
    MEM_FREE_SEGMENT = 0x0304
    MEM_STATS = 0x0305
    # 0x0306 retired (MEM_CLAIM_BLOCKS, for the memory server's prefix cache): do not reuse
    MEM_SEGMENT_INFO = 0x0307  # where a live segment lies, for any endpoint (libllm attach, scheduler)
    # runner 0x04xx
    RUNNER_STEP = 0x0401
    RUNNER_FENCE = 0x0402
    RUNNER_MODEL_INFO = 0x0403
    # test servers 0x7Fxx
    TEST_ECHO = 0x7F01
    TEST_HOLD = 0x7F02
    TEST_INFO = 0x7F03


_KNOWN_RANGES: Final = frozenset(int(r) for r in MsgRange)


def is_known_type(type: int) -> bool:
    """True when `type` lies in one of the servers' ranges (it may still be unsupported)."""
    return 0 <= type <= 0xFFFF and (type >> 8) in _KNOWN_RANGES


class Header(NamedTuple):
    """A decoded message header. `type` may be a number the receiver does not know:
    it is in a known range, and the server answers it with UNSUPPORTED. A NamedTuple,
    not a dataclass: it is built for every message, and a tuple is built 5x faster."""

    type: int
    flags: int = 0
    txid: int = 0
    src: int = 0
    status: int = 0
    length: int = 0
    seq: int = 0
    send_ns: int = 0
    arena_off: int = 0
    arena_len: int = 0


def encode(
    type: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    flags: int = 0,
    txid: int = 0,
    src: int = 0,
    status: int = 0,
    seq: int = 0,
    send_ns: int = 0,
    arena_off: int = 0,
    arena_len: int = 0,
) -> bytes:
    """Build one message: header + payload.

    Raises:
        ValueError: a field is out of range for its width, or the type is in no range.
    """
    if not 0 <= type <= 0xFFFF or (type >> 8) not in _KNOWN_RANGES:
        raise ValueError(f"message type {type:#06x} is in no known range")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown message flags {flags & ~KNOWN_FLAGS:#x}")
    length = len(payload)
    if length > U32_MAX:
        raise ValueError(f"payload of {length} bytes exceeds the u32 length field")
    try:
        head = HEADER.pack(
            type, flags, txid, src, status, length, seq, send_ns, arena_off, arena_len
        )
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from None
    return head + bytes(payload)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    arena_size: int | None = None,
    max_payload: int | None = None,
) -> tuple[Header, memoryview]:
    """Split one record into its header and payload view, validating the header.

    Args:
        data: the whole record as received.
        arena_size: when given, `arena_off + arena_len` must lie inside the arena.
        max_payload: when given, a longer payload is rejected.

    Raises:
        ProtocolError: the record is shorter than a header, the length field disagrees
            with the record, the type is in no known range, unknown flags are set, or
            the arena reference points outside the arena.
    """
    view = memoryview(data)
    if view.nbytes < HEADER_SIZE:
        raise ProtocolError(f"record of {view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = HEADER.unpack_from(view)
    header = Header._make(fields)
    if (header.type >> 8) not in _KNOWN_RANGES:
        raise ProtocolError(f"message type {header.type:#06x} is in no known range")
    if header.flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {header.flags & ~KNOWN_FLAGS:#x} in message {header.type:#06x}")
    if header.length != view.nbytes - HEADER_SIZE:
        raise ProtocolError(
            f"length field says {header.length} payload bytes, record carries {view.nbytes - HEADER_SIZE}"
        )
    if max_payload is not None and header.length > max_payload:
        raise ProtocolError(f"payload of {header.length} bytes exceeds the limit of {max_payload}")
    if arena_size is not None and header.arena_len and (
        header.arena_off >= arena_size or header.arena_len > arena_size - header.arena_off
    ):
        raise ProtocolError(
            f"arena reference [{header.arena_off}, +{header.arena_len}) lies outside the {arena_size}-byte arena"
        )
    return header, view[HEADER_SIZE:]
