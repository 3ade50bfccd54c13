"""The kernel process: owns the instance's arena, its rings and doorbells, the name
registry and every connection's lifetime. Mechanism only: it never schedules, allocates
KV or runs a model, and it is off the per-token data path (clients and servers talk on
the rings it hands out). Run as `python -m llmos.microkernel.kernel --instance NAME`.

Control plane: a SOCK_SEQPACKET UNIX socket in the run dir; each packet is one message
(48-byte header + msgpack payload). A connection's socket is its liveness: when it
closes (exit, crash, kill -9) the kernel closes the dead side of its rings, tells the
surviving ends (PEER_GONE on their control rings) and recycles the rings later.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from llmos.microkernel import control as C
from llmos.microkernel import instance as I
from llmos.microkernel import layout as L
from llmos.microkernel._ring import Doorbell, Ring
from llmos.microkernel.arena import Arena
from llmos.microkernel.errors import ArenaError, ErrorCode, PeerGone, ProtocolError
from llmos.microkernel.lifeline import exit_with_supervisor
from llmos.microkernel.messages import Header, MsgFlag, MsgType, decode, encode
from llmos.microkernel.ring_space import RingSpace
from llmos.microkernel.server_key import is_reserved, server_key

log = logging.getLogger("llmos.kernel")

CONTROL_CAPACITY = 16 << 10
# Control messages queued for an endpoint whose ring is full; past this it is not reading
# (a server reads its ring every loop pass), and only its newest news is kept.
MAX_CONTROL_BACKLOG = 4096
CHANNEL_CAPACITY = 64 << 10  # the ring size of a channel with the default window
MAX_INLINE_REPLY = 4096  # a reply ring holds `window` replies of this size (flow rules)
MAX_WINDOW = 1024  # the most a client may ask for (the gateway asks for its max_in_flight)
MAX_PACKET = 1 << 20
MAX_CLIENT_CHANNELS = 64  # channels a client (an endpoint without a server name) may hold at once
# Rings the client endpoints of one process may hold together (each endpoint's control ring
# counts as one, so a session takes two: its control ring and its channel's pair): a process
# that leaks sessions is stopped before the instance's ring space, not after.
MAX_PROCESS_RINGS = 256
MAX_CONNECT_WAITERS = 16  # CONNECTs one endpoint may have waiting for servers to register
# The share of the RINGS region clients may not take: servers (restarts, reconnects) always fit.
SERVER_RESERVE_FRACTION = 8
TICK_S = 0.1
_UCRED = struct.Struct("3i")  # pid, uid, gid


def channel_shape(asked: int, default: int) -> tuple[int, int]:
    """The window granted and the ring capacity that keeps the flow rule: each ring holds
    `window` records of the largest inline size (twice over, for wrap-around), so a reply,
    or a request within the window, can always be written. A client that asks nothing gets
    the instance's default within the standard ring; one that asks (the gateway) gets rings
    sized for its window."""
    per_record = 2 * (MAX_INLINE_REPLY + 56)
    if asked <= 0:
        return max(1, min(default, CHANNEL_CAPACITY // per_record)), CHANNEL_CAPACITY
    window = min(asked, MAX_WINDOW)
    return window, max(CHANNEL_CAPACITY, 1 << (window * per_record - 1).bit_length())


@dataclass(slots=True)
class EndpointRecord:
    endpoint_id: int
    sock: socket.socket
    pid: int
    uid: int
    name: str = ""
    doorbell: int = 0
    control: Ring | None = None
    control_generation: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)
    channels: set[int] = field(default_factory=set)
    backlog: deque[bytes] = field(default_factory=deque)  # control messages not yet fitting
    num_dropped_control: int = 0  # backlog past MAX_CONTROL_BACKLOG: the oldest went
    num_waiting: int = 0  # its CONNECTs waiting for a server to register
    trusted: bool = False  # one of the instance's servers: not held to the clients' limits


@dataclass(slots=True)
class ChannelRecord:
    info: C.ChannelInfo
    request: Ring  # kernel's handle: closes a dead end's side, reads counters
    reply: Ring


class ClientLimit(Exception):
    """A client's request would pass a limit that keeps room for others (the message names it)."""


