"""The loop every server runs: park on the doorbell, drain the rings, dispatch by type.

Runs inside each server process. It never blocks on one peer: replies that do not fit
wait in a small per-channel backlog, and a channel whose backlog is full is not read
until it drains (its client only slows itself). Bad input gets an error reply, an
unknown type UNSUPPORTED, and the server stays up.
"""

from __future__ import annotations

import logging
import signal
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeAlias

from llmos.microkernel import control as C
from llmos.microkernel.endpoint import Channel, Endpoint, Message
from llmos.microkernel.errors import ErrorCode, PeerGone, ProtocolError, RemoteError
from llmos.microkernel.lifeline import exit_with_supervisor
from llmos.microkernel.messages import HEADER_SIZE, Header, MsgFlag, MsgType, is_known_type

log = logging.getLogger("llmos.server")

Handler = Callable[[Channel, Message], bytes | None]
MAX_BATCH = 64  # records taken from one channel per pass, so one busy client cannot starve others
BACKLOG_POLL_S = 0.005


# An endpoint, or how to make one when the server is ready to take its name (a runner
# registers only once its model is loaded: from then on it may be sent steps).
EndpointSource: TypeAlias = Endpoint | Callable[[], Endpoint]


def connect(instance: str | None, name: str) -> Endpoint:
    """What a server process does to join its instance: tie itself to its supervisor, then
    register `name` with the kernel. Its __main__ calls it; the Server is handed the result."""
    exit_with_supervisor()
    return Endpoint.connect(instance, name=name)


