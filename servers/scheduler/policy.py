"""Scheduling policies: the order in which sequences get admission, budget and blocks.

Runs in the scheduler process. A policy only ranks sequences; the scheduler does the
admitting, budgeting and preempting. It never touches blocks or plans.
"""

from __future__ import annotations

from typing import Protocol

from servers.scheduler.sequence import Sequence


class Policy(Protocol):
    """``rank(seq)``: lower goes first. Waiting sequences are admitted in rank order; running
    ones get the step's budget in rank order; a sequence short of blocks may preempt only
    running sequences of a strictly higher (worse) rank, the worst first.

    Ranks must not change while a sequence is queued (the scheduler keeps its queues
    sorted by insertion). Priority with aging, round-robin and fair share would re-rank
    at a hook in ``Scheduler.schedule``; fcfs does not need one.
    """

    name: str

    def rank(self, seq: Sequence) -> tuple[int, ...]: ...


class Fcfs:
    """First come, first served: arrival order. A preempted sequence keeps its arrival
    rank, so it goes back to the front of the waiting queue."""

    name = "fcfs"

    def rank(self, seq: Sequence) -> tuple[int, ...]:
        return (seq.arrival_order,)


def make_policy(name: str) -> Policy:
    if name == "fcfs":
        return Fcfs()
    raise ValueError(f"unknown scheduling policy {name!r}")