class Kernel:
    """One instance's kernel. `serve()` runs until SIGTERM/SIGINT or `stop()`."""

    def __init__(self, instance: str, regions: list[tuple[L.RegionKind, int]], *, window: int = 8,
                 reserved: tuple[str, ...] = (), key: str = "", max_client_channels: int = MAX_CLIENT_CHANNELS,
                 max_process_rings: int = MAX_PROCESS_RINGS) -> None:
        self.instance = I.instance_name(instance)
        # Server names only a HELLO with `key` may register (microkernel/server_key.py).
        self.reserved, self._key = reserved, key
        self.num_names_refused = 0
        self.run_dir = I.make_run_dir(self.instance)
        self.socket_path = self.run_dir / I.SOCKET_NAME
        self._clean_stale()
        size = L.ARENA_HEADER_SIZE + sum(L.align_up(s, L.PAGE_SIZE) for _, s in regions)
        self.arena = Arena.create(I.arena_name(self.instance), size, regions)
        self.window = window
        self.max_client_channels = max_client_channels
        self.max_process_rings = max_process_rings
        rings = self.arena.region(L.RegionKind.RINGS)
        self.space = RingSpace(lambda n: self.arena.carve(L.RegionKind.RINGS, n),
                               lambda: rings.size - self.arena.carved_bytes(L.RegionKind.RINGS))
        self.server_reserve = rings.size // SERVER_RESERVE_FRACTION
        self.started = time.monotonic()
        self.endpoints: dict[int, EndpointRecord] = {}
        self.by_name: dict[str, int] = {}
        self.channels: dict[int, ChannelRecord] = {}
        # Clients waiting for a server to register: (socket, txid, endpoint id, window asked).
        self.pending_connects: dict[str, list[tuple[socket.socket, int, int, int]]] = {}
        self._next_endpoint = 1
        self._next_channel = 1
        self._next_generation = 1
        self._retired: list[ChannelRecord] = []
        self._stopping = False
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)

    # -- lifecycle -------------------------------------------------------------------

    def _clean_stale(self) -> None:
        """A socket nobody answers, or an arena without a kernel, is a crash's leftover."""
        if self.socket_path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                log.warning("removing stale socket %s", self.socket_path)
                self.socket_path.unlink()
            else:
                raise RuntimeError(f"instance {self.instance!r} already has a live kernel at {self.socket_path}")
            finally:
                probe.close()
        stale = Path("/dev/shm") / I.arena_name(self.instance)
        if stale.exists():
            log.warning("removing stale arena %s", stale)
            stale.unlink()

    def stop(self) -> None:
        self._stopping = True

    def serve(self, ready: Any = None) -> None:
        """Run the loop; `ready` (a writable file) gets one line once the socket listens."""
        if ready is not None:
            ready.write(f"llmos kernel ready {self.socket_path}\n")
            ready.flush()
        log.info("kernel for %r listening on %s (arena %s, %d bytes)", self.instance, self.socket_path,
                 self.arena.name, self.arena.size)
        try:
            while not self._stopping:
                for key, _ in self.selector.select(TICK_S):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._readable(key.fileobj)  # type: ignore[arg-type]
                self._flush_backlogs()
        finally:
            self.close()

    def close(self) -> None:
        for record in list(self.endpoints.values()):
            self._retire(record)
        for conn_list in self.pending_connects.values():
            for conn, *_ in conn_list:
                conn.close()
        self.selector.close()
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)
        self.arena.close()
        self.arena.unlink()
        log.info("kernel for %r stopped", self.instance)

    # -- connections -------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # out of descriptors, say: refuse this one, keep the instance
            log.error("accept failed: %s", exc)
            return
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.getuid():
            log.warning("refused connection from uid %d (pid %d): only uid %d may use this instance",
                        uid, pid, os.getuid())
            _send_packet(conn, encode(MsgType.KERNEL_HELLO, C.pack(C.ErrorReply(
                f"refused: uid {uid} is not the instance owner (uid {os.getuid()})")),
                flags=MsgFlag.REPLY, status=ErrorCode.INVALID_REQUEST))
            conn.close()
            return
        conn.setblocking(False)
        record = EndpointRecord(self._next_endpoint, conn, pid, uid)
        self._next_endpoint += 1
        self.endpoints[record.endpoint_id] = record
        self.selector.register(conn, selectors.EVENT_READ, record.endpoint_id)

    def _readable(self, conn: socket.socket) -> None:
        endpoint_id = self.selector.get_key(conn).data
        record = self.endpoints[endpoint_id]
        try:
            packet = conn.recv(MAX_PACKET)
        except BlockingIOError:
            return
        except OSError:
            packet = b""
        if not packet:
            self._retire(record)
            return
        try:
            header, payload = decode(packet)
        except ProtocolError as exc:
            self._reply_error(conn, None, ErrorCode.PROTOCOL_ERROR, str(exc))
            return
        try:
            self._dispatch(record, header, payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._reply_error(conn, header, ErrorCode.INVALID_REQUEST, f"bad {_type_name(header.type)} payload: {exc}")
        except Exception as exc:  # the kernel takes the whole instance with it: never die on one request
            log.exception("kernel: %s from endpoint %d failed", _type_name(header.type), record.endpoint_id)
            self._reply_error(conn, header, ErrorCode.INTERNAL, f"kernel error: {exc}")

    def _dispatch(self, record: EndpointRecord, header: Header, payload: memoryview) -> None:
        if header.type == MsgType.KERNEL_HEARTBEAT:
            record.last_heartbeat = time.monotonic()
        elif record.control is None and header.type != MsgType.KERNEL_HELLO:
            self._reply_error(record.sock, header, ErrorCode.PROTOCOL_ERROR, "KERNEL_HELLO must come first")
        elif header.type == MsgType.KERNEL_HELLO:
            self._hello(record, header, C.unpack(payload, C.Hello))
        elif header.type == MsgType.KERNEL_CONNECT:
            self._connect(record, header, C.unpack(payload, C.Connect))
        elif header.type == MsgType.KERNEL_CLOSE:
            self._close_channel(record, header, C.unpack(payload, C.CloseChannel))
        elif header.type == MsgType.KERNEL_STATS:
            self._reply(record.sock, header, C.pack(self.stats()))
        else:
            self._reply_error(record.sock, header, ErrorCode.UNSUPPORTED,
                              f"the kernel does not handle {_type_name(header.type)}")

    def _hello(self, record: EndpointRecord, header: Header, hello: C.Hello) -> None:
        if record.control is not None:
            self._reply_error(record.sock, header, ErrorCode.PROTOCOL_ERROR, "KERNEL_HELLO sent twice")
            return
        if hello.protocol != C.PROTOCOL_VERSION:
            self._reply_error(record.sock, header, ErrorCode.PROTOCOL_ERROR,
                              f"protocol version {hello.protocol} is not supported; this kernel speaks "
                              f"{C.PROTOCOL_VERSION}: use the llmos that started the instance")
            return
        # Bytes: compare_digest refuses a str that is not ASCII, and a squatter may send one.
        has_key = bool(self._key) and hmac.compare_digest(hello.key.encode(), self._key.encode())
        if hello.name and is_reserved(hello.name, self.reserved) and not has_key:
            self.num_names_refused += 1
            if self.num_names_refused <= 10 or self.num_names_refused % 1000 == 0:  # a flood logs a count
                log.warning("refused name %r to pid %d (uid %d): reserved for the servers the supervisor "
                            "starts (%d refused so far)", hello.name, record.pid, record.uid, self.num_names_refused)
            self._reply_error(record.sock, header, ErrorCode.INVALID_REQUEST,
                              f"name {hello.name!r} is reserved for the servers the instance's supervisor starts")
            return
        if hello.name:
            holder = self.by_name.get(hello.name)
            if holder is not None:
                held = self.endpoints[holder]
                self._reply_error(record.sock, header, ErrorCode.INVALID_REQUEST,
                                  f"name {hello.name!r} is held by live pid {held.pid}")
                return
        # A server: a name and the supervisor's key, or any name where no supervisor set a key.
        record.trusted = bool(hello.name) and (has_key or not self._key)
        try:
            if not record.trusted:
                self._reclaim_retired()
                self._check_client_share(record, L.DOORBELL_SIZE + L.ring_footprint(CONTROL_CAPACITY),
                                         L.DOORBELL_SIZE)
            record.doorbell = self._alloc_doorbell(record.pid)
            try:
                record.control, record.control_generation = self._alloc_control(record.doorbell)
            except ArenaError:
                self.space.give(record.doorbell)
                raise
        except ClientLimit as exc:
            self._reply_error(record.sock, header, ErrorCode.OVERLOADED, str(exc))
            return
        except ArenaError as exc:
            self._reply_error(record.sock, header, ErrorCode.OVERLOADED, f"kernel out of ring space: {exc}")
            return
        record.name = hello.name
        self._reply(record.sock, header, C.pack(C.HelloReply(
            record.endpoint_id, self.arena.name, record.doorbell, record.control.offset, record.control_generation)))
        if hello.name:
            self.by_name[hello.name] = record.endpoint_id
            log.info("%s registered as endpoint %d (pid %d)", hello.name, record.endpoint_id, record.pid)
            event = encode(MsgType.KERNEL_REGISTER, C.pack(C.NameRegistered(hello.name, record.endpoint_id)))
            for other in self.endpoints.values():
                if other is not record and other.control is not None:
                    self._notify(other, event)
            for conn, txid, client_id, window in self.pending_connects.pop(hello.name, []):
                client = self.endpoints.get(client_id)
                if client is not None and client.sock is conn:
                    client.num_waiting -= 1
                    self._open_channel(client, Header(MsgType.KERNEL_CONNECT, txid=txid), record, window)

    def _connect(self, record: EndpointRecord, header: Header, request: C.Connect) -> None:
        server_id = self.by_name.get(request.server)
        if server_id is None:
            if request.wait:
                if record.num_waiting >= MAX_CONNECT_WAITERS:
                    self._reply_error(record.sock, header, ErrorCode.OVERLOADED,
                                      f"endpoint {record.endpoint_id} already waits for {record.num_waiting} "
                                      f"servers to register, the most one may ({MAX_CONNECT_WAITERS})")
                    return
                record.num_waiting += 1
                self.pending_connects.setdefault(request.server, []).append(
                    (record.sock, header.txid, record.endpoint_id, request.window))
                return
            self._reply_error(record.sock, header, ErrorCode.PEER_GONE,
                              f"no server named {request.server!r} is registered")
            return
        self._open_channel(record, header, self.endpoints[server_id], request.window)

    def _open_channel(self, client: EndpointRecord, header: Header, server: EndpointRecord, asked: int) -> None:
        window, capacity = channel_shape(asked, self.window)
        footprint = L.ring_footprint(capacity)
        self._reclaim_retired()  # what departed endpoints held is free once both ends let go
        try:
            client_bell = Doorbell.attach(self.arena, client.doorbell)
            server_bell = Doorbell.attach(self.arena, server.doorbell)
            if not client.trusted:
                self._check_client_share(client, 2 * footprint, footprint)
            req_off = self.space.take(footprint)
            try:
                rep_off = self.space.take(footprint)
            except ArenaError:
                self.space.give(req_off)
                raise
        except ClientLimit as exc:
            self._reply_error(client.sock, header, ErrorCode.OVERLOADED, str(exc))
            return
        except ArenaError as exc:
            self._reply_error(client.sock, header, ErrorCode.OVERLOADED,
                              f"kernel out of ring space for a channel of window {window}: {exc}")
            return
        req_gen, rep_gen = self._generation(), self._generation()
        request = Ring.format(self.arena, req_off, capacity, consumer_doorbell=server_bell,
                              producer_doorbell=client_bell, generation=req_gen)
        reply = Ring.format(self.arena, rep_off, capacity, consumer_doorbell=client_bell,
                            producer_doorbell=server_bell, generation=rep_gen)
        info = C.ChannelInfo(
            channel_id=self._next_channel, client_id=client.endpoint_id, client_name=client.name,
            client_uid=client.uid, client_pid=client.pid, server_id=server.endpoint_id, server_name=server.name,
            request_ring=req_off, request_generation=req_gen, reply_ring=rep_off, reply_generation=rep_gen,
            window=window,
        )
        self._next_channel += 1
        self.channels[info.channel_id] = ChannelRecord(info, request, reply)
        client.channels.add(info.channel_id)
        server.channels.add(info.channel_id)
        packed = C.pack(info)
        self._notify(server, encode(MsgType.KERNEL_PEER_JOINED, packed))
        self._reply(client.sock, header, packed)

    def _retire(self, record: EndpointRecord) -> None:
        """The endpoint's socket closed: close its sides, tell the survivors, free its name."""
        if self.endpoints.pop(record.endpoint_id, None) is None:
            return
        try:
            self.selector.unregister(record.sock)
        except (KeyError, ValueError):
            pass
        record.sock.close()
        if record.name and self.by_name.get(record.name) == record.endpoint_id:
            del self.by_name[record.name]
        log.info("endpoint %d (%s, pid %d) gone", record.endpoint_id, record.name or "client", record.pid)
        if record.num_waiting:  # its waiting CONNECTs go with it
            for server in list(self.pending_connects):
                waiters = [w for w in self.pending_connects[server] if w[2] != record.endpoint_id]
                if waiters:
                    self.pending_connects[server] = waiters
                else:
                    del self.pending_connects[server]
        for channel_id in sorted(record.channels):
            self._retire_channel(channel_id, record)
        if record.control is not None:
            record.control.close()
            self.space.give(record.control.offset)
            self.space.give(record.doorbell)

    def _retire_channel(self, channel_id: int, leaver: EndpointRecord, *, leaver_alive: bool = False) -> None:
        """`leaver` closed the channel or died: close its sides, tell the other end."""
        channel = self.channels.pop(channel_id, None)
        if channel is None:
            return
        info = channel.info
        is_client = info.client_id == leaver.endpoint_id
        # Close the leaver's sides so the survivor's blocked calls end in PeerGone.
        leaver_sends, leaver_reads = (channel.request, channel.reply) if is_client else (channel.reply, channel.request)
        _close_side(self.arena, leaver_sends, "producer")
        _close_side(self.arena, leaver_reads, "consumer")
        leaver.channels.discard(channel_id)
        survivor = self.endpoints.get(info.server_id if is_client else info.client_id)
        if survivor is not None:
            survivor.channels.discard(channel_id)
            self._notify(survivor, encode(MsgType.KERNEL_PEER_GONE, C.pack(
                C.PeerGoneEvent(channel_id, leaver.endpoint_id, leaver.name, endpoint_alive=leaver_alive))))
        self._retired.append(channel)

    def _close_channel(self, record: EndpointRecord, header: Header, request: C.CloseChannel) -> None:
        if request.channel_id in record.channels:
            self._retire_channel(request.channel_id, record, leaver_alive=True)

    # -- resources ----------------------------------------------------------------------

    def _generation(self) -> int:
        self._next_generation += 1
        return self._next_generation

    def _check_client_share(self, client: EndpointRecord, need: int, block: int) -> None:
        """A client may hold `max_client_channels` channels, its process's clients together
        `max_process_rings` rings, and none may take the ring space kept for servers (`need`
        bytes in blocks of at least `block`): one client, or one process of many clients,
        cannot starve the others or the instance itself. (Every endpoint has the kernel's uid:
        per uid, this is the servers' share.) The caller reclaims retired rings first."""
        if client.control is not None and len(client.channels) >= self.max_client_channels:
            raise ClientLimit(f"endpoint {client.endpoint_id} already holds {len(client.channels)} channels, "
                              f"the most a client may (max_client_channels = {self.max_client_channels}); "
                              f"close some first")
        held = self._process_rings(client.pid)
        if held >= self.max_process_rings:
            raise ClientLimit(f"the clients of pid {client.pid} already hold {held} rings, the most one process "
                              f"may (max_process_rings = {self.max_process_rings}; a session holds 2); "
                              f"close some sessions first")
        left = self.space.available(block)
        if left - need < self.server_reserve:
            raise ClientLimit(f"kernel out of ring space for clients: {left} bytes left, of which "
                              f"{self.server_reserve} are kept for the servers (the config's `rings` sets the region)")

    def _process_rings(self, pid: int) -> int:
        """Control rings and channels the client endpoints of `pid` hold."""
        return sum(1 + len(r.channels) for r in self.endpoints.values()
                   if r.pid == pid and not r.trusted and r.control is not None)

    def _alloc_doorbell(self, pid: int) -> int:
        offset = self.space.take(L.DOORBELL_SIZE)
        Doorbell.format(self.arena, offset, owner_pid=pid)
        return offset

    def _alloc_control(self, doorbell: int) -> tuple[Ring, int]:
        offset = self.space.take(L.ring_footprint(CONTROL_CAPACITY))
        generation = self._generation()
        ring = Ring.format(self.arena, offset, CONTROL_CAPACITY, consumer_doorbell=Doorbell.attach(self.arena, doorbell),
                           generation=generation, side="producer")
        return ring, generation

    def _reclaim_retired(self) -> None:
        """A retired ring is reused only once its survivor closed its end too (or died)."""
        keep = []
        for channel in self._retired:
            info = channel.info
            both_gone = info.client_id not in self.endpoints and info.server_id not in self.endpoints
            stats = channel.request.stats(), channel.reply.stats()
            closed = all(s.producer_closed and s.consumer_closed for s in stats)
            if both_gone or closed:
                for ring in (channel.request, channel.reply):
                    self.space.give(ring.offset)
                    ring.close()
            else:
                keep.append(channel)
        self._retired = keep

    # -- messages -------------------------------------------------------------------------

    def _notify(self, record: EndpointRecord, message: bytes) -> None:
        """Queue a control message; an endpoint that closed its control ring is leaving
        (its socket's EOF retires it), so what it would not read is dropped."""
        assert record.control is not None
        try:
            if record.backlog or not record.control.try_send(message):
                if len(record.backlog) >= MAX_CONTROL_BACKLOG:  # it does not read: keep the newest
                    record.backlog.popleft()
                    record.num_dropped_control += 1
                    if record.num_dropped_control == 1:
                        log.warning("endpoint %d (%s) does not read its control ring; dropping its oldest news",
                                    record.endpoint_id, record.name or "client")
                record.backlog.append(message)
        except PeerGone:
            record.backlog.clear()

    def _flush_backlogs(self) -> None:
        for record in list(self.endpoints.values()):
            try:
                while record.backlog and record.control is not None and record.control.try_send(record.backlog[0]):
                    record.backlog.popleft()
            except PeerGone:
                record.backlog.clear()

    def _reply(self, conn: socket.socket, header: Header, payload: bytes) -> None:
        _send_packet(conn, encode(header.type, payload, flags=MsgFlag.REPLY, txid=header.txid))

    def _reply_error(self, conn: socket.socket, header: Header | None, code: ErrorCode, message: str) -> None:
        log.info("error reply %s: %s", code.name, message)
        type_ = header.type if header is not None else MsgType.KERNEL_HELLO
        txid = header.txid if header is not None else 0
        _send_packet(conn, encode(type_, C.pack(C.ErrorReply(message)), flags=MsgFlag.REPLY, txid=txid, status=code))

    def stats(self) -> C.KernelStats:
        now = time.monotonic()
        rings = []
        for channel in self.channels.values():
            for direction, ring in (("request", channel.request), ("reply", channel.reply)):
                s = ring.stats()
                rings.append(C.RingInfo(
                    channel.info.channel_id, direction, ring.offset, s.capacity, s.sent_records, s.sent_bytes,
                    s.recv_records, s.recv_bytes, s.used_bytes, s.seq_gaps, s.latency_count,
                    s.latency_percentile_ns(0.5), s.latency_percentile_ns(0.99), channel.info.client_id,
                    channel.info.server_id))
        region = self.arena.region(L.RegionKind.RINGS)
        # Carved so far: the region's high-water mark (freed blocks are reused, never uncarved).
        used = self.arena.carved_bytes(L.RegionKind.RINGS)
        return C.KernelStats(
            instance=self.instance, pid=os.getpid(), uptime_s=now - self.started, arena_size=self.arena.size,
            rings_bytes_used=used, rings_bytes_total=region.size,
            endpoints=[C.EndpointInfo(r.endpoint_id, r.name, r.pid, r.uid, now - r.last_heartbeat, sorted(r.channels))
                       for r in self.endpoints.values() if r.control is not None],
            rings=rings, connects_waiting=sum(len(w) for w in self.pending_connects.values()),
        )


def _close_side(arena: Arena, ring: Ring, side: str) -> None:
    """Close one side of a ring on behalf of a process that can no longer do it."""
    Ring.attach(arena, ring.offset, side=side).close()


def _send_packet(conn: socket.socket, packet: bytes) -> None:
    try:
        conn.send(packet)
    except OSError:
        pass  # the peer is gone or not reading; its EOF retires it


def _type_name(type_: int) -> str:
    try:
        return MsgType(type_).name
    except ValueError:
        return f"type {type_:#06x}"


def parse_size(text: str) -> int:
    """"16M", "512k", "1.5G" or plain bytes -> bytes; ValueError for anything else,
    negative sizes and NaN included."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    scale = units.get(text[-1:], 1)
    number = float(text[:-1] if scale > 1 else text)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"not a size: {text!r}")
    return int(number * scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.microkernel.kernel", description=__doc__)
    parser.add_argument("--instance", default=None)
    parser.add_argument("--rings", default="32M", help="bytes for rings and doorbells (e.g. 32M)")
    parser.add_argument("--tables", default="0", help="bytes for the memory server's tables")
    parser.add_argument("--pages", default="0", help="bytes for KV pages")
    parser.add_argument("--segments", default="0", help="bytes for segments")
    parser.add_argument("--window", type=int, default=8, help="requests in flight per channel")
    parser.add_argument("--max-client-channels", type=int, default=MAX_CLIENT_CHANNELS,
                        help="channels one client endpoint may hold at once")
    parser.add_argument("--max-process-rings", type=int, default=MAX_PROCESS_RINGS,
                        help="rings (control rings and channels) the clients of one process may hold at once")
    parser.add_argument("--reserved", default="", help="server names (fnmatch patterns, comma-separated) that "
                        "only a HELLO with the supervisor's key registers (the key comes on stdin)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kernel[%(process)d] %(levelname)s %(message)s")
    regions = [(L.RegionKind.RINGS, parse_size(ns.rings))]
    for kind, text in ((L.RegionKind.ALLOC_TABLES, ns.tables), (L.RegionKind.PAGES, ns.pages),
                       (L.RegionKind.SEGMENTS, ns.segments)):
        if parse_size(text) > 0:
            regions.append((kind, parse_size(text)))
    exit_with_supervisor()
    try:
        reserved = tuple(p for p in ns.reserved.split(",") if p)
        kernel = Kernel(I.instance_name(ns.instance), regions, window=ns.window, reserved=reserved,
                        key=server_key(), max_client_channels=ns.max_client_channels,
                        max_process_rings=ns.max_process_rings)
    except (ArenaError, RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        print(f"llmos kernel error {exc}", flush=True)
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        kernel.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kernel.serve(ready=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
