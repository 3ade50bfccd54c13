"""StepPlan and ChunkPlan: one step as the scheduler hands it to a runner.

Made by the scheduler process, read by its server loop (which writes it to the arena for
a runner). Immutable values holding everything a runner needs, so a plan can be sent,
kept while in flight, re-sent to another runner, and compared; never a live Sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmos.servers.scheduler.sequence import Sampling


@dataclass(slots=True, frozen=True)
class ChunkPlan:
    """One sequence's share of a step: ``token_ids`` at positions ``start_pos...``.

    ``block_table`` covers at least positions below ``end_pos + num_steps - 1``. When
    ``wants_token``, the runner samples the token at position ``end_pos`` with ``sampling``
    (the draw is a function of (seed, end_pos)); otherwise it computes KV only (a prefill
    chunk that does not reach the end of the sequence's tokens). With ``num_steps`` > 1 it
    goes on decoding: up to ``num_steps`` tokens, fewer if it samples a stop id.
    """

    seq_id: int
    block_table: tuple[int, ...]
    start_pos: int
    token_ids: tuple[int, ...]
    wants_token: bool
    sampling: Sampling
    num_steps: int = 1
    prompt_logprobs: bool = False  # the runner also reports each next prompt token's Logprob
    next_token_id: int = -1  # the prompt token after this chunk (-1: it ends the prompt)
    # With penalties (sampling.has_penalties): what they count, Sequence.penalty_history's.
    penalty_prompt_ids: tuple[int, ...] = ()
    penalty_output_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True, frozen=True)
class StepPlan:
    """A batch for one runner. ``step_id`` is unique per scheduler and increasing; a
    sequence appears in at most one chunk, and in at most one plan in flight."""

    step_id: int
    chunks: tuple[ChunkPlan, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def seq_ids(self) -> tuple[int, ...]:
        return tuple(c.seq_id for c in self.chunks)


def sampled_tokens(
    plan: StepPlan, sampled: Mapping[int, Any] | Iterable[Any], vocab_size: int
) -> list[list[int] | None]:
    """The tokens a runner's reply gives each chunk of ``plan`` (None where none is wanted).

    Args:
        sampled: one value per chunk in order, or a mapping seq_id -> value; a value is a
            token, or the list of tokens a multi-step chunk made (1 to ``num_steps``).
            Anything may stand where a chunk wants no token.

    Raises:
        ValueError: a wanted token is missing, outside ``[0, vocab_size)``, or more than
            the chunk's ``num_steps``.
    """
    if isinstance(sampled, Mapping):
        missing = [c.seq_id for c in plan.chunks if c.wants_token and c.seq_id not in sampled]
        if missing:
            raise ValueError(f"step {plan.step_id}: no token for sequences {missing}")
        raw = [sampled[c.seq_id] if c.wants_token else None for c in plan.chunks]
    else:
        values = list(sampled)
        if len(values) != len(plan.chunks):
            raise ValueError(
                f"step {plan.step_id}: {len(values)} tokens for {len(plan.chunks)} chunks"
            )
        raw = [v if c.wants_token else None for c, v in zip(plan.chunks, values, strict=True)]
    tokens: list[list[int] | None] = []
    for chunk, value in zip(plan.chunks, raw, strict=True):
        if value is None:
            tokens.append(None)
            continue
        made = [int(t) for t in value] if isinstance(value, (list, tuple)) else [int(value)]
        if not 1 <= len(made) <= chunk.num_steps or any(not 0 <= t < vocab_size for t in made):
            raise ValueError(
                f"step {plan.step_id}: sequence {chunk.seq_id} needs 1..{chunk.num_steps} tokens "
                f"in [0, {vocab_size}), got {made}"
            )
        tokens.append(made)
    return tokens
