"""Every error the gateway answers, in OpenAI's shape ({"error": {message, type, param,
code}}) with the status a client expects: bad bodies, unknown routes and methods, and
faults of our own. Runs in the gateway process."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from llmos.servers.gateway.schemas import UnsupportedField

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_KIND_OF_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, UnsupportedField):
            return ApiError(400, str(cause), param=cause.field, code="unsupported_parameter").response()
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown field (this server does not take it)"
        return ApiError(400, f"{where or 'body'}: {message}", param=where).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no route {request.url.path!r}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path!r}"
        return ApiError(exc.status_code, message, kind=_KIND_OF_STATUS.get(exc.status_code, "invalid_request_error"),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def on_fault(request: Request, exc: Exception) -> Response:
        log.exception("fault serving %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()
