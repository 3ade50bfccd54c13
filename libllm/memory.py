"""A session's side of the memory server: shared tensors (`Session.alloc`, `attach`) and the
segments that carry long prompts to the scheduler (INLINE_PROMPT_TOKENS).

Runs in the client's process. One channel to the memory server, opened on first use and
again when the session's connection changes (a failover, a fork) or the memory server
restarted. Every segment this session allocated and has not freed is recorded, so closing
the session frees it; what a crash leaves, the memory server reclaims when it hears the
connection ended. Its lock is taken after the session's when both are held, never before.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import SupportsIndex

import msgspec
import numpy as np
import numpy.typing as npt

from llmos.libllm import protocol as P
from llmos.libllm.tensors import SharedTensor, as_handle, tensor_layout
from llmos.microkernel import layout as L
from llmos.microkernel.endpoint import Channel, Endpoint, Message
from llmos.microkernel.errors import InvalidRequest, LlmosError, Overloaded, PeerGone, QuotaExceeded
from llmos.microkernel.messages import MsgType

DEFAULT_TIMEOUT_S = 30.0
# A prompt of more tokens than this travels as int32 ids in a segment, its handle in the
# submit. Inline, an id costs up to 5 bytes of msgpack: 256 ids keep a submit record near
# 1 KiB, so a window of requests fits a 64 KiB channel ring many times over and many requests
# pipeline on one channel; longer prompts would crowd the ring (and past ~6k ids exceed its
# largest record). 256 is half the built-in model's 512-token context, so real prompts do
# take the segment path; below it, the alloc/free round trips would cost more than they save.
INLINE_PROMPT_TOKENS = 256
PROMPT_ID_DTYPE = np.dtype(P.PROMPT_ID_DTYPE)
# Best-effort frees (a finished request's prompt segment, close()) wait this long at most; a
# segment they miss stays recorded, and goes at close() or when the connection ends.
FREE_TIMEOUT_S = 5.0


class SessionMemory:
    """The memory server as one session uses it, over the session's connection `endpoint`
    (the session sets a new one after a failover). No reference back to the session: a
    session is freed as soon as its last user lets go, never left to the cycle collector."""

    def __init__(self, instance: str, endpoint: Endpoint) -> None:
        self._instance = instance
        self.endpoint = endpoint
        self._channel: Channel | None = None
        self._lock = threading.RLock()
        # Every segment allocated and not freed: its SharedTensor, or None for a prompt's.
        self._owned: dict[tuple[int, int], SharedTensor | None] = {}
        self._attached: weakref.WeakSet[SharedTensor] = weakref.WeakSet()

    def call(self, type_: int, payload: bytes, timeout: float) -> Message:
        """A call to the memory server. One that restarted rebuilds its tables from the
        arena, so this endpoint's segments are still ours: the call is made once more on a
        new channel."""
        with self._lock:
            for attempt in range(2):
                endpoint = self.endpoint
                channel = self._channel
                if channel is None or channel.closed or channel.endpoint is not endpoint:
                    channel = endpoint.open_channel("memory", wait=True, timeout=timeout)
                    self._channel = channel
                try:
                    return channel.call(type_, payload, timeout)
                except PeerGone:
                    channel.endpoint.drop_channel(channel.channel_id)
                    self._channel = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

    # -- shared tensors --------------------------------------------------------------------

    def alloc(self, shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike,
              timeout: float) -> SharedTensor:
        """See `Session.alloc`."""
        dims, dt, nbytes = tensor_layout(shape, dtype, self._region_bytes())
        with self._lock:
            segment = self._alloc_segment(nbytes, timeout)
            array = self.endpoint.arena.ndarray(segment.offset, dims, dt)
            array.fill(0)  # a segment keeps whatever its last owner left there
            ref = P.SegmentRef(segment.segment_id, segment.generation)
            tensor = SharedTensor(ref, array, is_owner=True, release=self._free_tensor)
            self._owned[(ref.segment_id, ref.generation)] = tensor
        return tensor

    def attach(self, handle: P.SegmentRef | tuple[int, int], shape: SupportsIndex | Sequence[SupportsIndex],
               dtype: npt.DTypeLike, timeout: float) -> SharedTensor:
        """See `Session.attach`."""
        ref = as_handle(handle)
        dims, dt, nbytes = tensor_layout(shape, dtype, self._region_bytes())
        name = f"handle ({ref.segment_id}, {ref.generation})"
        try:
            reply = self.call(MsgType.MEM_SEGMENT_INFO, P.pack(ref), timeout)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{name} cannot be attached: {exc} (its owner freed it, or its process "
                                 "ended)") from None
        info: P.SegmentInfo = P.unpack(reply.payload, P.SegmentInfo)
        if info.owner_id == 0:
            raise InvalidRequest(f"{name} names a segment of the instance itself (e.g. the model's weights), "
                                 "not a shared tensor")
        if nbytes > info.requested:
            raise InvalidRequest(f"shape {dims} of {dt} needs {nbytes} bytes; the tensor of {name} holds "
                                 f"{info.requested}")
        tensor = SharedTensor(ref, self.endpoint.arena.ndarray(info.offset, dims, dt), is_owner=False,
                              release=self._forget_tensor)
        with self._lock:
            self._attached.add(tensor)
        return tensor

    # -- long prompts ------------------------------------------------------------------------

    def wire(self, submit: P.Submit, timeout: float | None) -> tuple[bytes, P.SegmentRef | None]:
        """The submit as it travels: ids inline, or, past INLINE_PROMPT_TOKENS, in a fresh
        segment of ours (int32) that the request holds until it ends."""
        ids = submit.prompt_ids
        if len(ids) <= INLINE_PROMPT_TOKENS:
            return P.pack(submit), None
        segment = self._alloc_segment(len(ids) * PROMPT_ID_DTYPE.itemsize, timeout)
        self.endpoint.arena.ndarray(segment.offset, (len(ids),), PROMPT_ID_DTYPE)[:] = ids
        ref = P.SegmentRef(segment.segment_id, segment.generation)
        wire = msgspec.structs.replace(submit, prompt_ids=[], prompt_segment=ref, num_prompt_ids=len(ids))
        return P.pack(wire), ref

    def free_prompt(self, ref: P.SegmentRef) -> None:
        """Best effort: what cannot be freed now stays recorded, and goes at close() (or
        when the memory server sees this connection end)."""
        try:
            self._free_segment(ref, FREE_TIMEOUT_S)
        except (LlmosError, OSError):  # OSError: the connection was closed under us (a failover)
            pass

    # -- the end of a session or of its connection ---------------------------------------------

    def free_all(self) -> None:
        """The session closes: every tensor it holds stops working and every segment it
        owns is freed now, so the memory is back when close() returns."""
        with self._lock:
            owned = self.forget_all()
            try:
                for segment_id, generation in owned:
                    self._free_segment(P.SegmentRef(segment_id, generation), FREE_TIMEOUT_S)
            except LlmosError:
                pass  # the memory server reclaims it when it hears the connection ended

    def forget_all(self, reason: LlmosError | None = None) -> list[tuple[int, int]]:
        """Every tensor stops working (raising `reason` on use, if given) and nothing is
        recorded any more; returns what was owned. For a connection that is gone (a
        restarted instance has a new arena) or about to go."""
        with self._lock:
            owned, self._owned = self._owned, {}
            attached, self._attached = list(self._attached), weakref.WeakSet()
            self._channel = None
            for tensor in [*owned.values(), *attached]:
                if tensor is not None:
                    tensor._mark_freed(reason)
        return list(owned)

    # -- internals -------------------------------------------------------------------------

    def _region_bytes(self) -> int:
        """Size of the arena's SEGMENTS region: no segment is larger.

        Raises:
            InvalidRequest: the instance has none.
        """
        region = self.endpoint.arena.regions.get(L.RegionKind.SEGMENTS)
        if region is None:
            raise InvalidRequest(f"instance {self._instance!r} has no segment region for shared memory; give it "
                                 "one ([memory] segments = ... in its config)")
        return region.size

    def _alloc_segment(self, nbytes: int, timeout: float | None) -> P.Segment:
        """Allocate a segment for this endpoint and record it (as a prompt's until the caller
        says otherwise), so close() frees it.

        Raises:
            Overloaded, QuotaExceeded: the memory server's refusal, with what to do about it.
        """
        try:
            reply = self.call(MsgType.MEM_ALLOC_SEGMENT, P.pack(P.AllocSegment(nbytes)),
                              DEFAULT_TIMEOUT_S if timeout is None else timeout)
        except (Overloaded, QuotaExceeded) as exc:
            raise type(exc)(f"cannot allocate {nbytes} bytes of shared memory: {exc}. Free shared tensors that "
                            "are no longer needed (tensor.free()), or give the instance more ([memory] segments "
                            "or quota_segment_bytes in its config)") from None
        segment: P.Segment = P.unpack(reply.payload, P.Segment)
        with self._lock:
            self._owned[(segment.segment_id, segment.generation)] = None
        return segment

    def _free_segment(self, ref: P.SegmentRef, timeout: float) -> None:
        """Give a segment of ours back. One the memory server no longer knows (stale) is
        not ours any more: nothing to give back.

        Raises:
            PeerGone, Timeout: the memory server could not be reached; it stays recorded.
        """
        try:
            self.call(MsgType.MEM_FREE_SEGMENT, P.pack(ref), timeout)
        except InvalidRequest:
            pass
        with self._lock:
            self._owned.pop((ref.segment_id, ref.generation), None)

    def _free_tensor(self, tensor: SharedTensor) -> None:
        """`SharedTensor.free()` of an allocated tensor."""
        ref = tensor.handle
        with self._lock:
            if (ref.segment_id, ref.generation) in self._owned:  # else close() or a failover took it
                self._free_segment(ref, DEFAULT_TIMEOUT_S)
            tensor._mark_freed()

    def _forget_tensor(self, tensor: SharedTensor) -> None:
        """`SharedTensor.free()` of an attached tensor: the memory is its owner's to free."""
        with self._lock:
            self._attached.discard(tensor)
            tensor._mark_freed()
