"""The scheduler's counters (steps, tokens, preemptions, scheduling delay) and their snapshot.

Kept by the scheduler process's Scheduler; the server loop reports the snapshot (stats(),
/metrics). Plain numbers only: no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DELAY_WINDOW = 4096  # scheduling delays kept for percentiles (the most recent ones)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    """Counters since start. Token counts include only steps whose reply came back.

    The scheduling delay of a sequence (DESIGN.md's T_s, in steps) is the id of the first
    step that includes it minus the number of steps planned before it arrived.
    """

    num_steps: int  # plans made
    num_steps_in_flight: int
    num_steps_requeued: int
    num_waiting: int
    num_running: int
    num_computed_tokens: int  # every token position a step computed (recomputation included)
    num_prompt_tokens: int  # those at prompt positions
    num_generated_tokens: int  # output tokens made (a stop token is not one)
    num_preemptions: int
    num_finished: int
    num_delayed_seqs: int  # sequences that reached a first step
    sum_delay_steps: int
    max_delay_steps: int
    recent_delay_steps: tuple[int, ...]  # the last DELAY_WINDOW delays, for p50/p99


@dataclass(slots=True)
class Counters:
    """The mutable side of SchedulerStats (the scheduler adds the queue lengths)."""

    num_steps_requeued: int = 0
    num_computed_tokens: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_delayed_seqs: int = 0
    sum_delay_steps: int = 0
    max_delay_steps: int = 0
    recent_delays: deque[int] = field(default_factory=lambda: deque(maxlen=DELAY_WINDOW))

    def record_delay(self, delay: int) -> None:
        self.num_delayed_seqs += 1
        self.sum_delay_steps += delay
        self.max_delay_steps = max(self.max_delay_steps, delay)
        self.recent_delays.append(delay)

    def snapshot(
        self, *, num_steps: int, num_steps_in_flight: int, num_waiting: int, num_running: int
    ) -> SchedulerStats:
        return SchedulerStats(
            num_steps=num_steps,
            num_steps_in_flight=num_steps_in_flight,
            num_steps_requeued=self.num_steps_requeued,
            num_waiting=num_waiting,
            num_running=num_running,
            num_computed_tokens=self.num_computed_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
            num_preemptions=self.num_preemptions,
            num_finished=self.num_finished,
            num_delayed_seqs=self.num_delayed_seqs,
            sum_delay_steps=self.sum_delay_steps,
            max_delay_steps=self.max_delay_steps,
            recent_delay_steps=tuple(self.recent_delays),
        )
