"""The scheduler's counters (steps, tokens, preemptions, scheduling delay) and their snapshot.

Kept by the scheduler process's Scheduler; the server loop reports the snapshot (stats(),
/metrics). Plain numbers only: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from llmos.servers.scheduler.sequence import Sequence

DELAY_WINDOW = 4096  # scheduling delays kept for percentiles (the most recent ones)
PRIORITY_WINDOW = 1024  # the same, per priority
MAX_PRIORITIES = 64  # priorities with their own window (priorities are the clients' ints)
MAX_CLIENTS = 1024  # clients (tenants) whose finished requests are counted each on its own

K = TypeVar("K", int, str)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    """Counters since start. Token counts include only steps whose reply came back.

    The scheduling delay of a sequence (docs/design.md's T_s, in steps) is the id of the first
    step that includes it minus the number of steps planned before it arrived. Percentiles
    are nearest-rank over the most recent delays (0 when there are none). Queue lengths are
    now: "waiting" includes preempted and descheduled sequences; clients are keyed by
    ``str(tenant)``, "" for sequences with none.
    """

    num_steps: int  # plans made
    num_steps_in_flight: int
    num_steps_requeued: int
    num_waiting: int
    num_running: int
    num_computed_tokens: int  # every token position a step computed (recomputation included)
    num_prompt_tokens: int  # those at prompt positions
    num_generated_tokens: int  # output tokens made (a stop token is not one)
    num_preemptions: int  # sequences whose blocks were taken (they recompute, losing nothing)
    num_preempted_tokens: int  # KV positions those preemptions dropped, to be recomputed
    num_yields: int  # descheduled by the policy (round robin) with their blocks kept
    num_finished: int
    num_delayed_seqs: int  # sequences that reached a first step
    sum_delay_steps: int
    max_delay_steps: int
    recent_delay_steps: tuple[int, ...]  # the last DELAY_WINDOW delays, for p50/p99
    delay_p50_steps: int
    delay_p99_steps: int
    delay_p50_steps_by_priority: dict[int, int]
    delay_p99_steps_by_priority: dict[int, int]
    num_finished_by_priority: dict[int, int]
    num_finished_by_client: dict[str, int]  # since start, for the first MAX_CLIENTS clients
    num_waiting_by_priority: dict[int, int]
    num_running_by_priority: dict[int, int]
    num_waiting_by_client: dict[str, int]
    num_running_by_client: dict[str, int]
    num_waiting_with_kv: int  # descheduled sequences holding their blocks
    num_kv_blocks_by_client: dict[str, int]  # distinct blocks each client's sequences hold (its quota's count)
    # H (docs/design.md): prompt tokens served from the prefix cache / prompt tokens looked up.
    num_prefix_lookup_tokens: int  # full-block prompt positions looked up at first admissions
    num_prefix_hit_tokens: int  # of those, found cached (their KV was not computed again)
    prefix_hit_rate: float
    num_reused_tokens: int  # every admission's cached positions, preempted ones coming back too
    # F, paged (docs/design.md): allocated-but-unused token slots / allocated, over the blocks the
    # sequences hold now (a block shared by several counts once).
    num_kv_blocks_held: int
    num_kv_slots_filled: int
    paged_fragmentation: float


def percentile(values: Iterable[int], q: float) -> int:
    """Nearest-rank percentile ``q`` in (0, 1] of ``values``; 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0
    rank = math.ceil(q * len(ordered) - 1e-9)  # the epsilon: 0.99 * 100 is not quite 99
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def client_label(tenant: Hashable) -> str:
    return "" if tenant is None else str(tenant)


@dataclass(slots=True)
class Counters:
    """The mutable side of SchedulerStats (the scheduler adds the queue lengths)."""

    num_steps_requeued: int = 0
    num_computed_tokens: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_preempted_tokens: int = 0
    num_yields: int = 0
    num_finished: int = 0
    num_delayed_seqs: int = 0
    sum_delay_steps: int = 0
    max_delay_steps: int = 0
    recent_delays: deque[int] = field(default_factory=lambda: deque(maxlen=DELAY_WINDOW))
    delays_by_priority: dict[int, deque[int]] = field(default_factory=dict)
    num_finished_by_priority: Counter[int] = field(default_factory=Counter)
    num_finished_by_client: Counter[str] = field(default_factory=Counter)
    num_prefix_lookup_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_reused_tokens: int = 0

    def record_delay(self, delay: int, priority: int = 0) -> None:
        self.num_delayed_seqs += 1
        self.sum_delay_steps += delay
        self.max_delay_steps = max(self.max_delay_steps, delay)
        self.recent_delays.append(delay)
        window = self.delays_by_priority.get(priority)
        if window is None and len(self.delays_by_priority) < MAX_PRIORITIES:
            window = self.delays_by_priority[priority] = deque(maxlen=PRIORITY_WINDOW)
        if window is not None:  # past MAX_PRIORITIES, only in the overall window
            window.append(delay)

    def record_finish(self, priority: int, client: str = "") -> None:
        self.num_finished += 1
        by_priority = self.num_finished_by_priority
        if priority in by_priority or len(by_priority) < MAX_PRIORITIES:
            by_priority[priority] += 1
        by_client = self.num_finished_by_client
        if client in by_client or len(by_client) < MAX_CLIENTS:
            by_client[client] += 1

    def snapshot(
        self,
        *,
        num_steps: int,
        num_steps_in_flight: int,
        waiting: Iterable[Sequence],
        running: Iterable[Sequence],
        block_tokens: int,
    ) -> SchedulerStats:
        waiting, running = list(waiting), list(running)
        filled = _filled_slots([*running, *waiting], block_tokens)
        slots = len(filled) * block_tokens
        return SchedulerStats(
            num_steps=num_steps,
            num_steps_in_flight=num_steps_in_flight,
            num_steps_requeued=self.num_steps_requeued,
            num_waiting=len(waiting),
            num_running=len(running),
            num_computed_tokens=self.num_computed_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=self.num_preemptions,
            num_preempted_tokens=self.num_preempted_tokens,
            num_yields=self.num_yields,
            num_finished=self.num_finished,
            num_delayed_seqs=self.num_delayed_seqs,
            sum_delay_steps=self.sum_delay_steps,
            max_delay_steps=self.max_delay_steps,
            recent_delay_steps=tuple(self.recent_delays),
            delay_p50_steps=percentile(self.recent_delays, 0.5),
            delay_p99_steps=percentile(self.recent_delays, 0.99),
            delay_p50_steps_by_priority={
                p: percentile(d, 0.5) for p, d in sorted(self.delays_by_priority.items())
            },
            delay_p99_steps_by_priority={
                p: percentile(d, 0.99) for p, d in sorted(self.delays_by_priority.items())
            },
            num_finished_by_priority=dict(sorted(self.num_finished_by_priority.items())),
            num_finished_by_client=dict(sorted(self.num_finished_by_client.items())),
            num_waiting_by_priority=_count(s.priority for s in waiting),
            num_running_by_priority=_count(s.priority for s in running),
            num_waiting_by_client=_count(client_label(s.tenant) for s in waiting),
            num_running_by_client=_count(client_label(s.tenant) for s in running),
            num_waiting_with_kv=sum(1 for s in waiting if s.block_table),
            num_kv_blocks_by_client=_blocks_by_client([*running, *waiting]),
            num_prefix_lookup_tokens=self.num_prefix_lookup_tokens,
            num_prefix_hit_tokens=self.num_prefix_hit_tokens,
            prefix_hit_rate=self.num_prefix_hit_tokens / max(1, self.num_prefix_lookup_tokens),
            num_reused_tokens=self.num_reused_tokens,
            num_kv_blocks_held=len(filled),
            num_kv_slots_filled=sum(filled.values()),
            paged_fragmentation=(slots - sum(filled.values())) / slots if slots else 0.0,
        )


def _filled_slots(seqs: Iterable[Sequence], block_tokens: int) -> dict[int, int]:
    """Block id -> token slots of it that hold computed KV, over the blocks ``seqs`` hold."""
    filled: dict[int, int] = {}
    for seq in seqs:
        for i, block_id in enumerate(seq.block_table):
            used = max(0, min(block_tokens, seq.num_computed - i * block_tokens))
            filled[block_id] = max(filled.get(block_id, 0), used)
    return filled


def _blocks_by_client(seqs: Iterable[Sequence]) -> dict[str, int]:
    blocks: dict[str, set[int]] = {}
    for seq in seqs:
        if seq.block_table:
            blocks.setdefault(client_label(seq.tenant), set()).update(seq.block_table)
    return {client: len(ids) for client, ids in sorted(blocks.items())}


def _count(keys: Iterable[K]) -> dict[K, int]:
    return dict(sorted(Counter(keys).items()))
