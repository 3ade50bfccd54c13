"""Backpressure (backpressure.py): a client that stops reading pauses its own sequences and
nobody else's, and they run again once it has read its replies. Checked against the real
Scheduler: what it plans is what the clients see."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from llmos.servers.scheduler import Scheduler
from llmos.servers.scheduler.backpressure import Backpressure
from tests.servers.scheduler.fakes import make
from tests.servers.scheduler.test_scheduler import no_stop_spec

LIMIT = 32
SLOW, FAST = 7, 8
OWNERS = {1: SLOW, 2: SLOW, 3: FAST}  # seq_id -> the channel of its client


def backlog(n: int) -> deque[bytes]:
    return deque([b"reply"] * n)


def apply(sched: Scheduler, pause: list[int], resume: list[int]) -> None:
    """What the server loop does with the answer."""
    for seq_id in pause:
        sched.pause(seq_id)
    for seq_id in resume:
        sched.resume(seq_id)


def planned(sched: Scheduler) -> set[int]:
    plan = sched.schedule(0.0)
    if plan is None:
        return set()
    sched.requeue(plan)  # only what it would run is looked at
    sched.pop_events()
    return set(plan.seq_ids)


def scheduler() -> Scheduler:
    sched, _blocks, _runner = make(64)
    for seq_id in OWNERS:
        sched.add(no_stop_spec(4, 20, salt=seq_id).make(seq_id))
    return sched


def test_a_client_over_the_limit_pauses_only_its_own_sequences_until_it_has_read_them_all() -> None:
    sched, bp = scheduler(), Backpressure()
    assert planned(sched) == {1, 2, 3}
    backlogs = {SLOW: backlog(LIMIT), FAST: backlog(LIMIT - 1)}  # FAST is behind, but under the limit
    pause, resume = bp.update(backlogs, LIMIT, OWNERS.items())
    assert (sorted(pause), resume) == ([1, 2], [])
    apply(sched, pause, resume)
    assert planned(sched) == {3} and bp.is_paused(SLOW) and not bp.is_paused(FAST)
    assert bp.update(backlogs, LIMIT, OWNERS.items()) == ([], [])  # no change, nothing to do
    backlogs[SLOW].popleft()  # reading, but not all of it yet: still paused
    assert bp.update(backlogs, LIMIT, OWNERS.items()) == ([], [])
    backlogs[SLOW].clear()
    pause, resume = bp.update(backlogs, LIMIT, OWNERS.items())
    assert (pause, sorted(resume)) == ([], [1, 2])
    apply(sched, pause, resume)
    assert planned(sched) == {1, 2, 3} and not bp.is_paused(SLOW)


def test_a_paused_client_that_leaves_is_forgotten() -> None:
    bp = Backpressure()
    bp.update({SLOW: backlog(LIMIT)}, LIMIT, OWNERS.items())
    # Its backlog went with it (PEER_GONE), and so did its requests.
    pause, resume = bp.update({FAST: backlog(1)}, LIMIT, [(3, FAST)])
    assert (pause, resume) == ([], []) and not bp.is_paused(SLOW)


def test_the_requests_are_read_only_when_a_client_changes_state() -> None:
    """Every pass of the server loop asks; a pass with no change costs no walk over requests."""

    class Unread:
        def __iter__(self) -> Iterator[tuple[int, int]]:
            raise AssertionError("read the requests with no client changing state")

    bp = Backpressure()
    for _ in range(3):
        assert bp.update({SLOW: backlog(1), FAST: backlog(0)}, LIMIT, Unread()) == ([], [])
