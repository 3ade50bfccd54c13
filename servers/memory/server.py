"""The memory server process: a thin loop around `MemoryManager`.

Registers as "memory". Formats the arena's allocator tables on an instance's first start
and rebuilds its view from them after a restart; frees everything a gone endpoint owned
(PEER_GONE), and sweeps periodically (and once at start) for owners no live endpoint
matches. Owner 0, the instance, is never reclaimed. Never blocks on a peer.
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

import msgspec
import numpy as np

from llmos.libllm import protocol as P
from llmos.microkernel import control as C
from llmos.microkernel.endpoint import Channel, Message
from llmos.microkernel.errors import ArenaError, InvalidRequest, LlmosError
from llmos.microkernel.messages import MsgType
from llmos.servers.base import EndpointSource, Server
from llmos.servers.memory.manager import MemoryConfig, MemoryManager, Reclaimed
from llmos.servers.memory.quotas import INSTANCE_ID
from llmos.servers.memory.segments import SegmentHandle
from llmos.servers.memory.tables import BlockState, SegmentState

log = logging.getLogger("llmos.memory")
# Peers whose `client_id` field is believed: they act on behalf of other clients. Anyone
# else is charged as itself (its endpoint id), whatever it claims.
TRUSTED_PEERS = frozenset({"scheduler", "gateway"})


def charged_client(channel: Channel, claimed: int) -> int:
    return claimed if channel.info.client_name in TRUSTED_PEERS else channel.info.client_id


class MemoryServer(Server):
    name = "memory"

    def __init__(self, endpoint: EndpointSource, config: MemoryConfig, *, sweep_interval_s: float = 5.0,
                 weights_bytes: int = 0) -> None:
        super().__init__(endpoint, handlers={
            MsgType.MEM_ALLOC_BLOCKS: self.handle_alloc_blocks,
            MsgType.MEM_FREE_BLOCKS: self.handle_free_blocks,
            MsgType.MEM_ALLOC_SEGMENT: self.handle_alloc_segment,
            MsgType.MEM_FREE_SEGMENT: self.handle_free_segment,
            MsgType.MEM_SEGMENT_INFO: self.handle_segment_info,
            MsgType.MEM_STATS: self.handle_stats,
        })
        arena = self.endpoint.arena
        try:
            self.memory = MemoryManager.attach(arena, config.quotas)
            log.info("rebuilt the memory tables from the arena (%d repairs)", self.memory.num_repairs)
        except ArenaError:
            self.memory = MemoryManager.format(arena, config)
            log.info("formatted the memory tables: %d blocks of %d bytes", self.memory.tables.geometry.num_blocks,
                     config.block_bytes)
            if weights_bytes:
                # A segment for weights runners may share belongs to the instance (owner 0):
                # the first segment of a fresh instance, never reclaimed.
                handle = self.memory.segments.allocate(weights_bytes, INSTANCE_ID)
                log.info("reserved %d bytes for the shared weights as segment %d", weights_bytes, handle.segment_id)
        self.sweep_interval_s = sweep_interval_s
        self.reclaimed = Reclaimed()
        self.swept = Reclaimed()
        self._next_sweep = 0.0  # sweep at once: owners may have died while no memory server ran

    # -- handlers: each validates, acts, and replies; an exception changes nothing -----

    def handle_alloc_blocks(self, channel: Channel, message: Message) -> bytes:
        request = _decode(message, P.AllocBlocks)
        owner = channel.info.client_id
        if request.lease:
            if channel.info.client_name not in TRUSTED_PEERS:
                # A lease is charged to nobody: only a trusted peer (the scheduler) may hold one,
                # or anyone could sidestep the quotas.
                raise InvalidRequest("only the scheduler may lease blocks; ask for charged blocks instead")
            ids = self.memory.blocks.lease(owner, request.num_blocks)
        else:
            ids = self.memory.blocks.allocate(request.num_blocks, owner, charged_client(channel, request.client_id))
        return P.pack(P.BlockIds(ids))

    def handle_free_blocks(self, channel: Channel, message: Message) -> bytes:
        request = _decode(message, P.BlockIds)
        self.memory.blocks.free(channel.info.client_id, request.block_ids)
        return b""

    def handle_alloc_segment(self, channel: Channel, message: Message) -> bytes:
        request = _decode(message, P.AllocSegment)
        owner = channel.info.client_id
        handle = self.memory.segments.allocate(request.size, owner, charged_client(channel, request.client_id))
        info = self.memory.segments.resolve(handle, owner)
        # The owner maps its own segment; it hands servers the handle, never the offset.
        return P.pack(P.Segment(handle.segment_id, handle.generation, info.offset, info.size))

    def handle_free_segment(self, channel: Channel, message: Message) -> bytes:
        request = _decode(message, P.SegmentRef)
        self.memory.segments.free(SegmentHandle(request.segment_id, request.generation), channel.info.client_id)
        return b""

    def handle_segment_info(self, channel: Channel, message: Message) -> bytes:
        """Where a live segment lies, for any endpoint of this instance that presents its handle.

        Who may ask: every endpoint got past the kernel's SO_PEERCRED check (same uid), and that
        uid can map the whole arena (mode 0600) anyway, so the handle is not a secret to guard:
        it guards against mistakes. A live handle (state USED, generation matching) of this
        instance is enough; a freed or reused segment's handle is refused (InvalidRequest), so
        nobody maps memory that has meanwhile gone to someone else. The reply names the owner:
        a server that acts on a client's handle (the scheduler, for long prompts) checks it is
        the sender's. Attaching holds no reference: the owner's free or death still frees it.
        """
        request = _decode(message, P.SegmentRef)
        info = self.memory.segments.lookup(SegmentHandle(request.segment_id, request.generation))
        return P.pack(P.SegmentInfo(info.handle.segment_id, info.handle.generation, info.offset, info.size,
                                    info.requested_bytes, info.owner_id))

    def handle_stats(self, channel: Channel, message: Message) -> bytes:
        s = self.memory.stats()
        return P.pack(P.MemoryStatsReply(
            num_blocks=s.blocks.num_blocks, num_free_blocks=s.blocks.num_free, num_used_blocks=s.blocks.num_used,
            num_leased_blocks=s.blocks.num_leased, segment_bytes_total=s.segments.total_bytes,
            segment_bytes_used=s.segments.used_bytes, external_fragmentation=s.external_fragmentation,
            owners=self.owner_counts(),
            num_reclaimed_blocks=self.reclaimed.num_blocks, num_reclaimed_segments=self.reclaimed.num_segments,
            num_swept_blocks=self.swept.num_blocks, num_swept_segments=self.swept.num_segments,
            num_repairs=self.memory.num_repairs,
        ))

    def owner_counts(self) -> dict[int, int]:
        """Blocks (used or leased) plus segments held per endpoint, the instance included."""
        blocks, segments = self.memory.tables.blocks, self.memory.tables.segments
        held = np.isin(blocks["state"], (BlockState.USED, BlockState.LEASED))
        owners = np.concatenate([blocks["owner"][held], segments["owner"][segments["state"] == SegmentState.USED]])
        ids, counts = np.unique(owners, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}

    # -- reclamation --------------------------------------------------------------------

    def on_peer_gone(self, event: C.PeerGoneEvent) -> None:
        super().on_peer_gone(event)
        endpoint_id = event.endpoint_id
        if not event.endpoint_alive and endpoint_id in self.memory.owner_ids():
            freed = self.memory.free_owner(endpoint_id)
            self.reclaimed += freed
            log.info("freed %d blocks and %d segments of gone endpoint %d", freed.num_blocks, freed.num_segments,
                     endpoint_id)

    def on_idle(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval_s
        try:
            live = [e.endpoint_id for e in self.endpoint.kernel_stats(timeout=5.0).endpoints]
        except LlmosError as exc:
            log.warning("sweep skipped: %s", exc)
            return
        freed = self.memory.sweep(live)
        if freed.owner_ids:
            self.swept += freed
            self.reclaimed += freed
            log.warning("sweep freed %d blocks and %d segments of endpoints %s that no live endpoint matches",
                        freed.num_blocks, freed.num_segments, list(freed.owner_ids))


T = TypeVar("T", bound=msgspec.Struct)


def _decode(message: Message, cls: type[T]) -> T:
    try:
        decoded: T = P.unpack(message.payload, cls)
        return decoded
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidRequest(f"bad {cls.__name__} payload: {exc}") from None

