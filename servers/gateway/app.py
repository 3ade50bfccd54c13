"""The OpenAI-compatible HTTP front door: /v1/completions, /v1/chat/completions (plain and
SSE), /v1/models, /tokenize, /detokenize, /version, /health, /metrics. Runs inside the
gateway process, itself a libllm client registered as "gateway" (a peer whose tenant the
scheduler believes), with one channel whose window is `max_in_flight`; or inside a
cluster's front door (llmos/cluster/front.py) on every instance of the cluster (backend.py
is what either gives). Chat messages
become prompt ids through the session's chat template (libllm/chat.py). Bodies, keys and
limits are checked at the door (guard.py); errors use OpenAI's shape (errors.py).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from llmos.libllm.chat import ChatTemplateError
from llmos.libllm.request import Completion
from llmos.microkernel.errors import InvalidRequest, LlmosError, Overloaded, QuotaExceeded, Timeout
from llmos.servers.gateway.backend import Backend
from llmos.servers.gateway.errors import ApiError, install_handlers
from llmos.servers.gateway.logprobs import chat_logprobs, completion_logprobs
from llmos.servers.gateway.metrics import GatewayMetrics
from llmos.servers.gateway.schemas import ChatBody, CompletionBody, DetokenizeBody, TokenizeBody
from llmos.servers.gateway.settings import GatewaySettings
from llmos.servers.gateway.streaming import Choice, finish_reason, sse_stream

T = TypeVar("T")
_LONG_TEXT = 2048  # characters: longer prompts are tokenised on a worker thread
HEALTH_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Job:
    """What one HTTP request asks of the scheduler: prompts (ids), n choices each."""

    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    options: dict[str, Any]
    n: int
    tenant: str
    tokens: int = 0  # made so far, for the access log

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def make_app(session: Backend, config: GatewaySettings) -> FastAPI:
    app = FastAPI(title="llmos gateway", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    info = session.model_info()
    model_id = Path(info.model_path).stem
    tokenizer = session.tokenizer
    metrics = GatewayMetrics(model_id)
    app.state.metrics = metrics
    in_flight = [0]

    async def off_loop(work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def encode(text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: no text a model could read
            raise ApiError(400, f"prompt is not valid Unicode text ({exc.reason} at {exc.start})",
                           param="prompt") from None
        if len(text) > _LONG_TEXT:
            return await off_loop(lambda: tokenizer.encode(text))
        return tokenizer.encode(text)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"model {name!r} does not exist; this instance serves {model_id!r}",
                           param="model", code="model_not_found")

    def plan(body: CompletionBody | ChatBody, prompts: list[list[int]], tenant: str) -> Job:
        """(The routes have checked the model before tokenising.)"""
        asked = body.max_completion_tokens if isinstance(body, ChatBody) and body.max_completion_tokens else None
        asked = asked or body.max_tokens
        if asked is not None and asked > config.max_tokens:
            raise ApiError(400, f"max_tokens must be at most {config.max_tokens}", param="max_tokens")
        limits = []
        for ids in prompts:
            left = info.context_length - len(ids)
            if left < 1:
                raise ApiError(400, f"prompt of {len(ids)} tokens does not fit the context of "
                                    f"{info.context_length} tokens", param="prompt")
            limits.append(asked if asked is not None else min(config.max_tokens, left))
        job = Job(prompts, limits, {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                                    "seed": body.seed, "stop": body.stop_list(), "priority": body.priority,
                                    "tenant": tenant, "logprobs": body.num_logprobs(), **body.penalties()},
                  body.n, tenant)
        if in_flight[0] + job.num_choices > config.max_in_flight:
            raise ApiError(429, "too many requests in flight; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        return job

    async def generate(job: Job) -> list[Completion]:
        in_flight[0] += job.num_choices
        started = time.monotonic()
        try:
            groups = await asyncio.gather(*(session.generate_n(ids, job.n, max_tokens=limit, **job.options)
                                            for ids, limit in zip(job.prompts, job.max_tokens, strict=True)))
        except LlmosError as exc:
            raise as_api_error(exc) from None
        finally:
            in_flight[0] -= job.num_choices
        done = [c for group in groups for c in group]
        job.count(sum(c.usage.completion_tokens for c in done))
        for c in done:
            metrics.request_done(c.usage.prompt_tokens, c.usage.completion_tokens, finish_reason(c.finish_reason),
                                 time.monotonic() - started)
        return done

    async def stream(job: Job, kind: str, rid: str, include_usage: bool,
                     echoes: Sequence[str] = ()) -> StreamingResponse:
        """Every choice of every prompt in one SSE stream, each chunk naming its index."""
        in_flight[0] += job.num_choices
        try:
            choices: list[Choice] = []
            for p, (ids, limit) in enumerate(zip(job.prompts, job.max_tokens, strict=True)):
                requests = await session.submit_n(ids, job.n, stream=True, max_tokens=limit, **job.options)
                echo = echoes[p] if echoes else ""
                choices += [Choice(p * job.n + i, r, 0 if i else len(ids), echo) for i, r in enumerate(requests)]
        except LlmosError as exc:
            in_flight[0] -= job.num_choices
            for c in choices:
                session.cancel(c.request)
            raise as_api_error(exc) from None

        async def events() -> AsyncIterator[str]:
            try:
                async for event in sse_stream(session, choices, kind, rid, model_id, include_usage, metrics,
                                              tokenizer, job.count):
                    yield event
            finally:
                in_flight[0] -= job.num_choices

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        if session.failing_over:
            return JSONResponse({"status": "unavailable", "reason": "the scheduler restarted; reconnecting"},
                                status_code=503)
        try:
            await session.ping(HEALTH_TIMEOUT_S)
        except LlmosError as exc:
            return JSONResponse({"status": "unavailable", "reason": f"the scheduler does not answer: {exc}"},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": model_id})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        try:
            stats: dict[str, Any] | None = await session.stats(HEALTH_TIMEOUT_S)
        except LlmosError:
            stats = None  # the gateway's own figures still count
        return PlainTextResponse(metrics.text(stats), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("llmos")}

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "llmos",
                "max_model_len": info.context_length}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(body.messages)
        else:
            assert body.prompt is not None
            ids = await encode(body.prompt)
        return {"count": len(ids), "max_model_len": info.context_length, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
        check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in [0, {info.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def chat_prompt(messages: Sequence[Any]) -> list[int]:
        try:  # the tokenizer's own ids: the template's control tokens are special tokens, not text
            return session.chat_ids([m.as_template_input() for m in messages])
        except (ChatTemplateError, InvalidRequest) as exc:
            raise ApiError(400, str(exc), param="messages") from None

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request) -> Response | dict[str, Any]:
        check_model(body.model)
        prompts = [await encode(p) if isinstance(p, str) else checked_ids(p, info.vocab_size)
                   for p in body.prompts()]
        job = plan(body, prompts, request.state.tenant)
        request.state.job = job  # the access log reads its tokens
        if body.echo and body.logprobs is not None:  # the prompt's own (lm-eval's loglikelihood asks this)
            if body.stream:
                raise ApiError(400, "echo with logprobs is answered whole: send stream: false", param="echo")
            job.options["prompt_logprobs"] = True
        rid = "cmpl-" + secrets.token_hex(12)
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts()] if body.echo else []
        if body.stream:
            return await stream(job, "text_completion", rid, body.wants_usage_chunk(), texts)
        done = await generate(job)

        def choice(i: int, c: Completion) -> dict[str, Any]:
            echoed = texts[i // job.n] if body.echo else ""
            logprobs = None
            if c.logprobs is not None and c.prompt_logprobs is not None:  # echo: the prompt's tokens first
                logprobs = completion_logprobs(tokenizer, c.token_ids, c.logprobs, leading=[None, *c.prompt_logprobs],
                                               leading_ids=job.prompts[i // job.n])
            elif c.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, c.token_ids, c.logprobs, offset=len(echoed))
            return {"index": i, "text": echoed + c.text, "logprobs": logprobs,
                    "finish_reason": finish_reason(c.finish_reason)}

        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [choice(i, c) for i, c in enumerate(done)], "usage": usage(done, job.n)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, request: Request) -> Response | dict[str, Any]:
        check_model(body.model)
        job = plan(body, [chat_prompt(body.messages)], request.state.tenant)
        request.state.job = job
        rid = "chatcmpl-" + secrets.token_hex(12)
        if body.stream:
            return await stream(job, "chat.completion.chunk", rid, body.wants_usage_chunk())
        done = await generate(job)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None if c.logprobs is None else chat_logprobs(tokenizer, c.token_ids,
                                                                                        c.logprobs),
                             "finish_reason": finish_reason(c.finish_reason)} for i, c in enumerate(done)],
                "usage": usage(done, job.n)}

    return app


def checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    if not ids:
        raise ApiError(400, "a token-id prompt must hold at least one id", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is not in [0, {vocab_size})", param="prompt")
    return ids


def as_api_error(exc: LlmosError) -> ApiError:
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc))
    if isinstance(exc, (QuotaExceeded, Overloaded)):
        return ApiError(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, Timeout):
        return ApiError(504, f"the request did not finish in time: {exc}", kind="server_error")
    return ApiError(503, f"the instance could not serve the request: {exc}", kind="server_error")


def usage(done: list[Completion], n: int) -> dict[str, int]:
    """OpenAI counts each prompt once, however many choices it has."""
    prompt_tokens = sum(c.usage.prompt_tokens for c in done[::n])
    completion_tokens = sum(c.usage.completion_tokens for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

