"""microkernel: what every llmos process links against.

Layers, bottom up: `layout` (every limit and offset), `errors` (the exception tree),
`arena` (the shared-memory object), `_ring` (Cython SPSC rings and futex doorbells,
`ring_ref` its pure-Python oracle), `messages` (the 48-byte header). The kernel
process and the endpoint layer build on these.
"""

from __future__ import annotations

from llmos.microkernel._ring import Doorbell as Doorbell
from llmos.microkernel._ring import Ring as Ring
from llmos.microkernel.arena import Arena as Arena
from llmos.microkernel.arena import Region as Region
from llmos.microkernel.errors import ArenaError as ArenaError
from llmos.microkernel.errors import Cancelled as Cancelled
from llmos.microkernel.errors import Closed as Closed
from llmos.microkernel.errors import ErrorCode as ErrorCode
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
from llmos.microkernel.stats import DoorbellStats as DoorbellStats
from llmos.microkernel.stats import RingStats as RingStats

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
