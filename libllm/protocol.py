"""Payloads of the servers' messages, as msgspec Structs: the one definition both ends use.

Pure (no I/O); shared by libllm and the servers (docs/design.md: servers share libllm's pure
modules). Each Struct names the message type it travels with; replies that carry an
error use `microkernel.control.ErrorReply` and a non-zero status instead.
"""

from __future__ import annotations

from typing import Any

import msgspec

# --- memory server (0x03xx) -------------------------------------------------------------


class AllocBlocks(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_ALLOC_BLOCKS: `num_blocks` KV blocks for the sender. With `lease`, they are charged
    to nobody (the scheduler's lease, kept until the scheduler goes); else to `client_id`."""

    num_blocks: int
    client_id: int = 0
    lease: bool = False


class BlockIds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reply to MEM_ALLOC_BLOCKS; payload of MEM_FREE_BLOCKS."""

    block_ids: list[int]


class AllocSegment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_ALLOC_SEGMENT: `size` bytes in the segment region for the sender."""

    size: int
    client_id: int = 0


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A segment: the handle servers take, and where it lies for its owner to map it."""

    segment_id: int
    generation: int
    offset: int
    size: int


class SegmentRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_FREE_SEGMENT: a handle, never an offset."""

    segment_id: int
    generation: int


class SegmentInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reply to MEM_SEGMENT_INFO (whose payload is a `SegmentRef`): where a live segment lies,
    for any endpoint of the instance. A stale or freed handle is an InvalidRequest."""

    segment_id: int
    generation: int
    offset: int  # arena offset of its first byte
    size: int  # bytes reserved (a multiple of the alignment)
    requested: int  # bytes its owner asked for
    owner_id: int  # endpoint that owns it; 0: the instance


class MemoryStatsReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """MEM_STATS: the memory server's figures (U of the KV pool, segments' F) and its
    reclamation counts. Paged F and H are the scheduler's (SCHED_STATS)."""

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int  # leased blocks included
    num_leased_blocks: int
    segment_bytes_total: int
    segment_bytes_used: int
    external_fragmentation: float
    owners: dict[int, int]  # endpoint id -> blocks + segments it holds
    num_reclaimed_blocks: int  # freed because their owner left (PEER_GONE or sweep)
    num_reclaimed_segments: int
    num_swept_blocks: int  # of those, found by the periodic sweep (should stay 0)
    num_swept_segments: int
    num_repairs: int  # table entries fixed when this server rebuilt its view


_encoder = msgspec.msgpack.Encoder()


def pack(obj: Any) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes | memoryview, cls: type[Any]) -> Any:
    """Decode and validate; msgspec raises ValidationError/DecodeError on bad input."""
    return msgspec.msgpack.decode(data, type=cls)


# --- runner (0x04xx) and model facts ------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """RUNNER_MODEL_INFO reply, cached by the scheduler and served as SCHED_MODEL_INFO."""

    model_path: str
    model_sha256: str
    tokenizer_path: str
    context_length: int
    vocab_size: int
    bos_id: int
    stop_ids: list[int]
    block_tokens: int
    num_kv_blocks: int


class Logprob(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A made token's log-probability under the model (the raw distribution, before
    temperature and cuts), and the `top` most likely tokens of the same logits (most likely
    first, ties by id)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


MAX_LOGPROBS = 20  # the most top tokens a request may ask for (OpenAI's limit)
MAX_PRIORITY = 1000  # |priority| at most: priorities scale the scheduler's aging key and name its stats


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


# --- scheduler (0x02xx) -------------------------------------------------------------------


class Submit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """SCHED_SUBMIT: generate after `prompt_ids`. Replies on the same txid: REPLY|MORE
    records carry `Tokens` as they are made (WAKE when `stream`), then one final REPLY
    carries `Finished`. `seed` None: the scheduler picks one and returns it."""

    prompt_ids: list[int]
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    priority: int = 0
    stream: bool = False
    timeout_s: float | None = None
    tenant: str = ""  # honoured only from the gateway
    num_logprobs: int = -1  # >= 0: each token comes with its Logprob and this many top tokens
    prompt_logprobs: bool = False  # also every prompt token's after the first (in Finished); no prefix reuse
    # A prompt longer than libllm's inline limit travels as int32 ids in a segment of the
    # sender's (then `prompt_ids` is empty): `num_prompt_ids` of them, from its first byte.
    prompt_segment: SegmentRef | None = None
    num_prompt_ids: int = 0
    presence_penalty: float = 0.0  # SamplingParams has their definitions
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # A resubmission after a failover: the last this many prompt ids are tokens it made before
    # (the penalties count them as made, so the text goes on as it would have).
    num_resumed_ids: int = 0


PROMPT_ID_DTYPE = "<i4"  # how a long prompt's ids lie in its segment (numpy dtype string)


class Tokens(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    token_ids: list[int]
    logprobs: list[Logprob] = []  # aligned with token_ids when the request asked for them


class Finished(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    finish_reason: str  # "stop", "length", "cancelled", "context", "deadline"
    num_prompt_tokens: int
    num_output_tokens: int
    seed: int
    queue_s: float  # submit -> first step that included it
    ttft_s: float  # submit -> first token
    total_s: float
    prompt_logprobs: list[Logprob] = []  # prompt positions 1 ..., when asked for


class Cancel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """SCHED_CANCEL: stop the request submitted with `txid` on this channel."""

    txid: int
