"""libllm: the function library client programs use to talk to llmos.

For now it re-exports the exception tree of DESIGN.md; sessions, generate and stream
arrive with the end-to-end work. `libllm.tokenizer` is pure and shared with servers.
"""

from __future__ import annotations

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
    "InvalidRequest",
    "KernelUnavailable",
    "LlmosError",
    "Overloaded",
    "PeerGone",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "Timeout",
    "Unsupported",
    "WouldBlock",
]
