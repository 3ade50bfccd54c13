"""pytest-benchmark cases for the ring's hot calls (disabled in CI runs: there they run
once, as plain tests). Compare with `pytest tests/microkernel/test_ring_bench.py
--benchmark-enable`; the cross-process figures are `llmos bench ipc`."""

from __future__ import annotations

from typing import Any

from llmos.microkernel import Arena, Ring
from llmos.microkernel.messages import MsgType, decode, encode

PAYLOAD = b"x" * 64


def test_try_send_try_recv_pair(benchmark: Any, arena: Arena) -> None:
    ring = Ring.create(arena, 1 << 16)

    def pair() -> bytes | None:
        ring.try_send(PAYLOAD, False)
        return ring.try_recv()

    assert benchmark(pair) == PAYLOAD
    ring.close()


def test_send_many_recv_many_256(benchmark: Any, arena: Arena) -> None:
    ring = Ring.create(arena, 1 << 16)
    batch = [PAYLOAD] * 256

    def round_trip() -> int:
        ring.send_many(batch, None, False)
        return len(ring.try_recv_many(256))

    assert benchmark(round_trip) == 256
    ring.close()


def test_header_encode_decode(benchmark: Any) -> None:
    def codec() -> int:
        header, _ = decode(encode(MsgType.SCHED_SUBMIT, PAYLOAD, txid=7, seq=9))
        return header.txid

    assert benchmark(codec) == 7
