"""The OpenAI-compatible request bodies the gateway accepts, validated before anything
reaches the servers. Runs inside the gateway process.

Unknown fields are refused (400 naming the field), never silently dropped; fields of
OpenAI's API that llmos does not implement yet are accepted only at their inert values
(null, false, 0, empty), so a client that sends defaults works and one that relies on
them learns at once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmos.libllm.protocol import MAX_LOGPROBS, MAX_PRIORITY

# Field -> the values that ask for nothing (what clients send when the feature is off).
_INERT: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, True, False),
}


def _is_inert(value: Any, inert: tuple[Any, ...]) -> bool:
    # By type too: True == 1, and `repetition_penalty: true` asks for something.
    return any(type(value) is type(v) and value == v for v in inert)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # as vLLM and llama-server take it; 0: off
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # An llmos extension: the scheduler's priority class (higher first under `priority`).
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    # OpenAI's penalties, and vLLM's repetition penalty (libllm.sampling.SamplingParams).
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    # Known to OpenAI's API, not implemented here yet: only their inert values pass.
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None

    @model_validator(mode="after")
    def _refuse_what_we_do_not_do(self) -> _Body:
        for name in self.model_fields_set & _INERT.keys():
            value = getattr(self, name)
            if not _is_inert(value, _INERT[name]):
                raise UnsupportedField(name, value)
        if self.stop is not None and not all(self.stop_list() or [""]):
            raise ValueError("stop strings must not be empty")
        return self

    def penalties(self) -> dict[str, float]:
        """The penalties as libllm takes them (defaults where not given)."""
        return {"presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty}

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wants_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class UnsupportedField(ValueError):
    """A field of OpenAI's API that llmos does not implement, asked for."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(f"{name}={value!r} is not supported by this server")
        self.field = name


class CompletionBody(_Body):
    # Text, token ids, or a list of either: one choice (n of them) per prompt.
    prompt: str | list[str] | list[int] | list[list[int]]
    # Each token's log-probability with this many of the most likely tokens (0..20).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens' log-probabilities) first
    best_of: Any = None
    suffix: Any = None

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": a template may use it; we pass role/content
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    # The model's chat template turns these into the prompt (libllm/chat.py).
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
