"""Internal: the runners' messages (0x04xx), which only the scheduler sends: a step over
KV blocks, and what it made. Clients never see these (the scheduler's module has the model
facts a runner reports and the Logprob it makes)."""

from __future__ import annotations

import msgspec

from llmos.libllm.protocol.scheduler import Logprob


class StepChunk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One sequence's share of a step: `token_ids` at positions start_pos, start_pos+1...
    With `wants_token`, a token is sampled at the chunk's end with (seed, position); with
    `num_steps` > 1 the runner goes on decoding, up to that many tokens or a stop id, so
    `block_table` must cover the positions those extra tokens are fed at."""

    seq_id: int
    block_table: list[int]
    start_pos: int
    token_ids: list[int]
    wants_token: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_steps: int = 1
    num_logprobs: int = -1  # >= 0: each made token's Logprob with this many top tokens
    # Also the Logprob of the token after each row (a prompt's): token_ids[1:], then
    # next_token_id (-1: the chunk ends the prompt; the made token's Logprob covers it).
    prompt_logprobs: bool = False
    next_token_id: int = -1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # With penalties: the request's prompt (without tokens it made) and the tokens it has made.
    penalty_prompt_ids: list[int] = []
    penalty_output_ids: list[int] = []


class Step(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """RUNNER_STEP: compute these chunks over the KV blocks they name."""

    step_id: int
    chunks: list[StepChunk]


class StepResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """RUNNER_STEP reply: the tokens each chunk made (none where none was asked for)."""

    step_id: int
    token_ids: list[list[int]]
    compute_s: float
    logprobs: list[list[Logprob]] = []  # per chunk, aligned with its token_ids where asked (else empty)
    prompt_logprobs: list[list[Logprob]] = []  # per chunk that asked: positions start_pos + 1 ...
