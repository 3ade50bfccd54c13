"""The gateway's door, as ASGI middleware in front of every route: API keys, and request
bodies read whole before any route sees them, so the size limit holds for chunked bodies
too and a body that does not arrive in time is dropped (a slow client holds no route, no
request at the scheduler); and the access log. Runs in the gateway process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from llmos.servers.gateway.errors import ApiError
from llmos.servers.gateway.settings import GatewaySettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})  # answered without a key: load balancers and supervisors probe it


# One line per request (method, path, status, tokens made, duration, tenant), in the log.
access = logging.getLogger("llmos.gateway.access")


class Guard:
    def __init__(self, app: ASGIApp, config: GatewaySettings) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]
        answer = send

        async def logged(message: Message) -> None:
            # One access-log line per request, when its response ends.
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await answer(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state = scope.get("state", {})
                job = state.get("job")
                access.info("%s %s %d tokens=%d %.0fms tenant=%s", scope["method"], scope["path"], status[0],
                            job.tokens if job is not None else 0, 1000 * (time.monotonic() - started),
                            state.get("tenant") or "-")

        send = logged
        try:
            scope.setdefault("state", {})["tenant"] = self._tenant(scope)
            body = await self._read_body(scope, receive)
        except ApiError as exc:
            await _answer(send, exc)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what comes after the body: the client's disconnect

        await self.app(scope, replay, send)

    def _tenant(self, scope: Scope) -> str:
        keys = self.config.api_keys
        if not keys or scope["path"] in OPEN_PATHS:
            return ""
        auth = _header(scope, b"authorization")
        scheme, _, key = auth.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or key not in keys:
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")
        return keys[key]

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        length = _header(scope, b"content-length")
        if length and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.config.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                               code="body_timeout") from None
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


async def _answer(send: Send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
