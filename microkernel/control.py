"""Payloads of the kernel's control messages (type range 0x01xx), as msgspec Structs.

Shared by the kernel and every endpoint. Control messages travel over the kernel's UNIX
socket (hello, connect, heartbeat, stats) and on each endpoint's control ring (kernel
to endpoint: peer joined, peer gone, name registered). Never on the data path.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1


class Hello(msgspec.Struct, frozen=True):
    """KERNEL_HELLO: first message on a new socket. `name` registers a server."""

    protocol: int
    pid: int
    name: str = ""
    key: str = ""  # the supervisor's key: needed to register a reserved name (server_key.py)


class HelloReply(msgspec.Struct, frozen=True):
    endpoint_id: int
    arena_name: str
    doorbell: int  # arena offset of this endpoint's doorbell
    control_ring: int  # arena offset of the kernel -> endpoint ring
    control_generation: int


class Connect(msgspec.Struct, frozen=True):
    """KERNEL_CONNECT: open a channel (a ring pair) to the server registered as `server`."""

    server: str
    wait: bool = False  # wait for the server to register instead of failing at once
    window: int = 0  # requests in flight this client wants on the channel; 0: the kernel's default


class ChannelInfo(msgspec.Struct, frozen=True):
    """Both ends learn the same channel: the client in the reply, the server as PEER_JOINED."""

    channel_id: int
    client_id: int
    client_name: str  # registered name of the client ("" for plain clients)
    client_uid: int
    client_pid: int
    server_id: int
    server_name: str
    request_ring: int
    request_generation: int
    reply_ring: int
    reply_generation: int
    window: int  # requests a client may have in flight on this channel


class CloseChannel(msgspec.Struct, frozen=True):
    """KERNEL_CLOSE: this endpoint is done with `channel_id` (no reply)."""

    channel_id: int


class PeerGoneEvent(msgspec.Struct, frozen=True):
    """KERNEL_PEER_GONE on a control ring: the other end of `channel_id` died, or (with
    `endpoint_alive`) only closed this channel: what it owns is still its own then. (The
    event; `errors.PeerGone` is what a call on such a channel raises.)"""

    channel_id: int
    endpoint_id: int
    name: str
    endpoint_alive: bool = False


class NameRegistered(msgspec.Struct, frozen=True):
    """KERNEL_REGISTER event: a server took `name` (a restarted server included)."""

    name: str
    endpoint_id: int


class EndpointInfo(msgspec.Struct, frozen=True):
    endpoint_id: int
    name: str
    pid: int
    uid: int
    heartbeat_age_s: float
    channels: list[int]


class RingInfo(msgspec.Struct, frozen=True):
    channel_id: int
    direction: str  # "request" or "reply" (or "control")
    offset: int
    capacity: int
    sent_records: int
    sent_bytes: int
    recv_records: int
    recv_bytes: int
    used_bytes: int
    seq_gaps: int
    latency_count: int
    latency_p50_ns: int
    latency_p99_ns: int
    client_id: int  # the endpoints at either end: the client opened the channel to the server
    server_id: int


class KernelStats(msgspec.Struct, frozen=True):
    instance: str
    pid: int
    uptime_s: float
    arena_size: int
    rings_bytes_used: int  # carved so far (a high-water mark: freed rings are reused, not uncarved)
    rings_bytes_total: int
    endpoints: list[EndpointInfo]
    rings: list[RingInfo]
    connects_waiting: int = 0  # CONNECTs waiting for a server to register


class ErrorReply(msgspec.Struct, frozen=True):
    message: str


_encoder = msgspec.msgpack.Encoder()


def pack(obj: Any) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes | memoryview, cls: type[Any]) -> Any:
    """Decode and validate; raises msgspec.ValidationError / DecodeError on bad input."""
    return msgspec.msgpack.decode(data, type=cls)
