"""The memory server as a process: quotas and reclamation across real processes, a
restarted memory server rebuilding from the arena, and its sweep finding what a client
that died while no memory server ran left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.libllm import protocol as P
from llmos.microkernel.endpoint import Channel, Endpoint
from llmos.microkernel.errors import InvalidRequest, QuotaExceeded, Unsupported
from llmos.microkernel.messages import MsgType
from tests.conftest import unique_instance
from tests.microkernel.procs import wait_until
from tests.system.cli import Cli

pytestmark = pytest.mark.slow
WAIT = 60.0

MEMORY_CONFIG = """
rings = "8M"
heartbeat_timeout_s = 2.0
restart_backoff_s = 0.1
[memory]
pages = "2M"
segments = "2M"
quota_blocks = 8
quota_segment_bytes = 65536
sweep_interval_s = 0.5
weights_bytes = 65536
[[servers]]
name = "memory"
module = "llmos.servers.memory"
"""


@pytest.fixture
def instance(cli: Cli) -> Iterator[str]:
    name = unique_instance("mem")
    cli("up", "--detach", "--instance", name, "--config", cli.config(MEMORY_CONFIG))
    yield name
    cli("down", "--instance", name)


def stats(channel: Channel) -> P.MemoryStatsReply:
    reply: P.MemoryStatsReply = P.unpack(channel.call(MsgType.MEM_STATS, timeout=WAIT).payload, P.MemoryStatsReply)
    return reply


def alloc_segment(channel: Channel, size: int) -> P.Segment:
    segment: P.Segment = P.unpack(channel.call(MsgType.MEM_ALLOC_SEGMENT, P.pack(P.AllocSegment(size)),
                                               timeout=WAIT).payload, P.Segment)
    return segment


def alloc_blocks(channel: Channel, n: int) -> list[int]:
    ids: list[int] = P.unpack(channel.call(MsgType.MEM_ALLOC_BLOCKS, P.pack(P.AllocBlocks(n)), timeout=WAIT).payload,
                              P.BlockIds).block_ids
    return ids


def holder(instance: str, cli: Cli) -> subprocess.Popen[str]:
    """A client process that takes 3 blocks and a 4 KiB segment, then waits to be killed."""
    code = (
        "from microkernel.endpoint import Endpoint\n"
        "from tests.system.test_memory_server import alloc_blocks, alloc_segment\n"
        f"ep = Endpoint.connect({instance!r})\n"
        "ch = ep.open_channel('memory')\n"
        "alloc_blocks(ch, 3); alloc_segment(ch, 4096)\n"
        "print('holder ready', ep.endpoint_id, flush=True)\n"
        "import time; time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli.env, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("holder ready"), line
    proc.holder_id = int(line.split()[-1])  # type: ignore[attr-defined]
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(WAIT)
    assert proc.stdout is not None
    proc.stdout.close()


def test_quota_refuses_one_client_and_spares_the_others(instance: str) -> None:
    with Endpoint.connect(instance) as a, Endpoint.connect(instance) as b:
        ca, cb = a.open_channel("memory"), b.open_channel("memory")
        alloc_segment(ca, 60_000)
        before = stats(ca)
        with pytest.raises(QuotaExceeded, match="limit"):
            alloc_segment(ca, 8192)
        with pytest.raises(QuotaExceeded):
            alloc_blocks(ca, 9)
        assert stats(ca).segment_bytes_used == before.segment_bytes_used  # a refusal changes nothing
        alloc_segment(cb, 60_000)  # b has its own quota
        assert len(alloc_blocks(cb, 8)) == 8
        with pytest.raises(InvalidRequest):
            ca.call(MsgType.MEM_FREE_SEGMENT, P.pack(P.SegmentRef(segment_id=10**6, generation=1)))
        with pytest.raises(InvalidRequest):
            ca.call(MsgType.MEM_ALLOC_BLOCKS, b"not msgpack at all")
        with pytest.raises(InvalidRequest, match="only the scheduler may lease"):
            ca.call(MsgType.MEM_ALLOC_BLOCKS, P.pack(P.AllocBlocks(100, lease=True)))
        with pytest.raises(Unsupported):  # 0x0306, the retired MEM_CLAIM_BLOCKS
            ca.call(0x0306, P.pack({"block_ids": [0], "client_id": 0}))


def test_a_killed_client_gets_everything_back_at_once(instance: str, cli: Cli) -> None:
    with Endpoint.connect(instance) as ep:
        channel = ep.open_channel("memory")
        proc = holder(instance, cli)
        assert stats(channel).owners.get(proc.holder_id) == 4  # type: ignore[attr-defined]
        kill(proc)
        wait_until(lambda: proc.holder_id not in stats(channel).owners, "PEER_GONE to free the holder's memory")  # type: ignore[attr-defined]
        after = stats(channel)
        assert after.num_reclaimed_blocks >= 3 and after.num_reclaimed_segments >= 1
        assert after.num_swept_blocks == 0  # PEER_GONE did it, not the sweep


def test_a_restarted_memory_server_rebuilds_and_goes_on(instance: str, cli: Cli) -> None:
    with Endpoint.connect(instance) as ep:
        channel = ep.open_channel("memory")
        segment = alloc_segment(channel, 8192)
        blocks = alloc_blocks(channel, 5)
        before = stats(channel)
        old = cli.pids(instance)["memory"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: cli.pids(instance).get("memory", old) != old, "the memory server to restart")
        channel = ep.open_channel("memory", wait=True)
        after = stats(channel)
        assert (after.num_used_blocks, after.segment_bytes_used) == (before.num_used_blocks, before.segment_bytes_used)
        assert after.owners[ep.endpoint_id] == before.owners[ep.endpoint_id]
        # The successor knows our handle and our blocks: freeing them works, and frees them.
        channel.call(MsgType.MEM_FREE_SEGMENT, P.pack(P.SegmentRef(segment.segment_id, segment.generation)))
        channel.call(MsgType.MEM_FREE_BLOCKS, P.pack(P.BlockIds(blocks)))
        assert ep.endpoint_id not in stats(channel).owners
        assert stats(channel).owners[0] == 1  # the weights segment, still the instance's


def test_the_successors_sweep_reclaims_a_client_that_died_meanwhile(instance: str, cli: Cli) -> None:
    with Endpoint.connect(instance) as ep:
        channel = ep.open_channel("memory")
        proc = holder(instance, cli)
        others = {k: v for k, v in stats(channel).owners.items() if k != proc.holder_id}  # type: ignore[attr-defined]
        memory = cli.pids(instance)["memory"]
        os.kill(memory, signal.SIGSTOP)  # no memory server hears the client die
        kill(proc)
        os.kill(memory, signal.SIGKILL)
        wait_until(lambda: cli.pids(instance).get("memory", memory) != memory, "the memory server to restart")
        channel = ep.open_channel("memory", wait=True)
        wait_until(lambda: stats(channel).num_swept_blocks > 0, "the successor's sweep")
        after = stats(channel)
        assert (after.num_swept_blocks, after.num_swept_segments) == (3, 1)  # exactly that client's
        assert after.owners == others
        assert after.owners[0] == 1  # the instance's weights segment survives every sweep
