"""The OpenAI-compatible request bodies the gateway accepts, validated before anything
reaches the servers. Runs inside the gateway process."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    # An llmos extension: the scheduler's priority class (higher first under `priority`).
    priority: int = Field(default=0, ge=-1000, le=1000)

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(_Body):
    prompt: str | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class ChatBody(_Body):
    # The model's chat template turns these into the prompt (libllm/chat.py).
    messages: list[ChatMessage] = Field(min_length=1)
