"""Helpers of the shared-tensor and long-prompt tests: the memory server's segment figures."""

from __future__ import annotations

import time

from llmos.libllm import protocol as P
from llmos.libllm.memory import SessionMemory
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.messages import MsgType

WAIT = 60.0


class Memory:
    """A test's own view of the memory server's figures, over libllm's memory-server side
    (which opens its channel again after a test restarted the memory server)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._memory = SessionMemory(endpoint.instance, endpoint)

    def stats(self) -> P.MemoryStatsReply:
        stats: P.MemoryStatsReply = P.unpack(self._memory.call(MsgType.MEM_STATS, b"", WAIT).payload,
                                             P.MemoryStatsReply)
        return stats


def used(memory: Memory) -> int:
    """`segment_bytes_used`, from the memory server."""
    return memory.stats().segment_bytes_used


def wait_for_used(memory: Memory, expected: int, what: str, timeout: float = 30.0) -> None:
    """Poll the memory server's figures (bounded) until `segment_bytes_used` is `expected`:
    for what happens after an event this process cannot wait on (PEER_GONE reaching it)."""
    deadline = time.monotonic() + timeout
    while (now := used(memory)) != expected:
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {now} bytes used, {expected} expected"
        time.sleep(0.01)
