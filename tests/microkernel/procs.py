"""Child-process bodies for the multi-process ring tests (importable, so `spawn` works)."""

from __future__ import annotations

import multiprocessing as mp
import random
import signal
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from llmos.microkernel import Arena, PeerGone, Ring, Timeout

SEQ = struct.Struct("<QI")  # producer-local seq, producer id
CTX = mp.get_context("spawn")
WAIT = 60.0  # every wait in these tests is generous: a red test means a real fault


def message(producer_id: int, seq: int, rng: random.Random) -> bytes:
    return SEQ.pack(seq, producer_id) + rng.randbytes(rng.randrange(0, 120))


def produce(arena_name: str, offset: int, producer_id: int, count: int, burst: int,
            spin_ns: int, out: Any) -> None:
    """Send `count` messages in bursts (WAKE on each burst's last), then close."""
    arena = Arena.attach(arena_name)
    ring = Ring.attach(arena, offset, side="producer", spin_ns=spin_ns)
    rng = random.Random(producer_id)
    crc = 0
    seq = 0
    while seq < count:
        n = min(count - seq, rng.randint(1, burst))
        for i in range(n):
            msg = message(producer_id, seq, rng)
            crc = zlib.crc32(msg, crc)
            ring.send(msg, timeout=WAIT, wake=i == n - 1)
            seq += 1
    out.put((producer_id, crc))
    ring.close()
    arena.close()


def consume_one(arena_name: str, offset: int, spin_ns: int, out: Any) -> None:
    """Block in recv (parking at once when spin_ns is 0) and report what arrived."""
    arena = Arena.attach(arena_name)
    ring = Ring.attach(arena, offset, side="consumer", spin_ns=spin_ns)
    try:
        out.put(("got", ring.recv(timeout=WAIT)))
    except PeerGone:
        out.put(("peer_gone", b""))
    except Timeout:
        out.put(("timeout", b""))
    except KeyboardInterrupt:
        out.put(("interrupted", b""))
    except SystemExit:
        out.put(("terminated", b""))


def consume_one_with_sigterm_handler(arena_name: str, offset: int, spin_ns: int, out: Any) -> None:
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    consume_one(arena_name, offset, spin_ns, out)


def fill_then_send(arena_name: str, offset: int, record: bytes, out: Any) -> None:
    """Fill the ring, then block in send (parked on the producer doorbell) until space frees."""
    arena = Arena.attach(arena_name)
    ring = Ring.attach(arena, offset, side="producer", spin_ns=0)
    sent = 0
    while ring.try_send(record, wake=False):
        sent += 1
    out.put(("full", sent))
    try:
        ring.send(record, timeout=WAIT)
        out.put(("sent", sent + 1))
    except PeerGone:
        out.put(("peer_gone", sent))


def close_side(arena_name: str, offset: int, side: str, out: Any) -> None:
    arena = Arena.attach(arena_name)
    ring = Ring.attach(arena, offset, side=side)
    ring.close()
    out.put(("closed", side))


def wait_until(predicate: Callable[[], bool], what: str, proc: Any = None, timeout: float = WAIT) -> None:
    """Poll shared state until an event happens (not a sleep: it returns as soon as true).
    Fails at once if `proc`, the process expected to cause the event, has died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and not proc.is_alive():
            raise AssertionError(f"child died (exit code {proc.exitcode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def echo(arena_name: str, request_offset: int, reply_offset: int, out: Any) -> None:
    """Answer every record on the request ring with the same bytes, parking when idle."""
    arena = Arena.attach(arena_name)
    requests = Ring.attach(arena, request_offset, side="consumer", spin_ns=0)
    replies = Ring.attach(arena, reply_offset, side="producer", spin_ns=0)
    count = 0
    try:
        while True:
            replies.send(requests.recv(timeout=WAIT), timeout=WAIT)
            count += 1
    except PeerGone:
        out.put(count)
    replies.close()
