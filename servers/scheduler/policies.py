"""The policies a SchedulerConfig names: priority with aging, round robin, and make_policy.

Runs in the scheduler process, behind the Policy seam (policy.py); fair share is in
fair.py. Times are counted in scheduler steps (``Sequence.arrival_step`` is the number of
steps planned before the sequence arrived), never in seconds.
"""

from __future__ import annotations

from llmos.servers.scheduler.config import SchedulerConfig
from llmos.servers.scheduler.fair import Fair
from llmos.servers.scheduler.policy import Fcfs, Policy, Rank
from llmos.servers.scheduler.sequence import Sequence


class Priority(Policy):
    """Higher ``Sequence.priority`` first; waiting raises a request's effective priority.

    Aging: a request of priority ``p`` that arrived at step ``a`` has, at step ``t``, the
    effective priority ``p + (t - a) / aging_steps``. Every request ages at the same rate,
    so comparing two effective priorities is comparing the fixed keys ``a - p * K``
    (K = ``aging_steps``): the rank is ``(a - p * K, arrival order)`` and never changes
    while a request waits (a preempted one keeps it, so its aging continues).

    Bound (no starvation): a request of priority ``p`` arriving at step ``a`` goes before
    every request of priority at most ``P`` that arrives at step ``a + (P - p) * K`` or
    later. It waits only for requests queued before it and those of higher priority
    arriving in the next ``(P - p) * K`` steps. Under a flood at priority ``P_max`` that the
    scheduler keeps up with (each step's arrivals fit in that step), it is admitted in the
    step planned ``(P_max - p) * K`` steps after its arrival: T_s <= (P_max - p) * K.

    Victims under memory pressure: the worst key, i.e. the lowest effective priority, the
    latest arrival among equals.
    """

    name = "priority"

    def __init__(self, aging_steps: int) -> None:
        if aging_steps <= 0:
            raise ValueError(f"aging_steps must be positive, got {aging_steps}")
        self.aging_steps = aging_steps

    def rank(self, seq: Sequence) -> Rank:
        return (seq.arrival_step - seq.priority * self.aging_steps, seq.arrival_order)

    def effective_priority(self, seq: Sequence, step: int) -> float:
        """``seq``'s priority at step ``step``, aged since its arrival."""
        return seq.priority + (step - seq.arrival_step) / self.aging_steps


class RoundRobin(Policy):
    """Turns in a circle: each sequence, once admitted, makes ``quantum`` output tokens,
    then yields to the waiting ones and queues behind them.

    A yielding sequence is descheduled, not preempted: it keeps its blocks and its KV, so it
    resumes with no recomputation, unless memory runs short meanwhile (a yielded sequence
    queues behind the waiting ones, so they may take its blocks: it is then preempted and
    recomputes later). It yields only when an unpaused sequence is waiting. A multi-step
    decode chunk may overrun the quantum by up to ``decode_steps - 1`` tokens.

    Bound (blocks permitting): with room for ``m`` running and ``n`` sequences ahead of it in
    the circle, a waiting sequence is admitted within ``ceil((n + 1) / m)`` rounds, a round
    lasting at most ``quantum`` decode steps plus the prefill steps of those admitted.
    """

    name = "rr"

    def __init__(self, quantum: int) -> None:
        if quantum <= 0:
            raise ValueError(f"quantum must be positive, got {quantum}")
        self.quantum = quantum
        self._turns: dict[int, int] = {}  # seq_id -> place in the circle (lower goes first)
        self._num_made: dict[int, int] = {}  # seq_id -> tokens made since (re)admission
        self._next_turn = 0

    def rank(self, seq: Sequence) -> Rank:
        return (self._turns[seq.seq_id],)

    def on_arrival(self, seq: Sequence) -> None:
        self._take_turn(seq)
        self._num_made[seq.seq_id] = 0

    def on_admit(self, seq: Sequence) -> None:
        self._num_made[seq.seq_id] = 0

    def on_tokens(self, seq: Sequence, num_tokens: int) -> None:
        self._num_made[seq.seq_id] += num_tokens

    def wants_yield(self, seq: Sequence) -> bool:
        return self._num_made[seq.seq_id] >= self.quantum

    def on_yield(self, seq: Sequence) -> None:
        self._take_turn(seq)

    def on_finish(self, seq: Sequence) -> None:
        del self._turns[seq.seq_id], self._num_made[seq.seq_id]

    def _take_turn(self, seq: Sequence) -> None:
        self._turns[seq.seq_id] = self._next_turn
        self._next_turn += 1


def make_policy(config: SchedulerConfig) -> Policy:
    """The policy ``config.policy`` names, with its parameters from ``config``."""
    if config.policy == "fcfs":
        return Fcfs()
    if config.policy == "priority":
        return Priority(config.aging_steps)
    if config.policy == "rr":
        return RoundRobin(config.quantum)
    if config.policy == "fair":
        return Fair(config.tenant_weights, config.default_weight)
    raise ValueError(f"unknown scheduling policy {config.policy!r}")
