"""Several producer processes, each on its own ring, into one consumer parked on its
doorbell: 10^6 messages, per-producer order and checksums, nothing lost or duplicated."""

from __future__ import annotations

import zlib

import pytest

from llmos.microkernel import Arena, Doorbell, PeerGone, Ring
from tests.microkernel import procs
from tests.microkernel.procs import CTX, SEQ, WAIT

pytestmark = pytest.mark.slow

PRODUCERS = 3
TOTAL = 1_000_000


def test_many_producers_into_one_parked_consumer(arena_name: str) -> None:
    with Arena.create(arena_name, 8 << 20) as arena:
        bell = Doorbell.create(arena)
        # Small rings so producers also fill them and park on their own doorbells.
        rings = [
            Ring.create(arena, 4096, consumer_doorbell=bell, side="consumer", spin_ns=0)
            for _ in range(PRODUCERS)
        ]
        out = CTX.Queue()
        per_producer = TOTAL // PRODUCERS
        workers = [
            CTX.Process(target=procs.produce, args=(arena.name, r.offset, i, per_producer, 8, 0, out))
            for i, r in enumerate(rings)
        ]
        for w in workers:
            w.start()
        next_seq = [0] * PRODUCERS
        crc = [0] * PRODUCERS
        live = dict(enumerate(rings))
        while live:
            assert bell.wait(list(live.values()), timeout=WAIT, spin_ns=0), "no progress within the timeout"
            for pid, ring in list(live.items()):
                try:
                    batch = ring.try_recv_many(512)
                except PeerGone:
                    del live[pid]
                    continue
                for msg in batch:
                    seq, sender = SEQ.unpack_from(msg)
                    assert (sender, seq) == (pid, next_seq[pid]), "lost, duplicated or reordered"
                    next_seq[pid] += 1
                    crc[pid] = zlib.crc32(msg, crc[pid])
        reported = dict(out.get(timeout=WAIT) for _ in workers)
        for w in workers:
            w.join(WAIT)
            assert w.exitcode == 0
        assert next_seq == [per_producer] * PRODUCERS
        assert reported == dict(enumerate(crc))
        parks = bell.stats().parks
        producer_parks = sum(r.stats().producer_bell.parks for r in rings)
        print(f"\nconsumer parks {parks}, producer parks {producer_parks}")
        assert parks > 0  # at least while the producers start
        for r in rings:
            stats = r.stats()
            assert stats.sent_records == stats.recv_records == per_producer
            r.close()


ROUND_TRIPS = 150_000


def test_ping_pong_parks_and_wakes_every_time(arena_name: str) -> None:
    """Both sides park at once (spin_ns=0), so each round trip is two park/wake cycles."""
    with Arena.create(arena_name, 1 << 20) as arena:
        requests = Ring.create(arena, 1024, side="producer", spin_ns=0)
        replies = Ring.create(arena, 1024, side="consumer", spin_ns=0)
        out = CTX.Queue()
        worker = CTX.Process(target=procs.echo, args=(arena.name, requests.offset, replies.offset, out))
        worker.start()
        for i in range(ROUND_TRIPS):
            payload = i.to_bytes(8, "little")
            requests.send(payload, timeout=WAIT)
            assert replies.recv(timeout=WAIT) == payload
        request_bell = Ring.attach(arena, requests.offset)  # to read counters after close
        requests.close()
        assert out.get(timeout=WAIT) == ROUND_TRIPS
        worker.join(WAIT)
        assert worker.exitcode == 0
        parks = request_bell.stats().consumer_bell.parks + replies.stats().consumer_bell.parks
        wakes = request_bell.stats().consumer_bell.wakes + replies.stats().consumer_bell.wakes
        print(f"\n{ROUND_TRIPS} round trips: {parks} parks, {wakes} wakes")
        # With no spin and no yield each side parks on (nearly) every round trip: 2 per trip.
        assert parks >= ROUND_TRIPS
        replies.close()
        request_bell.close()
