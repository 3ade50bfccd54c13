"""microkernel: what every llmos process links against.

Layers, bottom up: `layout` (every limit and offset), `errors` (the exception tree),
`arena` (the shared-memory object), `_ring` (Cython SPSC rings and futex doorbells,
`ring_ref` its pure-Python oracle), `messages` (the 48-byte header). The kernel
process and the endpoint layer build on these.
"""

from __future__ import annotations

from microkernel._ring import Doorbell as Doorbell
from microkernel._ring import Ring as Ring
from microkernel.arena import Arena as Arena
from microkernel.arena import Region as Region
from microkernel.errors import ArenaError as ArenaError
from microkernel.errors import Cancelled as Cancelled
from microkernel.errors import Closed as Closed
from microkernel.errors import ErrorCode as ErrorCode
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
from microkernel.stats import DoorbellStats as DoorbellStats
from microkernel.stats import RingStats as RingStats

__all__ = [
    "Arena",
    "ArenaError",
    "Cancelled",
    "Closed",
    "Doorbell",
    "DoorbellStats",
    "ErrorCode",
    "InvalidRequest",
    "KernelUnavailable",
    "LlmosError",
    "Overloaded",
    "PeerGone",
    "ProtocolError",
    "QuotaExceeded",
    "Region",
    "RemoteError",
    "Ring",
    "RingStats",
    "Timeout",
    "Unsupported",
    "WouldBlock",
]
