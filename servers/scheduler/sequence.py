"""Sequence: one request as the scheduler tracks it, from arrival to finish.

Lives in the scheduler process. Owns a request's token ids, its progress (how many tokens
have KV written) and its block table; the blocks themselves are held through the
scheduler's BlockSource. Pure data: no I/O, no reference to a runner or a client.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from llmos.libllm.sampling import GREEDY as GREEDY
from llmos.libllm.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "context", "deadline"]


class SeqStatus(Enum):
    # Queued for admission: new, preempted (no blocks, recomputes), or descheduled by a
    # policy (round robin) with its blocks and KV kept, so it resumes where it stopped.
    WAITING = "waiting"
    RUNNING = "running"  # admitted: holds blocks, gets a chunk in steps
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class OwnClient:
    """The client of a sequence whose ``tenant`` is None: itself alone."""

    seq_id: int


# The scheduler only carries a request's sampling to the runner; the one definition lives in
# libllm (a pure module every server may import).
Sampling = SamplingParams


class Sequence:
    """A request's tokens and progress.

    ``token_ids`` is ``prompt_ids + output_ids``; the KV of the first ``num_computed`` of
    them is written (counted only once a step's reply is back). The next chunk to compute
    is ``token_ids[num_computed:]``: the prompt (or, after a preemption, prompt and output)
    in chunks, then the newest token alone, one decode per step.

    ``tenant`` names whose share the request counts against under the "fair" policy,
    and whose KV block quota its blocks count against (a tenant, or a connection); None
    makes the request a client of its own. ``priority``:
    higher goes first under the "priority" policy.
    """

    __slots__ = (
        "arrival_order",
        "arrival_step",
        "block_hashes",
        "block_table",
        "deadline",
        "finish_reason",
        "first_step",
        "is_cancel_requested",
        "is_in_flight",
        "is_paused",
        "max_tokens",
        "num_computed",
        "num_preemptions",
        "num_published",
        "num_resumed",
        "num_yields",
        "output_ids",
        "priority",
        "prompt_ids",
        "prompt_logprobs",
        "sampling",
        "seq_id",
        "status",
        "stop_ids",
        "tenant",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_ids: Iterable[int],
        *,
        max_tokens: int,
        sampling: Sampling = GREEDY,
        stop_ids: Iterable[int] = (),
        priority: int = 0,
        deadline: float | None = None,
        tenant: Hashable = None,
        prompt_logprobs: bool = False,
        num_resumed: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.tenant = tenant
        self.prompt_ids: tuple[int, ...] = tuple(int(t) for t in prompt_ids)
        self.output_ids: list[int] = []
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop_ids: frozenset[int] = frozenset(stop_ids)
        self.priority = priority
        self.deadline = deadline  # absolute, on the clock the caller passes to the scheduler
        # Every prompt token's Logprob is wanted: its prompt is computed in full (no prefix reuse).
        self.prompt_logprobs = prompt_logprobs
        # A resubmission after a failover: its last num_resumed prompt ids are tokens it made.
        self.num_resumed = num_resumed
        if not self.prompt_ids:
            raise ValueError("the prompt needs at least one token (e.g. BOS)")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if deadline is not None and math.isnan(deadline):
            raise ValueError("deadline must be a number or None")
        # Set by the scheduler.
        self.status = SeqStatus.WAITING
        self.arrival_order = -1  # rank among arrivals (fcfs order)
        self.arrival_step = -1  # steps planned before it arrived
        self.first_step = -1  # id of the first step that included it
        self.block_table: list[int] = []  # kept while WAITING only after a deschedule
        self.num_computed = 0
        # Prefix caching: the chained hash of each full block of token_ids (filled lazily;
        # tokens never change, so it outlives a preemption), and how many of the blocks in
        # block_table are named by theirs in the scheduler's block cache.
        self.block_hashes: list[int] = []
        self.num_published = 0
        self.num_preemptions = 0  # times its blocks were taken (it recomputes)
        self.num_yields = 0  # times a policy descheduled it with its blocks kept
        self.is_in_flight = False  # in a planned step whose reply is not back
        self.is_cancel_requested = False
        self.is_paused = False  # left out of steps until resumed (client backpressure)
        self.finish_reason: FinishReason | None = None

    @property
    def client(self) -> Hashable:
        """Whose share and KV quota this sequence counts against."""
        return OwnClient(self.seq_id) if self.tenant is None else self.tenant

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """``token_ids[start:stop]`` without building the whole list."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        head = self.prompt_ids[start:] if start < p else ()
        return head + tuple(self.output_ids[max(start - p, 0) : stop - p])

    def penalty_history(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What the sampling penalties count: the request's own prompt (only when the
        repetition penalty reads it) and every token it has made, before a failover too."""
        first = len(self.prompt_ids) - self.num_resumed
        prompt = self.prompt_ids[:first] if self.sampling.repetition_penalty != 1.0 else ()
        return prompt, self.prompt_ids[first:] + tuple(self.output_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed}, blocks={len(self.block_table)})"
        )
