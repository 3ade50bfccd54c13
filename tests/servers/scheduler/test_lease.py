"""When the scheduler asks the memory server for more KV blocks (lease.py)."""

from __future__ import annotations

from llmos.servers.scheduler.lease import LEASE_CHUNK, Lease

POOL = 1000  # num_kv_blocks: the most the scheduler may hold


def test_it_asks_for_a_chunk_once_fewer_than_half_a_chunk_are_free() -> None:
    lease = Lease()
    assert lease.to_ask(LEASE_CHUNK // 2, 256, POOL, stalled=False) == 0
    assert lease.to_ask(LEASE_CHUNK // 2 - 1, 256, POOL, stalled=False) == LEASE_CHUNK


def test_a_stalled_scheduler_asks_however_many_are_free() -> None:
    # Free blocks that do not fit the waiting request (too few in one go) still leave it stalled.
    assert Lease().to_ask(200, 256, POOL, stalled=True) == LEASE_CHUNK


def test_it_never_asks_beyond_the_pool() -> None:
    assert Lease().to_ask(0, POOL - 10, POOL, stalled=True) == 10
    assert Lease().to_ask(0, POOL, POOL, stalled=True) == 0
    lease, total = Lease(), 0
    while n := lease.to_ask(0, total, 150, stalled=True):  # every ask granted
        lease.asked()
        lease.answered(granted=True)
        total += n
    assert total == 150


def test_one_request_at_a_time() -> None:
    lease = Lease()
    lease.asked()
    assert lease.to_ask(0, 256, POOL, stalled=True) == 0  # in flight
    lease.answered(granted=True)
    assert lease.to_ask(0, 320, POOL, stalled=True) == LEASE_CHUNK
    lease.asked()
    lease.lost()  # not sent, or the memory server went with it: nothing will answer
    assert lease.to_ask(0, 320, POOL, stalled=True) == LEASE_CHUNK


def test_after_a_refusal_it_waits_until_someone_gives_blocks_back() -> None:
    lease = Lease()
    lease.asked()
    lease.answered(granted=False)  # the pool is spent
    assert lease.to_ask(0, 256, POOL, stalled=True) == 0
    lease.lost()  # a new memory server channel does not refill the pool
    assert lease.to_ask(0, 256, POOL, stalled=True) == 0
    lease.reset()  # a client left (PEER_GONE)
    assert lease.to_ask(0, 256, POOL, stalled=True) == LEASE_CHUNK
