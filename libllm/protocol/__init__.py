"""Payloads of the servers' messages, as msgspec Structs: the one definition both ends use.

Pure (no I/O, no session); shared by libllm and the servers (docs/design.md). One module per
server: `memory` (0x03xx), `scheduler` (0x02xx, what clients send), and `runner` (0x04xx),
which is internal to the scheduler and the runners and not re-exported here. Each Struct
names the message type it travels with; a reply that carries an error is a
`microkernel.control.ErrorReply` with a non-zero status instead.
"""

from __future__ import annotations

from llmos.libllm.protocol.codec import pack as pack
from llmos.libllm.protocol.codec import unpack as unpack
from llmos.libllm.protocol.memory import AllocBlocks as AllocBlocks
from llmos.libllm.protocol.memory import AllocSegment as AllocSegment
from llmos.libllm.protocol.memory import BlockIds as BlockIds
from llmos.libllm.protocol.memory import MemoryStatsReply as MemoryStatsReply
from llmos.libllm.protocol.memory import Segment as Segment
from llmos.libllm.protocol.memory import SegmentInfo as SegmentInfo
from llmos.libllm.protocol.memory import SegmentRef as SegmentRef
from llmos.libllm.protocol.scheduler import MAX_LOGPROBS as MAX_LOGPROBS
from llmos.libllm.protocol.scheduler import MAX_PRIORITY as MAX_PRIORITY
from llmos.libllm.protocol.scheduler import PROMPT_ID_DTYPE as PROMPT_ID_DTYPE
from llmos.libllm.protocol.scheduler import Cancel as Cancel
from llmos.libllm.protocol.scheduler import Finished as Finished
from llmos.libllm.protocol.scheduler import Logprob as Logprob
from llmos.libllm.protocol.scheduler import ModelInfo as ModelInfo
from llmos.libllm.protocol.scheduler import Submit as Submit
from llmos.libllm.protocol.scheduler import Tokens as Tokens

__all__ = [
    "MAX_LOGPROBS",
    "MAX_PRIORITY",
    "PROMPT_ID_DTYPE",
    "AllocBlocks",
    "AllocSegment",
    "BlockIds",
    "Cancel",
    "Finished",
    "Logprob",
    "MemoryStatsReply",
    "ModelInfo",
    "Segment",
    "SegmentInfo",
    "SegmentRef",
    "Submit",
    "Tokens",
    "pack",
    "unpack",
]
