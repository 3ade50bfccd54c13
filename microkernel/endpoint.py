"""An endpoint: one process's connection to the kernel, and the channels it opens.

Linked by every server and by libllm. The socket to the kernel carries control only
(hello, connect, heartbeat, stats) and is the process's liveness; data moves on the ring
pairs the kernel hands out. `Channel` stamps `seq` and `send_ns` on every message and
feeds the ring's latency and loss counters on receive (L_s, L_r, B).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from llmos.microkernel import control as C
from llmos.microkernel import instance as I
from llmos.microkernel._ring import Doorbell, Ring, now_ns
from llmos.microkernel.arena import Arena
from llmos.microkernel.errors import (
    ErrorCode,
    KernelUnavailable,
    LlmosError,
    PeerGone,
    ProtocolError,
    Timeout,
    WouldBlock,
    error_from_status,
)
from llmos.microkernel.messages import Header, MsgFlag, MsgType, decode, encode
from llmos.microkernel.server_key import server_key

MAX_PACKET = 1 << 20
ReplyCallback = Callable[[Header, bytes], None]


@dataclass(slots=True)
class Message:
    header: Header
    payload: bytes


class Channel:
    """One side of a kernel-made ring pair. A client sends requests and receives replies;
    a server receives requests and sends replies. Not thread-safe: libllm serialises."""

    def __init__(self, endpoint: Endpoint, info: C.ChannelInfo, role: str) -> None:
        self.endpoint = endpoint
        self.info = info
        self.role = role
        arena = endpoint.arena
        if role == "client":
            self.outgoing = Ring.attach(arena, info.request_ring, generation=info.request_generation, side="producer")
            self.incoming = Ring.attach(arena, info.reply_ring, generation=info.reply_generation, side="consumer")
        else:
            self.outgoing = Ring.attach(arena, info.reply_ring, generation=info.reply_generation, side="producer")
            self.incoming = Ring.attach(arena, info.request_ring, generation=info.request_generation, side="consumer")
        self.window = info.window
        self._seq = 0
        self._next_txid = 1
        self._in_flight: dict[int, ReplyCallback | None] = {}
        self._stash: dict[int, Message] = {}
        self._abandoned: set[int] = set()  # txids whose caller timed out: late replies are dropped
        self.closed = False

    @property
    def channel_id(self) -> int:
        return self.info.channel_id

    @property
    def peer_name(self) -> str:
        return self.info.server_name if self.role == "client" else self.info.client_name

    # -- sending -----------------------------------------------------------------------

    def _encode(self, type: int, payload: bytes | memoryview, flags: int, txid: int, status: int,
                arena_off: int, arena_len: int) -> bytes:
        raw = encode(type, payload, flags=flags, txid=txid, src=self.endpoint.endpoint_id, status=status,
                     seq=self._seq, send_ns=now_ns(), arena_off=arena_off, arena_len=arena_len)
        self._seq = (self._seq + 1) & 0xFFFF_FFFF
        return raw

    def send(self, type: int, payload: bytes | memoryview = b"", *, flags: int = 0, txid: int = 0,
             status: int = 0, arena_off: int = 0, arena_len: int = 0, timeout: float | None = None) -> None:
        """Send one message, waiting for ring space up to `timeout`. WAKE in `flags`
        wakes a parked peer now; without it the peer may read it with a later batch."""
        raw = self._encode(type, payload, flags, txid, status, arena_off, arena_len)
        self.outgoing.send(raw, timeout, bool(flags & MsgFlag.WAKE))

    def try_send(self, type: int, payload: bytes | memoryview = b"", *, flags: int = 0, txid: int = 0,
                 status: int = 0) -> bool:
        raw = self._encode(type, payload, flags, txid, status, 0, 0)
        if self.outgoing.try_send(raw, bool(flags & MsgFlag.WAKE)):
            return True
        self._seq = (self._seq - 1) & 0xFFFF_FFFF  # not sent: the seq is not used up
        return False

    def request(self, type: int, payload: bytes | memoryview = b"", *, on_reply: ReplyCallback | None = None,
                timeout: float | None = None) -> int:
        """Send a request without waiting for its reply; returns its txid.

        Raises:
            WouldBlock: `window` requests are already in flight on this channel.
        """
        if len(self._in_flight) >= self.window:
            raise WouldBlock(f"channel {self.channel_id} to {self.peer_name!r}: window of {self.window} requests is full")
        txid = self._next_txid
        self._next_txid = self._next_txid % 0xFFFF_FFFF + 1
        self.send(type, payload, flags=MsgFlag.WAKE, txid=txid, timeout=timeout)
        self._in_flight[txid] = on_reply
        return txid

    def encode_message(self, type: int, payload: bytes | memoryview = b"", *, flags: int = 0, txid: int = 0,
                       status: int = 0) -> bytes:
        """A message as bytes, stamped for this channel, for a sender that may queue it."""
        return self._encode(type, payload, flags, txid, status, 0, 0)

    def encode_reply(self, request: Header, payload: bytes | memoryview = b"", *, status: int = 0) -> bytes:
        """A reply as bytes, for a server that queues it when the ring is full."""
        return self._encode(request.type, payload, MsgFlag.REPLY | MsgFlag.WAKE, request.txid, status, 0, 0)

    def encode_error(self, request: Header, code: ErrorCode, message: str) -> bytes:
        return self.encode_reply(request, C.pack(C.ErrorReply(message)), status=int(code))

    # -- receiving ---------------------------------------------------------------------

    def decode(self, raw: bytes) -> Message:
        """Validate one record and count it (latency, seq gaps)."""
        header, payload = decode(raw, arena_size=self.endpoint.arena.size)
        self.incoming.note_message(header.seq, header.send_ns)
        return Message(header, bytes(payload))

    def try_receive(self) -> Message | None:
        raw = self.incoming.try_recv()
        return None if raw is None else self.decode(raw)

    def receive(self, timeout: float | None = None) -> Message:
        return self.decode(self.incoming.recv(timeout))

    def complete(self, message: Message) -> bool:
        """Route a reply to its waiting callback; True if it was one of ours."""
        header = message.header
        if header.txid in self._abandoned:
            if not header.flags & MsgFlag.MORE:
                self._abandoned.discard(header.txid)
            return True
        if header.txid not in self._in_flight:
            return False
        callback = self._in_flight[header.txid]
        if not header.flags & MsgFlag.MORE:
            del self._in_flight[header.txid]
        if callback is not None:
            callback(header, message.payload)
        else:
            self._stash[header.txid] = message
        return True

    def abandon(self, txid: int) -> None:
        """Stop waiting for `txid`: its window slot frees now, and a late reply is dropped."""
        if self._in_flight.pop(txid, _MISSING) is not _MISSING:
            self._abandoned.add(txid)

    def call(self, type: int, payload: bytes | memoryview = b"", timeout: float | None = 10.0) -> Message:
        """Send a request and wait for its (final) reply.

        Raises:
            Timeout: no reply in time (names the peer and the txid).
            PeerGone: the server died or left.  RemoteError subclasses: it answered an error.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        txid = self.request(type, payload, timeout=timeout)
        while txid not in self._stash:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = self.receive(remaining)
            except Timeout:
                self.abandon(txid)
                raise Timeout(f"no reply from {self.peer_name!r} to txid {txid} within {timeout} s") from None
            if not self.complete(message):
                raise ProtocolError(f"{self.peer_name!r} answered txid {message.header.txid}, which nobody asked")
        message = self._stash.pop(txid)
        raise_for_status(message)
        return message

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outgoing.close()
            self.incoming.close()


