from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos.microkernel.errors import ProtocolError
from llmos.microkernel.messages import HEADER, HEADER_SIZE, MsgFlag, MsgType, decode, encode

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_header_is_48_bytes_little_endian() -> None:
    raw = encode(MsgType.KERNEL_HELLO, b"", txid=0x01020304)
    assert len(raw) == HEADER_SIZE == 48
    assert raw[:2] == b"\x01\x01"
    assert raw[4:8] == b"\x04\x03\x02\x01"


@given(
    type=st.sampled_from(list(MsgType)),
    flags=st.sampled_from([0, MsgFlag.REPLY, MsgFlag.WAKE | MsgFlag.MORE]),
    txid=u32, src=u32, status=st.integers(-(2**31), 2**31 - 1), seq=u32,
    send_ns=u64, arena_off=u64, arena_len=u64, payload=st.binary(max_size=300),
)
def test_round_trip(type: MsgType, flags: int, txid: int, src: int, status: int, seq: int,
                    send_ns: int, arena_off: int, arena_len: int, payload: bytes) -> None:
    raw = encode(type, payload, flags=flags, txid=txid, src=src, status=status, seq=seq,
                 send_ns=send_ns, arena_off=arena_off, arena_len=arena_len)
    header, body = decode(raw)
    assert (header.type, header.flags, header.txid, header.src, header.status) == (type, flags, txid, src, status)
    assert (header.seq, header.send_ns, header.arena_off, header.arena_len) == (seq, send_ns, arena_off, arena_len)
    assert header.length == len(payload) and bytes(body) == payload


def test_unknown_type_within_a_known_range_decodes() -> None:
    header, _ = decode(encode(0x02FF))
    assert header.type == 0x02FF  # a server answers it with UNSUPPORTED


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"", "shorter than"),
        (b"\x00" * 47, "shorter than"),
        (HEADER.pack(0x0900, 0, 0, 0, 0, 0, 0, 0, 0, 0), "no known range"),
        (HEADER.pack(0x0101, 0x80, 0, 0, 0, 0, 0, 0, 0, 0), "unknown flags"),
        (HEADER.pack(0x0101, 0, 0, 0, 0, 5, 0, 0, 0, 0), "length field"),
        (HEADER.pack(0x0101, 0, 0, 0, 0, 0, 0, 0, 0, 0) + b"xx", "length field"),
    ],
)
def test_malformed_headers_are_protocol_errors(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(raw)


def test_arena_reference_is_checked_against_the_arena() -> None:
    ok = encode(MsgType.RUNNER_STEP, arena_off=4096, arena_len=4096)
    decode(ok, arena_size=8192)
    for off, length in [(8192, 1), (4096, 4097), (2**64 - 1, 2)]:
        with pytest.raises(ProtocolError, match="outside"):
            decode(encode(MsgType.RUNNER_STEP, arena_off=off, arena_len=length), arena_size=8192)


def test_payload_limit() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(encode(MsgType.SCHED_SUBMIT, b"x" * 65), max_payload=64)


@pytest.mark.parametrize(
    "kwargs",
    [{"type": 0x0900}, {"type": 0x10000}, {"type": 0x0101, "flags": 0x100}, {"type": 0x0101, "txid": 2**32},
     {"type": 0x0101, "status": 2**31}],
)
def test_encode_rejects_out_of_range_fields(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        encode(**kwargs)  # type: ignore[arg-type]


def test_decode_never_copies_the_payload() -> None:
    raw = bytearray(encode(MsgType.TEST_ECHO, b"abc"))
    _, body = decode(raw)
    raw[-1:] = b"z"
    assert bytes(body) == b"abz"
    assert struct.calcsize("<HHIIiIIQQQ") == HEADER_SIZE
