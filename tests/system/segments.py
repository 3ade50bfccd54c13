"""Helpers of the shared-tensor and long-prompt tests: the memory server's segment figures."""

from __future__ import annotations

import time

from libllm import protocol as P
from microkernel.endpoint import Channel, Endpoint
from microkernel.errors import PeerGone
from microkernel.messages import MsgType

WAIT = 60.0


class Memory:
    """A test's own channel to the memory server, for its figures; opened again when a
    test has restarted the memory server."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._channel: Channel | None = None

    def stats(self) -> P.MemoryStatsReply:
        for attempt in range(2):
            if self._channel is None:
                self._channel = self.endpoint.open_channel("memory", wait=True, timeout=WAIT)
            try:
                stats: P.MemoryStatsReply = P.unpack(self._channel.call(MsgType.MEM_STATS, timeout=WAIT).payload,
                                                     P.MemoryStatsReply)
                return stats
            except PeerGone:
                self.endpoint.drop_channel(self._channel.channel_id)
                self._channel = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


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
