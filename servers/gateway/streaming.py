"""Server-sent events for streamed completions: every choice of a request in one stream,
each chunk naming its index, in the order tokens arrive; chat's first delta carries the
role, the last chunk of each choice its finish reason, and a usage chunk closes the stream
when asked (`stream_options.include_usage`). What arrives together (a burst of tokens) goes
out in one write, not a write per token. A client that goes away cancels every choice.
Runs in the gateway process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llmos.libllm.request import Request
from llmos.libllm.tokenizer import Tokenizer
from llmos.microkernel.errors import LlmosError
from llmos.servers.gateway.backend import Backend
from llmos.servers.gateway.logprobs import chat_logprobs, completion_logprobs
from llmos.servers.gateway.metrics import GatewayMetrics


@dataclass(slots=True)
class Choice:
    index: int
    request: Request
    prompt_tokens: int  # the prompt's length on its first choice, 0 on the others (usage counts it once)
    echo: str = ""  # the prompt's text, sent first (completions' echo)
    num_sent: int = 0  # tokens whose logprobs went out


_DONE = object()


def finish_reason(reason: str | None) -> str:
    """OpenAI's words: "length" when max_tokens (or the context) ended it, else "stop"."""
    return "length" if reason in ("length", "context") else "stop"


async def sse_stream(session: Backend, choices: list[Choice], kind: str, rid: str, model: str,
                     include_usage: bool, metrics: GatewayMetrics, tokenizer: Tokenizer,
                     counted: Callable[[int], None] | None = None) -> AsyncIterator[str]:
    """The SSE events of `choices`; `counted` hears each finished choice's token count."""
    started = time.monotonic()
    created = int(time.time())
    arrivals: asyncio.Queue[tuple[Choice, object]] = asyncio.Queue()

    async def follow(choice: Choice) -> None:
        try:
            async for piece in session.pieces(choice.request):
                await arrivals.put((choice, piece))
            await arrivals.put((choice, _DONE))
        except LlmosError as exc:
            await arrivals.put((choice, exc))

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                                "choices": [] if choice is None else [choice]}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def new_logprobs(choice: Choice) -> dict[str, Any] | None:
        """The logprobs of the tokens received since the last chunk (when asked for)."""
        received = choice.request.logprobs_from(choice.num_sent)
        if received is None:
            return None
        ids, values = received
        choice.num_sent += len(values)
        if kind == "text_completion":
            return completion_logprobs(tokenizer, ids, values)
        return chat_logprobs(tokenizer, ids, values)

    def chunk(choice: Choice, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        logprobs = None if role else new_logprobs(choice)
        if kind == "text_completion":
            return {"index": choice.index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    tasks = [asyncio.create_task(follow(c)) for c in choices]
    last_piece: dict[int, float] = {}
    prompt_tokens = sum(c.prompt_tokens for c in choices)  # OpenAI counts each prompt once: see Choice
    completion_tokens = 0
    try:
        for c in choices:
            if kind != "text_completion":
                yield event(chunk(c, None, None, role=True))
            elif c.echo:
                yield event({"index": c.index, "text": c.echo, "logprobs": None, "finish_reason": None})
        remaining = len(choices)
        while remaining:
            arrived = [await arrivals.get()]
            while not arrivals.empty():  # what came with it (a burst of tokens): one write for all
                arrived.append(arrivals.get_nowait())
            now = time.monotonic()
            out: list[str] = []
            for choice, item in arrived:
                if isinstance(item, str):
                    before = last_piece.get(choice.index)
                    if before is None:
                        metrics.ttft.observe(now - started)
                    else:
                        metrics.itl.observe(now - before)
                    last_piece[choice.index] = now
                    out.append(event(chunk(choice, item, None)))
                    continue
                remaining -= 1
                if isinstance(item, LlmosError):
                    out.append(f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n")
                    continue
                done = choice.request.completion()
                reason = finish_reason(done.finish_reason)
                completion_tokens += done.usage.completion_tokens
                if counted is not None:
                    counted(done.usage.completion_tokens)
                metrics.request_done(done.usage.prompt_tokens, done.usage.completion_tokens, reason, now - started)
                out.append(event(chunk(choice, None, reason)))
            yield "".join(out)
        if include_usage:
            yield event(None, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
