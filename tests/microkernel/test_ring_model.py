"""Hypothesis drives the Cython ring and the Python oracle with the same operations;
they must agree on every result and every counter."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmos.microkernel import Arena, Ring
from llmos.microkernel.ring_ref import RefRing
from tests.conftest import unique_name

CAPACITY = 256
MAX_RECORD = CAPACITY // 2 - 8
payloads = st.binary(max_size=MAX_RECORD)


class RingAgainstOracle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena.create(unique_name("model"), 1 << 16)
        self.fast: Any = Ring.create(self.arena, CAPACITY)
        self.ref: Any = RefRing.create(self.arena, CAPACITY)
        self.queue: list[bytes] = []

    def teardown(self) -> None:
        self.fast.close()
        self.ref.close()
        self.arena.close()
        self.arena.unlink()

    @rule(data=payloads)
    def try_send(self, data: bytes) -> None:
        ok = self.fast.try_send(data)
        assert self.ref.try_send(data) == ok
        if ok:
            self.queue.append(data)

    @rule(items=st.lists(st.binary(max_size=40), max_size=4))
    def send_many_when_room(self, items: list[bytes]) -> None:
        room = CAPACITY - self.fast.stats().used_bytes
        if sum(8 + -(-len(i) // 8) * 8 for i in items) + CAPACITY // 2 > room:
            return  # blocking would need a consumer; keep this single-threaded
        assert self.fast.send_many(items) == self.ref.send_many(items) == len(items)
        self.queue.extend(items)

    @rule()
    def try_recv(self) -> None:
        got = self.fast.try_recv()
        assert self.ref.try_recv() == got
        assert got == (self.queue.pop(0) if self.queue else None)

    @rule(n=st.integers(1, 5))
    def try_recv_many(self, n: int) -> None:
        got = self.fast.try_recv_many(n)
        assert self.ref.try_recv_many(n) == got
        assert got == self.queue[:n]
        del self.queue[:n]

    @precondition(lambda self: bool(self.queue))
    @rule()
    def recv_view(self) -> None:
        with self.fast.recv_view(timeout=0) as a, self.ref.recv_view(timeout=0) as b:
            assert bytes(a) == bytes(b) == self.queue.pop(0)

    @invariant()
    def counters_agree(self) -> None:
        f, r = self.fast.stats(), self.ref.stats()
        assert (f.sent_records, f.sent_bytes, f.recv_records, f.recv_bytes, f.used_bytes) == (
            r.sent_records, r.sent_bytes, r.recv_records, r.recv_bytes, r.used_bytes)
        assert f.sent_records - f.recv_records == len(self.queue)


RingAgainstOracle.TestCase.settings = settings(max_examples=60, stateful_step_count=60)
TestRingAgainstOracle = RingAgainstOracle.TestCase
