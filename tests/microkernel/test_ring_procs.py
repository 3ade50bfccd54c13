"""Rings between real processes: ordering and checksums, parking and waking, close and
signals. Synchronised on ring state (doorbell sleepers, want_space), never on sleeps."""

from __future__ import annotations

import os
import random
import signal
import zlib

import pytest

from llmos.microkernel import Arena, Doorbell, PeerGone, Ring
from tests.microkernel import procs
from tests.microkernel.procs import CTX, SEQ, WAIT, wait_until


def start(target: object, *args: object) -> tuple[object, object]:
    out = CTX.Queue()
    proc = CTX.Process(target=target, args=(*args, out))
    proc.start()
    return proc, out


def finish(proc: object) -> None:
    proc.join(WAIT)  # type: ignore[attr-defined]
    assert proc.exitcode == 0  # type: ignore[attr-defined]


def test_two_processes_exchange_1e5_messages_in_order(arena: Arena) -> None:
    ring = Ring.create(arena, 1 << 14, side="consumer")
    count = 100_000
    proc, out = start(procs.produce, arena.name, ring.offset, 1, count, 16, 20_000)
    crc, expected_seq = 0, 0
    while True:
        try:
            batch = ring.recv_many(256, timeout=WAIT)
        except PeerGone:
            break
        for msg in batch:
            seq, pid = SEQ.unpack_from(msg)
            assert (seq, pid) == (expected_seq, 1)
            crc = zlib.crc32(msg, crc)
            expected_seq += 1
    assert expected_seq == count
    assert out.get(timeout=WAIT) == (1, crc)  # type: ignore[attr-defined]
    finish(proc)
    stats = ring.stats()
    assert stats.sent_records == stats.recv_records == count
    ring.close()


def test_parked_consumer_is_woken_by_a_wake_record(arena: Arena) -> None:
    ring = Ring.create(arena, 4096, side="producer")
    proc, out = start(procs.consume_one, arena.name, ring.offset, 0)
    wait_until(lambda: ring.stats().consumer_bell.sleepers == 1, "the consumer to park", proc)
    ring.send(b"wake up")
    assert out.get(timeout=WAIT) == ("got", b"wake up")  # type: ignore[attr-defined]
    finish(proc)
    bell = ring.stats().consumer_bell
    assert bell.parks >= 1 and bell.wakes >= 1
    ring.close()


def test_record_without_wake_does_not_wake_by_itself(arena: Arena) -> None:
    ring = Ring.create(arena, 4096, side="producer")
    proc, out = start(procs.consume_one, arena.name, ring.offset, 0)
    wait_until(lambda: ring.stats().consumer_bell.sleepers == 1, "the consumer to park", proc)
    ring.send(b"quiet", wake=False)
    # Delivered at the consumer's next park slice (<= 100 ms), with no futex wake.
    assert out.get(timeout=WAIT) == ("got", b"quiet")  # type: ignore[attr-defined]
    finish(proc)
    assert ring.stats().consumer_bell.wakes == 0
    ring.close()


def test_passing_half_full_wakes_even_without_wake_flags(arena: Arena) -> None:
    # If this process stalls longer than the consumer's 100 ms park slice before the
    # records go out, the slice (not the half-full rule) delivers them: try again.
    for _attempt in range(5):
        ring = Ring.create(arena, 1024, side="producer")
        proc, out = start(procs.consume_one, arena.name, ring.offset, 0)
        wait_until(lambda ring=ring: ring.stats().consumer_bell.sleepers == 1, "the consumer to park", proc)
        ring.send_many([b"x" * 56] * 8, wake=False)  # 8 x 64 bytes: exactly half of 1024
        assert out.get(timeout=WAIT)[0] == "got"  # type: ignore[attr-defined]
        finish(proc)
        bell = ring.stats().consumer_bell
        ring.close()
        if bell.parks == 1:
            assert bell.wakes == 1
            return
    pytest.fail("the consumer never stayed parked until the ring passed half full")


def test_producer_blocked_on_full_ring_is_woken_when_space_frees(arena: Arena) -> None:
    ring = Ring.create(arena, 1024, side="consumer")
    proc, out = start(procs.fill_then_send, arena.name, ring.offset, b"r" * 100)
    kind, filled = out.get(timeout=WAIT)  # type: ignore[attr-defined]
    assert kind == "full"
    wait_until(lambda: ring.stats().want_space and ring.stats().producer_bell.sleepers == 1,
               "the producer to park on a full ring", proc)
    assert ring.recv(timeout=WAIT) == b"r" * 100
    assert out.get(timeout=WAIT) == ("sent", filled + 1)  # type: ignore[attr-defined]
    finish(proc)
    assert ring.stats().producer_bell.wakes >= 1
    assert len(ring.try_recv_many(1000)) == filled
    ring.close()


def test_consumer_closing_in_another_process_ends_a_blocked_send(arena: Arena) -> None:
    ring = Ring.create(arena, 1024, side="producer", spin_ns=0)
    while ring.try_send(b"f" * 100):
        pass
    proc, _out = start(procs.close_side, arena.name, ring.offset, "consumer")
    with pytest.raises(PeerGone):
        ring.send(b"f" * 100, timeout=WAIT)
    finish(proc)
    ring.close()


def test_producer_closing_in_another_process_ends_a_blocked_recv(arena: Arena) -> None:
    ring = Ring.create(arena, 1024, side="consumer", spin_ns=0)
    proc, _out = start(procs.close_side, arena.name, ring.offset, "producer")
    with pytest.raises(PeerGone):
        ring.recv(timeout=WAIT)
    finish(proc)
    ring.close()


@pytest.mark.parametrize(("sig", "target", "expected"), [
    (signal.SIGINT, procs.consume_one, "interrupted"),
    (signal.SIGTERM, procs.consume_one_with_sigterm_handler, "terminated"),
])
def test_signal_interrupts_a_parked_recv(arena: Arena, sig: int, target: object, expected: str) -> None:
    ring = Ring.create(arena, 1024, side="producer")
    proc, out = start(target, arena.name, ring.offset, 0)
    wait_until(lambda: ring.stats().consumer_bell.sleepers == 1, "the consumer to park", proc)
    os.kill(proc.pid, sig)  # type: ignore[attr-defined]
    assert out.get(timeout=WAIT) == (expected, b"")  # type: ignore[attr-defined]
    finish(proc)
    ring.close()


def test_one_doorbell_waits_on_many_rings(arena: Arena) -> None:
    bell = Doorbell.create(arena)
    rings = [Ring.create(arena, 1024, consumer_doorbell=bell, side="consumer") for _ in range(3)]
    rng = random.Random(3)
    for _ in range(20):
        target = rng.randrange(3)
        assert bell.wait(rings, timeout=0) is False
        producer = Ring.attach(arena, rings[target].offset, side="producer")
        producer.send(b"%d" % target)
        assert bell.wait(rings, timeout=WAIT) is True
        got = [(i, r.try_recv()) for i, r in enumerate(rings)]
        assert [g for g in got if g[1] is not None] == [(target, b"%d" % target)]
    other = Ring.create(arena, 1024)
    with pytest.raises(ValueError, match="another doorbell"):
        bell.wait([other], timeout=0)
    for r in rings:
        r.close()
