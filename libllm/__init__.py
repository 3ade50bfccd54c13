"""libllm: the function library client programs use to talk to llmos.

    with libllm.connect() as session:
        print(session.generate("Once upon a time", max_tokens=50).text)

`connect()` gives a `Session` (generate, submit, stream, generate_n, chat, chat_ids, stats,
model_info, and shared tensors: alloc, attach; a prompt is text or token ids); a submitted
request is a `Request` handle (libllm.request); `libllm.aio` is the asyncio flavour. Errors
are the tree of docs/design.md. `libllm.tokenizer`, `libllm.protocol`, `libllm.sampling` and
`libllm.blockhash` are pure and shared with servers; `libllm.chat` renders chat templates.

The session and its parts are imported when first used, so a server importing one of the
pure modules (libllm.protocol) does not load the client.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from llmos.microkernel.errors import Cancelled as Cancelled
from llmos.microkernel.errors import Closed as Closed
from llmos.microkernel.errors import InvalidRequest as InvalidRequest
from llmos.microkernel.errors import KernelUnavailable as KernelUnavailable
from llmos.microkernel.errors import LlmosError as LlmosError
from llmos.microkernel.errors import Overloaded as Overloaded
from llmos.microkernel.errors import PeerGone as PeerGone
from llmos.microkernel.errors import ProtocolError as ProtocolError
from llmos.microkernel.errors import QuotaExceeded as QuotaExceeded
from llmos.microkernel.errors import RemoteError as RemoteError
from llmos.microkernel.errors import Timeout as Timeout
from llmos.microkernel.errors import Unsupported as Unsupported
from llmos.microkernel.errors import WouldBlock as WouldBlock

if _typing.TYPE_CHECKING:
    from llmos.libllm.client import ServerGone as ServerGone
    from llmos.libllm.client import Session as Session
    from llmos.libllm.client import connect as connect
    from llmos.libllm.client import instances as instances
    from llmos.libllm.request import Completion as Completion
    from llmos.libllm.request import DeadlineExceeded as DeadlineExceeded
    from llmos.libllm.request import Request as Request
    from llmos.libllm.request import Timings as Timings
    from llmos.libllm.request import Usage as Usage
    from llmos.libllm.tensors import SharedTensor as SharedTensor

_LAZY = {
    "ServerGone": "llmos.libllm.client", "Session": "llmos.libllm.client", "connect": "llmos.libllm.client",
    "instances": "llmos.libllm.client", "Completion": "llmos.libllm.request", "DeadlineExceeded": "llmos.libllm.request",
    "Request": "llmos.libllm.request", "Timings": "llmos.libllm.request", "Usage": "llmos.libllm.request",
    "SharedTensor": "llmos.libllm.tensors",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'libllm' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
    "SharedTensor",
    "Timeout",
    "Timings",
    "Unsupported",
    "Usage",
    "WouldBlock",
    "connect",
    "instances",
]
