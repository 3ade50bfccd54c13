"""The one exception tree of llmos, and the one map between error codes and exceptions.

Every process imports it; libllm re-exports it. Each class says whose fault it was::

    LlmosError
    ├── WouldBlock            nobody: a try_* call cannot proceed now
    ├── Closed                yours: you used something you closed
    ├── PeerGone              the peer: the other end closed or died
    ├── ProtocolError         the peer: a malformed record or header
    ├── Timeout               nobody: a deadline passed
    ├── KernelUnavailable     setup: no kernel for the instance
    ├── ArenaError            setup: the shared-memory arena cannot be created or attached
    └── RemoteError           the server said so (carries an ErrorCode)
        ├── InvalidRequest
        ├── QuotaExceeded
        ├── Cancelled
        ├── Overloaded
        └── Unsupported
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """The `status` field of a reply header. 0 is success; each other value names a class."""

    OK = 0
    INVALID_REQUEST = 1
    QUOTA_EXCEEDED = 2
    CANCELLED = 3
    OVERLOADED = 4
    UNSUPPORTED = 5
    PROTOCOL_ERROR = 6
    PEER_GONE = 7
    TIMEOUT = 8
    INTERNAL = 9


class LlmosError(Exception):
    """Root of every error llmos raises on purpose."""


class WouldBlock(LlmosError):
    """A non-blocking call cannot proceed now; try again later."""


class Closed(LlmosError):
    """You used a ring, endpoint or session after closing it."""


class PeerGone(LlmosError):
    """The other end closed its side or its process died."""


class ProtocolError(LlmosError):
    """A record or header broke the wire format; the peer is at fault."""


class Timeout(LlmosError):
    """A deadline passed before the operation could complete."""


class KernelUnavailable(LlmosError):
    """No kernel runs for the instance."""


class ArenaError(LlmosError):
    """The arena cannot be created or attached (space, ownership, foreign or stale object)."""


class RemoteError(LlmosError):
    """A server answered with an error status."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequest(RemoteError):
    code = ErrorCode.INVALID_REQUEST


class QuotaExceeded(RemoteError):
    code = ErrorCode.QUOTA_EXCEEDED


class Cancelled(RemoteError):
    code = ErrorCode.CANCELLED


class Overloaded(RemoteError):
    code = ErrorCode.OVERLOADED


class Unsupported(RemoteError):
    code = ErrorCode.UNSUPPORTED


# Codes that travel in a reply's status field -> the class a client raises.
_CLASS_BY_CODE: dict[ErrorCode, type[LlmosError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.PROTOCOL_ERROR: ProtocolError,
    ErrorCode.PEER_GONE: PeerGone,
    ErrorCode.TIMEOUT: Timeout,
}


def error_from_status(status: int, message: str = "") -> LlmosError:
    """Map a reply's non-zero status to the exception a caller should see.

    An unknown status is still an error: it becomes a `RemoteError` naming the number.
    """
    if status == ErrorCode.OK:
        raise ValueError("status 0 is success, not an error")
    try:
        code = ErrorCode(status)
    except ValueError:
        return RemoteError(f"unknown error status {status}: {message}".rstrip(": "))
    cls = _CLASS_BY_CODE.get(code)
    if cls is None:
        return RemoteError(message or code.name, code)
    return cls(message or code.name)


def status_from_error(exc: BaseException) -> ErrorCode:
    """The status a server puts in a reply for an exception (INTERNAL when unmapped)."""
    if isinstance(exc, RemoteError):
        return exc.code
    for code, cls in _CLASS_BY_CODE.items():
        if type(exc) is cls:
            return code
    return ErrorCode.INTERNAL
