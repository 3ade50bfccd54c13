"""libllm: the function library client programs use to talk to llmos.

    with libllm.connect() as session:
        print(session.generate("Once upon a time", max_tokens=50).text)

`connect()` gives a `Session` (generate, stream, model_info); errors are the tree of
DESIGN.md. `libllm.tokenizer` and `libllm.protocol` are pure and shared with servers.
"""

from __future__ import annotations

from libllm.client import Completion as Completion
from libllm.client import DeadlineExceeded as DeadlineExceeded
from libllm.client import Request as Request
from libllm.client import ServerGone as ServerGone
from libllm.client import Session as Session
from libllm.client import Timings as Timings
from libllm.client import Usage as Usage
from libllm.client import connect as connect
from libllm.client import instances as instances
from microkernel.errors import Cancelled as Cancelled
from microkernel.errors import Closed as Closed
from microkernel.errors import InvalidRequest as InvalidRequest
from microkernel.errors import KernelUnavailable as KernelUnavailable
from microkernel.errors import LlmosError as LlmosError
from microkernel.errors import Overloaded as Overloaded
from microkernel.errors import PeerGone as PeerGone
from microkernel.errors import ProtocolError as ProtocolError
from microkernel.errors import QuotaExceeded as QuotaExceeded
from microkernel.errors import RemoteError as RemoteError
from microkernel.errors import Timeout as Timeout
from microkernel.errors import Unsupported as Unsupported
from microkernel.errors import WouldBlock as WouldBlock

__all__ = [
    "Cancelled",
    "Closed",
    "Completion",
    "DeadlineExceeded",
    "InvalidRequest",
    "KernelUnavailable",
    "LlmosError",
    "Overloaded",
    "PeerGone",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "Request",
    "ServerGone",
    "Session",
    "Timeout",
    "Timings",
    "Unsupported",
    "Usage",
    "WouldBlock",
    "connect",
    "instances",
]
