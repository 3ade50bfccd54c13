"""What the scheduler tells its server loop to send to clients: tokens and finishes.

Made by the scheduler process (pure logic); the server loop turns each into a reply on the
client's ring. Immutable values that carry no transport detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from llmos.libllm.protocol import Logprob
from llmos.servers.scheduler.sequence import FinishReason


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """Sequence ``seq_id`` produced ``token_id``, its ``index``-th output token (from 0)."""

    seq_id: int
    token_id: int
    index: int
    logprob: Logprob | None = None  # when the request asked for logprobs


@dataclass(slots=True, frozen=True)
class FinishEvent:
    """Sequence ``seq_id`` is done; its blocks are already freed. A stop token that ended
    it is not counted in ``num_output_tokens`` (nor sent as a TokenEvent)."""

    seq_id: int
    reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(slots=True, frozen=True)
class PromptLogprobsEvent:
    """Sequence ``seq_id``'s prompt tokens from ``first_pos`` on have these Logprobs (a
    recomputation after a preemption sends them again: the same values)."""

    seq_id: int
    first_pos: int
    logprobs: list[Logprob]


Event: TypeAlias = TokenEvent | FinishEvent | PromptLogprobsEvent
