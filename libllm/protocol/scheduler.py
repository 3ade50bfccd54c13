"""The scheduler's messages (0x02xx), what clients send and receive: a submit, its tokens
and its end, a cancel, and the model's facts (SCHED_MODEL_INFO, as a runner reports them)."""

from __future__ import annotations

import msgspec

from llmos.libllm.protocol.memory import SegmentRef


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