class Server:
    """Subclass (or pass `handlers`) and call `run()`.

    A handler returns the reply payload, None to answer later itself (keeping the txid),
    or raises a RemoteError subclass to answer with that error. The server is handed its
    endpoint (or a factory for it) and owns it from then on: `run()` closes it.
    """

    name = "server"

    def __init__(self, endpoint: EndpointSource, *, handlers: dict[int, Handler] | None = None,
                 heartbeat_s: float = 0.5, max_backlog: int = 64) -> None:
        self.handlers: dict[int, Handler] = dict(handlers or {})
        self.heartbeat_s = heartbeat_s
        self.max_backlog = max_backlog
        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else endpoint()
        self.name = self.endpoint.name or self.name  # the name it registered, for the logs
        self.backlogs: dict[int, deque[bytes]] = {}
        self.num_peers_gone = 0
        self.num_errors_replied = 0
        self._stopping = False
        self.kernel_gone = False
        self._last_heartbeat = 0.0

    # -- hooks ---------------------------------------------------------------------------

    def on_peer_joined(self, channel: Channel) -> None:
        log.info("%s: %s (endpoint %d) connected on channel %d", self.name,
                 channel.info.client_name or "client", channel.info.client_id, channel.channel_id)

    def on_peer_gone(self, event: C.PeerGoneEvent) -> None:
        log.info("%s: peer %d (%s) gone from channel %d", self.name, event.endpoint_id,
                 event.name or "client", event.channel_id)

    def on_channel_corrupt(self, channel: Channel) -> None:
        """A channel was dropped because a ring of it is corrupt (the peer is told)."""

    def on_name_registered(self, event: C.NameRegistered) -> None:
        """A server took a name (a restarted peer, for instance)."""

    def on_idle(self) -> None:
        """Called once per loop pass, after the rings are drained."""

    # -- loop ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True
        self.endpoint.doorbell.ring()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self) -> int:
        """Serve until stopped (0) or until the kernel goes away (1)."""
        try:
            while not self._stopping:
                self.run_once(self.heartbeat_s)
        finally:
            self.endpoint.close()
        return 1 if self.kernel_gone else 0

    def run_once(self, timeout: float) -> None:
        readable = [self.endpoint.control] + [
            ch.incoming for ch in self.endpoint.channels.values()
            if len(self.backlogs.get(ch.channel_id, ())) < self.max_backlog
        ]
        if any(self.backlogs.values()):
            # Replies wait for a slow client; nothing wakes us when it reads, so look again soon.
            timeout = min(timeout, BACKLOG_POLL_S)
        self.endpoint.doorbell.wait(readable, timeout)
        for event in self.endpoint.poll_control():
            if event.type == MsgType.KERNEL_PEER_JOINED:
                self.on_peer_joined(event.body)
            elif event.type == MsgType.KERNEL_PEER_GONE:
                self.num_peers_gone += 1
                self.backlogs.pop(event.body.channel_id, None)
                self.endpoint.drop_channel(event.body.channel_id)
                self.on_peer_gone(event.body)
            elif event.type == MsgType.KERNEL_REGISTER:
                self.on_name_registered(event.body)
        for channel in list(self.endpoint.channels.values()):
            self._serve_channel(channel)
        self.on_idle()
        self.heartbeat_if_due()

    def heartbeat_if_due(self) -> None:
        """Tell the kernel we are alive, at most every heartbeat_s. Long handlers (a runner's
        multi-token step on a large model) call it between their parts, so a slow but working
        server is never taken for a hung one."""
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_s:
            self._last_heartbeat = now
            try:
                self.endpoint.heartbeat()
            except PeerGone as exc:  # without a kernel there is no instance to serve
                log.error("%s: the kernel is gone (%s); exiting", self.name, exc)
                self.kernel_gone = True
                self._stopping = True

    def _serve_channel(self, channel: Channel) -> None:
        backlog = self.backlogs.setdefault(channel.channel_id, deque())
        try:
            while backlog and channel.outgoing.try_send(backlog[0]):
                backlog.popleft()
        except PeerGone:
            backlog.clear()  # the client is leaving; PEER_GONE will clean up after it
        if len(backlog) >= self.max_backlog:
            return  # paused until this client reads its replies
        try:
            records = channel.incoming.try_recv_many(MAX_BATCH)
        except PeerGone:
            return  # PEER_GONE on the control ring cleans up
        except ProtocolError as exc:
            log.error("%s: channel %d is corrupt (%s); dropping it", self.name, channel.channel_id, exc)
            self.endpoint.drop_channel(channel.channel_id)
            self.on_channel_corrupt(channel)
            return
        for raw in records:
            self._handle(channel, raw, backlog)

    def _handle(self, channel: Channel, raw: bytes, backlog: deque[bytes]) -> None:
        try:
            message = channel.decode(raw)
        except ProtocolError as exc:
            # Answer what can be read of it, so the sender's txid still gets its error.
            type_, _flags, txid = struct.unpack_from("<HHI", raw) if len(raw) >= HEADER_SIZE else (0, 0, 0)
            if not is_known_type(type_):
                type_ = MsgType.KERNEL_ERROR
            self._error(channel, backlog, Header(type_, txid=txid), ErrorCode.PROTOCOL_ERROR, str(exc))
            return
        header = message.header
        if header.flags & MsgFlag.REPLY:
            if not channel.complete(message):
                log.warning("%s: unexpected reply txid %d on channel %d", self.name, header.txid, channel.channel_id)
            return
        handler = self.handlers.get(header.type)
        if handler is None:
            self._error(channel, backlog, header, ErrorCode.UNSUPPORTED,
                        f"{self.name} does not handle message type {header.type:#06x}")
            return
        try:
            payload = handler(channel, message)
        except RemoteError as exc:
            self._error(channel, backlog, header, exc.code, str(exc))
            return
        except Exception as exc:  # a bug in one handler must not take the server down
            log.exception("%s: handler for %#06x failed", self.name, header.type)
            self._error(channel, backlog, header, ErrorCode.INTERNAL, f"internal error: {exc}")
            return
        if payload is not None:
            self._queue(channel, backlog, channel.encode_reply(header, payload))

    def _error(self, channel: Channel, backlog: deque[bytes], header: Header, code: ErrorCode, text: str) -> None:
        self.num_errors_replied += 1
        self._queue(channel, backlog, channel.encode_error(header, code, text))

    def _queue(self, channel: Channel, backlog: deque[bytes], raw: bytes) -> None:
        """Send now if it fits, else keep it for later: never block on one peer. A peer
        that closed its end is leaving: what it will not read is dropped."""
        try:
            if backlog or not channel.outgoing.try_send(raw):
                backlog.append(raw)
        except PeerGone:
            backlog.clear()


def configure_logging(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
