"""The scheduling-policy seam: the order in which sequences get admission, budget and blocks.

Runs in the scheduler process. A policy ranks sequences and keeps its own bookkeeping
(counters, quanta) through hooks the scheduler calls; the scheduler does the admitting,
budgeting, descheduling and preempting. A policy never touches blocks or plans. The
policies a config names are in policies.py (priority, round robin) and fair.py.
"""

from __future__ import annotations

from llmos.servers.scheduler.sequence import Sequence

Rank = tuple[float, ...]


class Policy:
    """``rank(seq)``: lower goes first. Waiting sequences are admitted in rank order; running
    ones get the step's budget in rank order; a sequence short of blocks may take them only
    from sequences of a strictly higher (worse) rank, the worst first (the victim).

    The scheduler keeps its queues sorted by rank. A policy whose ranks change while a
    sequence is queued (counters that grow with service) sets ``is_dynamic``: the scheduler
    then re-sorts at the start of every ``schedule`` and after every admission. Otherwise
    a rank may change only in ``on_yield`` (the sequence is out of the queues then).

    Hooks, in a sequence's life: ``on_arrival`` (added), ``on_admit`` (waiting -> running;
    ``seq.first_step == -1`` the first time), ``on_tokens`` (output tokens made, per
    reply), ``wants_yield`` (asked between steps of a running sequence while others wait;
    True deschedules it with its blocks kept), ``on_yield``, ``on_finish``.
    """

    name = "policy"
    is_dynamic = False

    def rank(self, seq: Sequence) -> Rank:
        raise NotImplementedError

    def on_arrival(self, seq: Sequence) -> None:
        return None

    def on_admit(self, seq: Sequence) -> None:
        return None

    def on_tokens(self, seq: Sequence, num_tokens: int) -> None:
        return None

    def wants_yield(self, seq: Sequence) -> bool:
        return False

    def on_yield(self, seq: Sequence) -> None:
        return None

    def on_finish(self, seq: Sequence) -> None:
        return None


class Fcfs(Policy):
    """First come, first served: arrival order. A preempted sequence keeps its arrival
    rank, so it goes back to the front of the waiting queue."""

    name = "fcfs"

    def rank(self, seq: Sequence) -> Rank:
        return (seq.arrival_order,)