def raise_for_status(message: Message) -> None:
    if message.header.status == 0:
        return
    try:
        text = C.unpack(message.payload, C.ErrorReply).message
    except (msgspec.ValidationError, msgspec.DecodeError):
        text = ""
    raise error_from_status(message.header.status, text)


_MISSING = object()


@dataclass(slots=True)
class ControlEvent:
    type: int
    body: Any


class Endpoint:
    """A process's connection to its instance's kernel."""

    def __init__(self, instance: str, sock: socket.socket, hello: C.HelloReply, name: str) -> None:
        self.instance = instance
        self.name = name
        self._sock = sock
        self._lock = threading.Lock()
        self._next_txid = 1
        self.endpoint_id = hello.endpoint_id
        self.arena = Arena.attach(hello.arena_name)
        self.doorbell = Doorbell.attach(self.arena, hello.doorbell)
        self.control = Ring.attach(self.arena, hello.control_ring, generation=hello.control_generation,
                                   side="consumer")
        self.channels: dict[int, Channel] = {}
        self.closed = False

    @classmethod
    def connect(cls, instance: str | None = None, *, name: str = "", key: str = "",
                timeout: float = 10.0) -> Endpoint:
        """Handshake with the kernel of `instance` (default: $LLMOS_INSTANCE or "default").

        Args:
            name: register as a server under this name.
            key: the supervisor's key, for a name the instance reserves (default: the one this
                process was handed, if a supervisor started it; server_key.py).
        Raises:
            KernelUnavailable: no kernel runs for the instance (says how to start one).
            InvalidRequest: the name is held by a live process, or reserved and `key` is not
                the instance's; ProtocolError: version mismatch.
        """
        chosen = I.instance_name(instance)
        if name and not key:
            key = server_key()
        path = I.existing_socket(chosen)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise KernelUnavailable(
                f"the llmos kernel for instance {chosen!r} does not answer at {path} ({exc}); "
                f"start it with `llmos up --instance {chosen}`") from None
        try:
            reply = _socket_call(sock, 1, MsgType.KERNEL_HELLO, C.pack(C.Hello(C.PROTOCOL_VERSION, os.getpid(), name, key)),
                                 timeout)
            hello = C.unpack(reply, C.HelloReply)
        except BaseException:
            sock.close()
            raise
        return cls(chosen, sock, hello, name)

    # -- kernel calls ------------------------------------------------------------------

    def _kernel_call(self, type: int, payload: bytes, timeout: float) -> bytes:
        with self._lock:
            self._next_txid += 1
            return _socket_call(self._sock, self._next_txid, type, payload, timeout)

    def open_channel(self, server: str, *, wait: bool = False, timeout: float = 10.0, window: int = 0) -> Channel:
        """Ask the kernel for a ring pair to `server`, with room for `window` requests in
        flight (0: the instance's default; the kernel caps it, `channel.window` says).

        Raises:
            PeerGone: no such server is registered (and `wait` is False).  Timeout.
            Overloaded: no ring space left for a channel that large.
        """
        info = C.unpack(self._kernel_call(MsgType.KERNEL_CONNECT, C.pack(C.Connect(server, wait, window)),
                                          timeout), C.ChannelInfo)
        channel = Channel(self, info, "client")
        self.channels[info.channel_id] = channel
        return channel

    def heartbeat(self) -> None:
        with self._lock:
            try:
                self._sock.send(encode(MsgType.KERNEL_HEARTBEAT))
            except OSError as exc:
                raise PeerGone(f"the kernel of instance {self.instance!r} is gone ({exc})") from None

    def kernel_stats(self, timeout: float = 10.0) -> C.KernelStats:
        stats: C.KernelStats = C.unpack(self._kernel_call(MsgType.KERNEL_STATS, b"", timeout), C.KernelStats)
        return stats

    # -- control ring ----------------------------------------------------------------

    def poll_control(self) -> list[ControlEvent]:
        """Drain the kernel's events: peers joining (servers get their channels here),
        peers gone, names registered."""
        events = []
        for raw in self.control.try_recv_many(256):
            header, payload = decode(raw)
            if header.type == MsgType.KERNEL_PEER_JOINED:
                info = C.unpack(payload, C.ChannelInfo)
                channel = Channel(self, info, "server")
                self.channels[info.channel_id] = channel
                events.append(ControlEvent(header.type, channel))
            elif header.type == MsgType.KERNEL_PEER_GONE:
                events.append(ControlEvent(header.type, C.unpack(payload, C.PeerGoneEvent)))
            elif header.type == MsgType.KERNEL_REGISTER:
                events.append(ControlEvent(header.type, C.unpack(payload, C.NameRegistered)))
        return events

    def drop_channel(self, channel_id: int) -> None:
        """Close our ends of a channel and tell the kernel, which tells the other end."""
        channel = self.channels.pop(channel_id, None)
        if channel is None:
            return
        channel.close()
        with self._lock:
            try:
                self._sock.send(encode(MsgType.KERNEL_CLOSE, C.pack(C.CloseChannel(channel_id))))
            except OSError:
                pass  # the kernel is gone; so is the channel

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for channel in list(self.channels.values()):
            channel.close()
        self.channels.clear()
        self.control.close()
        self._sock.close()
        self.arena.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_call(sock: socket.socket, txid: int, type: int, payload: bytes, timeout: float) -> bytes:
    try:
        sock.settimeout(timeout)
        sock.send(encode(type, payload, txid=txid))
        while True:
            packet = sock.recv(MAX_PACKET)
            if not packet:
                raise PeerGone("the kernel closed the connection")
            header, body = decode(packet)
            if header.txid in (txid, 0):
                break
    except TimeoutError:
        raise Timeout(f"no answer from the kernel to {MsgType(type).name} (txid {txid}) within {timeout} s") from None
    except (ConnectionError, BrokenPipeError) as exc:
        _raise_refusal(sock)
        raise PeerGone(f"the kernel connection failed: {exc}") from None
    if header.status:
        message = Message(header, bytes(body))
        raise_for_status(message)
    return bytes(body)


def _raise_refusal(sock: socket.socket) -> None:
    """Raise the error reply the kernel left on a socket it then closed, if it left one (it
    refuses another uid that way: the refusal says why, where a broken pipe would not)."""
    sock.setblocking(False)
    for _ in range(3):  # a reset is reported once, before the packets still queued
        try:
            packet = sock.recv(MAX_PACKET)
            break
        except ConnectionResetError:
            continue
        except OSError:
            return
    else:
        return
    try:
        header, body = decode(packet)
    except (ValueError, LlmosError):
        return
    if header.status:
        raise_for_status(Message(header, bytes(body)))
