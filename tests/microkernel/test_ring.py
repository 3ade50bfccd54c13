"""The ring's contract at every edge, run against the Cython ring and the Python oracle."""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import pytest

from llmos.microkernel import Arena, Closed, PeerGone, ProtocolError, Timeout
from llmos.microkernel import layout as L

CAP = 1024


@pytest.fixture
def pair(arena: Arena, ring_impl: Any) -> tuple[Any, Any]:
    """(producer, consumer) handles on one fresh ring."""
    producer = ring_impl.create(arena, CAP, side="producer")
    consumer = ring_impl.attach(arena, producer.offset, side="consumer")
    return producer, consumer



@pytest.mark.parametrize("capacity", [0, 32, 63, 100, 3000, 1 << 31])
def test_capacity_must_be_a_power_of_two_in_range(arena: Arena, ring_impl: Any, capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ring_impl.create(arena, capacity)


def test_empty_ring(pair: tuple[Any, Any]) -> None:
    _, consumer = pair
    assert consumer.try_recv() is None
    assert consumer.try_recv_many(10) == []
    with pytest.raises(Timeout):
        consumer.recv(timeout=0)
    with pytest.raises(Timeout, match="no record"):
        consumer.recv(timeout=0.01)
    assert consumer.wait_readable(timeout=0) is False


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, CAP // 2 - 9, CAP // 2 - 8])
def test_record_sizes_up_to_the_limit(pair: tuple[Any, Any], size: int) -> None:
    producer, consumer = pair
    payload = bytes(range(256)) * (size // 256 + 1)
    for _ in range(5):  # several laps, so every size also crosses the end
        assert producer.try_send(payload[:size])
        assert consumer.try_recv() == payload[:size]
    stats = consumer.stats()
    assert stats.sent_records == stats.recv_records == 5
    assert stats.sent_bytes == stats.recv_bytes == 5 * size
    assert stats.used_bytes == 0


def test_record_over_the_limit_is_refused_and_changes_nothing(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    assert producer.max_record_size == CAP // 2 - 8
    with pytest.raises(ValueError, match="capacity/2"):
        producer.try_send(b"x" * (CAP // 2 - 7))
    with pytest.raises(ValueError, match="capacity/2"):
        producer.send(b"x" * CAP)
    assert producer.stats().sent_records == 0
    assert consumer.try_recv() is None


def test_full_ring_is_backpressure_not_loss(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    sent = 0
    while producer.try_send(sent.to_bytes(8, "little") * 3):  # 24 bytes -> 32 per record
        sent += 1
    assert sent == CAP // 32
    with pytest.raises(Timeout, match="still full"):
        producer.send(b"y" * 24, timeout=0.01)
    assert int.from_bytes(consumer.recv()[:8], "little") == 0
    assert producer.try_send(b"z" * 24)
    got = [consumer.try_recv() for _ in range(sent)]
    assert [int.from_bytes(g[:8], "little") for g in got[:-1]] == list(range(1, sent))
    assert got[-1] == b"z" * 24
    assert consumer.try_recv() is None


def test_wrap_at_exactly_the_capacity(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    record = b"w" * (CAP // 4 - 8)  # four records fill the ring with no padding
    for _lap in range(3):
        for _ in range(4):
            assert producer.try_send(record)
        assert not producer.try_send(b"")
        assert consumer.stats().used_bytes == CAP
        for _ in range(4):
            assert consumer.try_recv() == record
        assert consumer.stats().used_bytes == 0
    assert consumer.stats().recv_records == 12


def test_padding_keeps_records_whole(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    # 3 x 296 bytes leave 136 at the end: the 4th (296) must pad and wrap to the start.
    payloads = [bytes([i]) * 288 for i in range(8)]
    got = []
    for p in payloads:
        producer.send(p, timeout=1)
        got.append(consumer.recv(timeout=1))
    assert got == payloads


def test_send_many_and_recv_many_keep_order(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    items = [i.to_bytes(4, "little") * (i % 5) for i in range(20)]
    assert producer.send_many(items[:10]) == 10
    assert consumer.recv_many(4) == items[:4]
    assert consumer.try_recv_many(100) == items[4:10]
    assert producer.send_many([bytearray(x) for x in items[10:]]) == 10
    assert consumer.recv_many(100, timeout=1) == items[10:]
    with pytest.raises(ValueError):
        consumer.recv_many(0)


def test_buffers_other_than_bytes(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    producer.send(bytearray(b"abc"))
    producer.send(memoryview(b"xxdefxx")[2:5])
    assert consumer.recv() == b"abc"
    assert consumer.recv() == b"def"


def test_recv_view_is_zero_copy_and_released_on_exit(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    producer.send(b"hello view")
    with consumer.recv_view(timeout=1) as mv:
        assert bytes(mv) == b"hello view"
        assert mv.readonly
        assert consumer.stats().used_bytes > 0  # still held
        with pytest.raises(RuntimeError, match="still open"):
            consumer.try_recv()
    assert consumer.stats().used_bytes == 0
    with pytest.raises(ValueError):
        bytes(mv)  # the view died with the block
    with pytest.raises(Timeout), consumer.recv_view(timeout=0):
        pass


def test_producer_close_lets_consumer_drain_then_peer_gone(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    producer.send(b"last words")
    producer.close()
    assert consumer.recv(timeout=1) == b"last words"
    with pytest.raises(PeerGone, match="producer closed"):
        consumer.try_recv()
    with pytest.raises(PeerGone):
        consumer.recv(timeout=1)
    with pytest.raises(PeerGone):
        consumer.recv_many(5)
    assert consumer.wait_readable(timeout=0) is True  # a closed producer is "readable"


def test_consumer_close_makes_sends_peer_gone(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    consumer.close()
    with pytest.raises(PeerGone, match="consumer closed"):
        producer.try_send(b"x")
    with pytest.raises(PeerGone):
        producer.send(b"x", timeout=1)


def test_use_after_close_is_closed_and_close_is_idempotent(pair: tuple[Any, Any]) -> None:
    producer, consumer = pair
    producer.close()
    producer.close()
    assert producer.closed
    with pytest.raises(Closed):
        producer.try_send(b"x")
    with pytest.raises(Closed):
        producer.stats()
    consumer.close()
    with pytest.raises(Closed):
        consumer.recv(timeout=0)


def test_unbound_handle_closes_both_sides(arena: Arena, ring_impl: Any) -> None:
    ring = ring_impl.create(arena, CAP)
    other = ring_impl.attach(arena, ring.offset)
    ring.close()
    stats = other.stats()
    assert stats.producer_closed and stats.consumer_closed


def test_attach_checks_header_and_generation(arena: Arena, ring_impl: Any) -> None:
    ring = ring_impl.create(arena, CAP, generation=7)
    assert ring_impl.attach(arena, ring.offset, generation=7).generation == 7
    with pytest.raises(ProtocolError, match="stale"):
        ring_impl.attach(arena, ring.offset, generation=6)
    blank = arena.carve(L.RegionKind.RINGS, 2048)
    with pytest.raises(ProtocolError, match="no ring"):
        ring_impl.attach(arena, blank)
    with pytest.raises(ValueError, match="outside"):
        ring_impl.attach(arena, arena.size)


@pytest.mark.parametrize(
    "field, value",
    [("length", 0xFFFF_FFF0), ("length", CAP // 2), ("pad", 8), ("tail", CAP * 3)],
)
def test_corruption_is_a_protocol_error_not_a_crash(pair: tuple[Any, Any], arena: Arena, field: str, value: int) -> None:
    producer, consumer = pair
    producer.send(b"a" * 40)
    data = producer.offset + L.RING_HEADER_SIZE
    if field == "length":
        struct.pack_into("<I", arena.buf, data, value)
    elif field == "pad":
        struct.pack_into("<II", arena.buf, data, value, L.REC_PAD)
    else:
        struct.pack_into("<Q", arena.buf, producer.offset + L.RH_TAIL, value)
    for _ in range(2):  # stays an error; never reads out of bounds
        with pytest.raises(ProtocolError, match="corrupt"):
            consumer.try_recv()
    with pytest.raises(ProtocolError):
        consumer.recv(timeout=0.01)


def test_corrupt_head_is_seen_by_the_producer(pair: tuple[Any, Any], arena: Arena) -> None:
    producer, _ = pair
    struct.pack_into("<Q", arena.buf, producer.offset + L.RH_HEAD, 2**63)
    with pytest.raises(ProtocolError):
        for _ in range(CAP):
            producer.try_send(b"x" * 24)


def test_negative_timeout_is_refused(pair: tuple[Any, Any]) -> None:
    _, consumer = pair
    with pytest.raises(ValueError, match="timeout"):
        consumer.recv(timeout=-1)


def test_note_message_counts_gaps_and_latency(pair: tuple[Any, Any]) -> None:
    from llmos.microkernel._ring import now_ns

    _, consumer = pair
    for seq in (0, 1, 2, 5, 6, 10):
        consumer.note_message(seq, now_ns() - 1000)
    stats = consumer.stats()
    assert stats.seq_gaps == 2 + 3
    assert stats.latency_count == 6
    assert sum(stats.latency_hist) == 6
    assert stats.latency_max_ns >= 1000
    assert stats.latency_percentile_ns(0.5) >= 1024
    assert stats.loss_rate == pytest.approx(5 / 11)


def test_close_from_another_thread_ends_a_blocked_recv_with_closed(arena: Arena) -> None:
    import threading

    from llmos.microkernel import Ring

    ring = Ring.create(arena, CAP, side="consumer", spin_ns=0)
    outcome: list[str] = []
    started = threading.Event()

    def blocked() -> None:
        started.set()
        try:
            ring.recv(timeout=60)
            outcome.append("got")
        except Closed:
            outcome.append("closed")

    thread = threading.Thread(target=blocked)
    thread.start()
    started.wait(60)
    while ring.stats().consumer_bell.sleepers == 0 and thread.is_alive():
        pass  # until it parks (an event, not a sleep)
    ring.close()
    thread.join(60)
    assert outcome == ["closed"]
    with pytest.raises(Closed):
        ring.consumer_doorbell_offset  # noqa: B018 - reading it must not touch freed memory


def test_rings_and_doorbells_in_a_reference_cycle_are_freed_cleanly(arena: Arena) -> None:
    """A connection dropped inside a reference cycle (an arena attachment, its doorbell and
    rings, the objects around them) is freed by the cycle collector without dropping a
    buffer export the rings still hold (that left the arena's memoryview cleared under
    them, and the process crashed later). In a child process, so a crash fails this test
    only."""
    script = f"""
import gc
from llmos.microkernel import Arena
from llmos.microkernel._ring import Doorbell, Ring
gc.disable()
for _ in range(50):
    attached = Arena.attach({arena.name!r})
    bell = Doorbell.create(attached)
    ring = Ring.create(attached, 4096, consumer_doorbell=bell)
    ring.send(b"x")
    cycle = [attached, bell, ring]
    cycle.append(cycle)
    del attached, bell, ring, cycle
    gc.collect()
print("ok")
"""
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
