"""Connection: a session's link to the scheduler, and its failover.

Runs in the client's process. Owns the endpoint (the kernel connection), the channel to the
scheduler, the lock that serialises them, the table of open requests (request_table.py) and
the session's side of the memory server (memory.py). It sends, receives and routes replies;
when the scheduler or the whole instance restarts, it reconnects and resubmits every open
request with the tokens it has. `Session` (client.py) and `libllm.aio` both drive it through
the methods below; a `Request` (request.py) asks it only to pump and to cancel.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from llmos.libllm import protocol as P
from llmos.libllm.memory import SessionMemory
from llmos.libllm.request import DeadlineExceeded, Pending
from llmos.libllm.request_table import RequestTable, resubmission
from llmos.microkernel.endpoint import Channel, Endpoint, Message, raise_for_status
from llmos.microkernel.errors import LlmosError, PeerGone, Timeout, WouldBlock
from llmos.microkernel.messages import MsgFlag, MsgType

PUMP_SLICE_S = 0.05  # a thread waiting for window space holds the lock this long at most
WAIT_SLICE_S = 1.0  # a parked waiter looks at its deadline (and the kernel) at least this often
FAILOVER_TIMEOUT_S = 120.0  # how long a failover waits for the instance to come back
RECONNECT_PAUSE_S = 0.05


class ServerGone(PeerGone):
    """The scheduler (or the whole instance) went away while a request was open."""


@dataclass(slots=True)
class Wired:
    """A submit as bytes for one connection: a failover makes it again for the next."""

    submit: P.Submit
    endpoint: Endpoint
    payload: bytes
    segment: P.SegmentRef | None


class Connection:
    """The endpoint, the scheduler channel, the open requests, the lock over them."""

    def __init__(self, endpoint: Endpoint, channel: Channel, window: int = 0) -> None:
        self.instance = endpoint.instance
        self.window = window  # asked of the kernel for each channel to the scheduler (0: its default)
        self.num_failovers = 0  # reconnections after the scheduler or the instance went away
        self._start(endpoint, channel)

    def _start(self, endpoint: Endpoint, channel: Channel) -> None:
        """Start afresh on a connection of this process's own (at creation, or in a forked
        child): nothing of another process's requests or segments comes along."""
        self.pid = os.getpid()
        self.endpoint = endpoint
        self.channel = channel
        # Re-entrant: an abandoned stream's cleanup may run (from the garbage collector)
        # while this very thread holds the lock.
        self.lock = threading.RLock()
        self.table = RequestTable()
        # Shared tensors and long prompts' segments (its lock is taken after this one, never before).
        self.memory = SessionMemory(self.instance, endpoint)

    def ensure_process(self) -> None:
        """After a fork, the child gets a connection of its own on first use; the parent's
        rings are never touched from the child (dropping the copies closes nothing). The
        parent's segments stay the parent's: the child never frees them."""
        if self.pid == os.getpid():
            return
        endpoint = Endpoint.connect(self.instance, name=self.endpoint.name)
        self._start(endpoint, endpoint.open_channel("scheduler", wait=True, window=self.window))

    def close(self) -> None:
        """Free this connection's segments and disconnect; in a forked child that never used
        it, nothing (they are the parent's)."""
        if self.pid != os.getpid():
            return
        self.memory.free_all()
        self.endpoint.close()

    # -- sending -----------------------------------------------------------------------

    def wire(self, submit: P.Submit, timeout: float | None) -> Wired:
        """The submit's bytes on the current connection; a long prompt gets a segment (a call
        to the memory server: blocking, so async callers run this on a worker thread)."""
        endpoint = self.endpoint
        payload, segment = self.memory.wire(submit, timeout)
        return Wired(submit, endpoint, payload, segment)

    def unwire(self, wired: Wired) -> None:
        if wired.segment is not None and wired.endpoint is self.endpoint:
            self.memory.free_prompt(wired.segment)
        wired.segment = None

    def try_send(self, wired: Wired) -> Pending | None:
        """Send a submit wired for the current connection if the window has room; None when
        it is full (lock held). Never waits: the window keeps the ring from filling.

        Raises:
            PeerGone: the scheduler is gone (the caller fails over, then tries again).
        """
        try:
            txid = self.channel.request(MsgType.SCHED_SUBMIT, wired.payload, timeout=0)
        except (WouldBlock, Timeout):  # Timeout: the ring itself is full (the scheduler is behind)
            return None
        pending = Pending(txid, wired.submit, segment=wired.segment)
        wired.segment = None  # the request holds it now
        self.table.sent(pending)
        return pending

    def submit(self, submit: P.Submit, deadline: float | None) -> Pending:
        """Send `submit`, waiting for window space (and failing over) as needed."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        wired = self.wire(submit, timeout)
        try:
            while True:
                with self.lock:
                    if wired.endpoint is not self.endpoint:  # a failover replaced the connection, and its segments
                        wired = self.wire(submit, timeout)
                    try:
                        pending = self.try_send(wired)
                    except PeerGone:  # an idle session learns of a restart here: fail over, then send
                        self.failover()
                        continue
                    if pending is not None:
                        return pending
                    self._receive_slice(deadline)  # the window is full: take replies until a slot frees
        except BaseException:
            self.unwire(wired)
            raise

    def cancel(self, request: Pending) -> None:
        if request.finished is not None or request.error is not None:
            return
        with self.lock:
            if self.table.cancel_unsent(request):  # never resubmitted: it ends here
                self._release_prompt(request)
                return
            self.channel.send(MsgType.SCHED_CANCEL, P.pack(P.Cancel(request.txid)), flags=MsgFlag.WAKE)

    def call(self, type_: int, payload: bytes, timeout: float) -> Message:
        """A request to the scheduler whose reply is waited for; replies to requests in
        flight that come meanwhile are routed to them (`Channel.call` would keep them).

        Raises:
            DeadlineExceeded: no reply within `timeout`.  RemoteError: the scheduler's error.
        """
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        with self.lock:
            sent_on: Channel | None = None
            txid = 0
            while not replies:
                if sent_on is not self.channel:  # not sent yet, or a failover took the channel it went on
                    try:
                        txid = self.channel.request(type_, payload, timeout=timeout, on_reply=lambda header, body:
                                                    replies.append(Message(header, body)))
                        sent_on = self.channel
                    except WouldBlock:  # the window is full: take replies until a slot frees
                        pass
                    except PeerGone:  # an idle session learns of a restart here
                        self.failover()
                        continue
                try:
                    self._receive_slice(deadline)
                except DeadlineExceeded:
                    if sent_on is not None:
                        sent_on.abandon(txid)
                    raise
        raise_for_status(replies[0])
        return replies[0]

    # -- receiving ---------------------------------------------------------------------

    def pump(self, request: Pending, deadline: float | None) -> None:
        """Receive until `request` has news; replies for other requests are filed away.
        Waiting happens outside the lock (parked on the ring's doorbell), so other threads
        submit, cancel and drain meanwhile; whoever holds the lock routes what came."""
        while True:
            with self.lock:
                self._drain()
                if request.fresh or request.finished is not None or request.error is not None:
                    return
            remaining = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if remaining <= 0:
                raise DeadlineExceeded(f"request {request.txid} did not finish within its timeout")
            if not self.channel.incoming.wait_readable(remaining):
                self.check_kernel()  # a dead kernel closes no ring: look at our socket to it

    def route_ready(self) -> None:
        """Route every reply that is already there (lock held); never waits. The kernel's news
        on the control ring (names registered, peers gone) is for servers; a client drains it
        so the kernel keeps no backlog for it (a gone scheduler shows on its own ring).

        Raises:
            PeerGone: the scheduler is gone (the caller fails over).
        """
        self.endpoint.poll_control()
        while (message := self.channel.try_receive()) is not None:
            self._route(message)
        self._send_unsent()

    def check_kernel(self) -> None:
        with self.lock:
            try:
                self.endpoint.heartbeat()
            except PeerGone:
                self.failover()

    def _drain(self) -> None:
        """Route every reply that is already there, failing over if the scheduler is gone
        (lock held)."""
        try:
            self.route_ready()
        except PeerGone:
            self.failover()

    def _receive_slice(self, deadline: float | None, txid: int = 0) -> None:
        """Route at most one reply, waiting at most one slice (lock held)."""
        remaining = PUMP_SLICE_S if deadline is None else min(PUMP_SLICE_S, deadline - time.monotonic())
        if remaining <= 0:
            raise DeadlineExceeded(f"request {txid or 'submit'} did not finish within its timeout")
        try:
            message = self.channel.receive(remaining)
        except Timeout:
            return
        except PeerGone:
            self.failover()
            return
        self._route(message)
        self._send_unsent()

    def _route(self, message: Message) -> None:
        self.channel.complete(message)  # releases the window slot on the final reply
        ended = self.table.route(message.header, message.payload)
        if ended is not None:
            self._release_prompt(ended)

    def _release_prompt(self, request: Pending) -> None:
        """The request is over: its prompt's segment goes back. The scheduler copies the ids
        out when it admits a request, but its replies are token records, so the end of the
        request is the first sure sign that it has (lock held)."""
        segment, request.segment = request.segment, None
        if segment is not None:
            self.memory.free_prompt(segment)

    # -- failover ----------------------------------------------------------------------

    def failover(self) -> None:
        """The scheduler, or the whole instance, went away: reconnect (the supervisor restarts
        it) and resubmit every open request with the tokens it already has as a prefix, under
        the same seed. (seed, position) sampling and batch-invariant kernels make each text
        go on exactly as it would have: the caller sees a delay, no duplicate, no gap (lock held).

        Raises:
            ServerGone: the instance did not come back within FAILOVER_TIMEOUT_S.
        """
        open_requests = self.table.take_open()
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        if self._reopen_scheduler(deadline):
            for pending in open_requests:  # the new scheduler never saw these; new ones go with the resubmits
                self._release_prompt(pending)
        else:
            self._reconnect(deadline)
            for pending in open_requests:  # they went with the old connection
                pending.segment = None
        self.num_failovers += 1
        for pending in open_requests:
            again = resubmission(pending)
            if again is None:  # its last reply was lost, not its work
                continue
            try:
                payload, pending.segment = self.memory.wire(again, None)  # a long prompt gets a new segment
            except LlmosError as exc:  # e.g. no segment memory now: this request ends, the others go on
                pending.error = exc
                continue
            self.table.wait_for_window(pending, payload)
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send the resubmissions the window had no room for, while it has (lock held)."""
        while (waiting := self.table.next_unsent()) is not None:
            try:
                txid = self.channel.request(MsgType.SCHED_SUBMIT, waiting[1])
            except WouldBlock:
                return
            self.table.unsent_went(txid)

    def _reopen_scheduler(self, deadline: float) -> bool:
        """Only the scheduler went, the kernel still answers: a new channel on the same
        connection (lock held). The endpoint, and so every segment it owns (shared tensors),
        stays ours. False when the kernel is gone too."""
        try:
            self.endpoint.drop_channel(self.channel.channel_id)
            self.endpoint.poll_control()  # the kernel's news of the restart: nothing to act on
            self.channel = self.endpoint.open_channel("scheduler", wait=True, window=self.window,
                                                      timeout=max(1.0, deadline - time.monotonic()))
        except (LlmosError, OSError):
            return False
        return True

    def _reconnect(self, deadline: float) -> None:
        """The kernel went (the whole instance restarts): a new connection (lock held). The
        arena is a new one, so this session's segments are gone: its tensors say so.

        Raises:
            ServerGone: the instance did not come back within FAILOVER_TIMEOUT_S.
        """
        try:
            self.endpoint.close()
        except LlmosError:
            pass
        self.memory.forget_all(ServerGone(f"instance {self.instance!r} restarted, and its shared memory with it"))
        while True:
            try:
                endpoint = Endpoint.connect(self.instance, name=self.endpoint.name, timeout=5.0)
            except (LlmosError, OSError):
                endpoint = None
            if endpoint is not None:
                try:
                    self.channel = endpoint.open_channel("scheduler", wait=True, window=self.window,
                                                         timeout=max(1.0, deadline - time.monotonic()))
                    self.endpoint = self.memory.endpoint = endpoint
                    break
                except LlmosError:
                    endpoint.close()
            if time.monotonic() > deadline:
                raise ServerGone(f"instance {self.instance!r} did not come back within {FAILOVER_TIMEOUT_S:g} s")
            time.sleep(RECONNECT_PAUSE_S)  # waiting on another process to restart: bounded
