"""The OpenAI-compatible HTTP front door: /v1/completions, /v1/chat/completions (plain and
SSE), /v1/models, /health, /metrics. Runs inside the gateway process, itself a libllm
client registered as "gateway" (the only peer whose tenant the scheduler believes). Chat
messages become prompt ids through the session's chat template (libllm/chat.py).
Everything is validated here; errors use the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from libllm.aio import AsyncSession
from libllm.chat import ChatTemplateError
from libllm.request import Completion
from microkernel.errors import InvalidRequest, LlmosError, Overloaded, QuotaExceeded, Timeout
from servers.gateway.metrics import prometheus_text
from servers.gateway.schemas import ChatBody, CompletionBody


@dataclass(slots=True)
class GatewayConfig:
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant; empty: no auth
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 512
    default_max_tokens: int = 16
    max_in_flight: int = 256  # requests at once before answering 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def make_app(session: AsyncSession, config: GatewayConfig) -> FastAPI:
    app = FastAPI(title="llmos gateway", docs_url=None, redoc_url=None)
    info = session.model_info()
    model_id = Path(info.model_path).stem
    in_flight = [0]

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where).response()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return ApiError(413, f"request body over {config.max_body_bytes} bytes").response()
        if request.url.path.startswith("/v1/") and config.api_keys:
            auth = request.headers.get("authorization", "")
            key = auth.removeprefix("Bearer ").strip()
            if key not in config.api_keys:
                return ApiError(401, "invalid or missing API key", kind="authentication_error",
                                code="invalid_api_key").response()
            request.state.tenant = config.api_keys[key]
        else:
            request.state.tenant = ""
        return await call_next(request)

    def check(body: CompletionBody | ChatBody) -> int:
        if body.model != model_id:
            raise ApiError(404, f"model {body.model!r} does not exist; this instance serves {model_id!r}",
                           param="model", code="model_not_found")
        max_tokens = body.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_cap:
            raise ApiError(400, f"max_tokens must be at most {config.max_tokens_cap}", param="max_tokens")
        if in_flight[0] + body.n > config.max_in_flight:
            raise ApiError(429, "too many requests in flight; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        return max_tokens

    async def run(prompt: str | list[int], body: CompletionBody | ChatBody, max_tokens: int,
                  tenant: str) -> list[Completion]:
        in_flight[0] += body.n
        try:
            return list(await asyncio.gather(*(
                session.generate(prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 seed=None if body.seed is None else body.seed + i, stop=body.stop_list(),
                                 priority=body.priority, tenant=tenant)
                for i in range(body.n))))
        except InvalidRequest as exc:
            raise ApiError(400, str(exc)) from None
        except (QuotaExceeded, Overloaded) as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except (Timeout, LlmosError) as exc:
            raise ApiError(503, f"the instance could not serve the request: {exc}", kind="server_error") from None
        finally:
            in_flight[0] -= body.n

    def usage(done: list[Completion]) -> dict[str, int]:
        prompt_tokens = done[0].usage.prompt_tokens if done else 0
        completion_tokens = sum(c.usage.completion_tokens for c in done)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def sse(prompt: str | list[int], body: CompletionBody | ChatBody, max_tokens: int, tenant: str,
                  kind: str, rid: str) -> AsyncIterator[str]:
        """One choice streamed as server-sent events; a client that goes away cancels it
        (Starlette cancels this generator, and leaving libllm's stream cancels the request)."""
        in_flight[0] += 1
        created = int(time.time())
        try:
            async for piece in session.stream(prompt, max_tokens=max_tokens, temperature=body.temperature,
                                              top_p=body.top_p, seed=body.seed, stop=body.stop_list(),
                                              priority=body.priority, tenant=tenant):
                yield "data: " + json.dumps(_chunk(kind, rid, created, model_id, piece, None)) + "\n\n"
            yield "data: " + json.dumps(_chunk(kind, rid, created, model_id, "", "stop")) + "\n\n"
            yield "data: [DONE]\n\n"
        except LlmosError as exc:
            yield "data: " + json.dumps({"error": {"message": str(exc), "type": "server_error"}}) + "\n\n"
        finally:
            in_flight[0] -= 1

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_id}

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await asyncio.get_running_loop().run_in_executor(None, session.session.stats)
        return PlainTextResponse(prometheus_text(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "llmos"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request) -> Response | dict[str, Any]:
        max_tokens = check(body)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        rid = "cmpl-" + secrets.token_hex(12)
        if body.stream:
            return StreamingResponse(sse(prompt, body, max_tokens, request.state.tenant, "text_completion", rid),
                                     media_type="text/event-stream")
        done = await run(prompt, body, max_tokens, request.state.tenant)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": _reason(c)}
                            for i, c in enumerate(done)],
                "usage": usage(done)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, request: Request) -> Response | dict[str, Any]:
        max_tokens = check(body)
        try:  # the tokenizer's own ids: the template's control tokens are special tokens, not text
            prompt = session.session.chat_ids([m.model_dump() for m in body.messages])
        except (ChatTemplateError, InvalidRequest) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        rid = "chatcmpl-" + secrets.token_hex(12)
        if body.stream:
            return StreamingResponse(sse(prompt, body, max_tokens, request.state.tenant, "chat.completion.chunk",
                                         rid), media_type="text/event-stream")
        done = await run(prompt, body, max_tokens, request.state.tenant)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": _reason(c)} for i, c in enumerate(done)],
                "usage": usage(done)}

    return app


def _reason(done: Completion) -> str:
    """OpenAI's words: "length" when max_tokens ended it, else "stop"."""
    return "length" if done.finish_reason in ("length", "context") else "stop"


def _chunk(kind: str, rid: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    if kind == "text_completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
