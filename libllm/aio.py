"""The asyncio flavour of libllm: the same surface, awaitable.

    async with libllm.aio.connect() as session:
        print((await session.generate("Once upon a time")).text)
        async for piece in session.stream("Zoo"):
            print(piece, end="")

Nothing here blocks the event loop (the gateway serves thousands of HTTP requests from one):
one thread per session parks on the reply ring's doorbell and wakes the loop, which routes
the replies and wakes the requests that have news; waiting for window space is awaited;
tokenising a long prompt, a long prompt's segment, the stats calls and a failover run on
worker threads. The session lock is only ever tried from the loop, never waited for.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from llmos.libllm import protocol as P
from llmos.libllm.aio_requests import AwaitedRequests
from llmos.libllm.client import DEFAULT_CONNECT_TIMEOUT_S, Session
from llmos.libllm.client import connect as _connect
from llmos.libllm.connection import Wired
from llmos.libllm.memory import INLINE_PROMPT_TOKENS
from llmos.libllm.options import Options
from llmos.libllm.request import DeadlineExceeded, Pending, Request
from llmos.libllm.tokenizer import Tokenizer
from llmos.microkernel.endpoint import Message, raise_for_status
from llmos.microkernel.errors import Closed, LlmosError, PeerGone, WouldBlock
from llmos.microkernel.messages import MsgType

if TYPE_CHECKING:

    pass

_WAIT_SLICE_S = 1.0  # a waiter looks at its deadline and the kernel at least this often
_LOCK_RETRY_S = 0.002  # the lock is held by a worker thread (a sync call): look again this soon
# Prompts longer than this (characters or ids) are tokenised and checked on a worker thread.
_INLINE_PREPARE = 2048
T = TypeVar("T")


class AsyncSession(AwaitedRequests):
    """Wraps a `Session` for asyncio. Use `libllm.aio.connect()`. (The request methods,
    submit ... pieces, are AwaitedRequests' on this class's `_start`, `news` and `cancel`.)"""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self._loop = loop
        self._news = asyncio.Event()  # replaced (and the old one set) whenever replies were routed
        # Requests awaited now: id(pending) -> (pending, future set when it has news).
        self._waiting: dict[int, tuple[Pending, asyncio.Future[None]]] = {}
        self._kernel_checked = 0.0
        self._pump_scheduled = False
        self._failover: asyncio.Future[None] | None = None
        self.gone: BaseException | None = None  # the last failover failed: why (cleared by the next success)
        self._drained = threading.Event()
        self._stop = threading.Event()
        self._waker = threading.Thread(target=self._wake_loop, name="libllm-aio-waker", daemon=True)
        self._waker.start()

    # -- routing ------------------------------------------------------------------------

    def _wake_loop(self) -> None:
        """Park on the current channel's ring; on news, have the loop route it."""
        while not self._stop.is_set():
            incoming = self.session.connection.channel.incoming  # a failover replaces the channel
            try:
                readable = incoming.wait_readable(_WAIT_SLICE_S)
            except (Closed, PeerGone, RuntimeError):  # the channel went: a failover is due or running
                readable = True
            if readable and not self._stop.is_set():
                self._drained.clear()
                self._loop.call_soon_threadsafe(self._pump)
                # Let the loop route before parking again on the same data.
                self._drained.wait(_WAIT_SLICE_S)

    def _pump(self) -> None:
        """Route what has arrived and wake the requests that have news (on the loop)."""
        self._pump_scheduled = False
        if self._failover is not None:
            return  # the failover's thread holds the lock; its end pumps
        lock = self.session.connection.lock
        if not lock.acquire(blocking=False):
            self._pump_soon()
            return
        try:
            self.session.connection.route_ready()
        except PeerGone:
            self._fail_over()
        finally:
            lock.release()
            self._drained.set()
        self._broadcast()

    def _broadcast(self) -> None:
        """Wake the requests that have news, and whoever waits for any news (window space)."""
        for key, (pending, waiter) in list(self._waiting.items()):
            if _has_news(pending):
                del self._waiting[key]
                if not waiter.done():
                    waiter.set_result(None)
        news, self._news = self._news, asyncio.Event()
        news.set()

    def _pump_soon(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_later(_LOCK_RETRY_S, self._pump)

    def _fail_over(self) -> asyncio.Future[None]:
        """Reconnect and resubmit on a worker thread (it waits for the restart); one at a time."""
        if self._failover is None:
            self._failover = self._loop.run_in_executor(None, self._failover_locked)
            self._failover.add_done_callback(self._failover_done)
        return self._failover

    def _failover_locked(self) -> None:
        connection = self.session.connection
        with connection.lock:
            try:
                connection.failover()
            except BaseException as exc:  # the instance did not come back: every open request ends so
                connection.table.fail_open(exc)
                raise

    def _failover_done(self, done: asyncio.Future[None]) -> None:
        self._failover = None
        self.gone = done.exception()
        self._pump()

    @property
    def failing_over(self) -> bool:
        return self._failover is not None

    async def _wait_news(self, deadline: float | None = None) -> None:
        """Until replies were routed, or a slice passed (then the kernel is looked at)."""
        news = self._news
        timeout = _WAIT_SLICE_S if deadline is None else max(0.0, min(_WAIT_SLICE_S, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(news.wait(), timeout)
        except asyncio.TimeoutError:
            self._check_kernel()
            self._pump()

    def _check_kernel(self) -> None:
        """A dead kernel closes no ring: a heartbeat on our socket to it tells (once a slice)."""
        now = time.monotonic()
        if self._failover is None and now - self._kernel_checked >= _WAIT_SLICE_S:
            self._kernel_checked = now
            try:
                self.session.connection.endpoint.heartbeat()
            except PeerGone:
                self._fail_over()

    async def _with_lock(self, action: Callable[[], T]) -> T:
        """Run `action` under the session lock, awaiting (never blocking) while a worker holds it."""
        lock = self.session.connection.lock
        while True:
            if self._failover is not None:
                await asyncio.shield(self._failover)
                continue
            if lock.acquire(blocking=False):
                try:
                    return action()
                finally:
                    lock.release()
            await asyncio.sleep(_LOCK_RETRY_S)

    async def _off_loop(self, work: Callable[[], T]) -> T:
        return await self._loop.run_in_executor(None, work)

    # -- requests -----------------------------------------------------------------------

    async def _start(self, prompt: str | Sequence[int], stream: bool, options: Options) -> Request:
        session = self.session
        if isinstance(prompt, (str, Sequence)) and len(prompt) > _INLINE_PREPARE:
            submit = await self._off_loop(lambda: session.prepare(prompt, options, stream=stream))
        else:
            submit = session.prepare(prompt, options, stream=stream)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        return session.handle(await self._send(submit, deadline), options.stop, deadline, self._cancel)

    async def submit_prepared(self, submit: P.Submit) -> Request:
        """Send a request already made (`Session.prepare`, or a cluster's node given one by
        the front door: libllm.cluster): its handle once it is at the scheduler."""
        deadline = None if submit.timeout_s is None else time.monotonic() + submit.timeout_s
        # (No deadline on the handle: the scheduler ends the request at its timeout, "deadline".)
        return self.session.handle(await self._send(submit, deadline), None, None, self._cancel)

    async def _send(self, submit: P.Submit, deadline: float | None) -> Pending:
        """Wire `submit` and send it once the window has room (awaited, never blocking)."""
        connection = self.session.connection
        wired = await self._wire(submit)
        try:
            while True:
                if wired.endpoint is not connection.endpoint:  # a failover came between: wire it again
                    connection.unwire(wired)
                    wired = await self._wire(submit)
                pending = await self._with_lock(functools.partial(self._try_send, wired))
                if pending is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExceeded("the request could not be sent within its timeout (the window stayed full)")
                await self._wait_news(deadline)  # the window is full: a final reply frees a slot
        except BaseException:
            connection.unwire(wired)
            raise
        return pending

    async def _wire(self, submit: P.Submit) -> Wired:
        connection = self.session.connection
        if len(submit.prompt_ids) > INLINE_PROMPT_TOKENS:  # a segment: a call to the memory server
            return await self._off_loop(lambda: connection.wire(submit, submit.timeout_s))
        return connection.wire(submit, submit.timeout_s)

    def _try_send(self, wired: Wired) -> Pending | None:
        """(lock held) None: the window is full, or the connection changed under us."""
        connection = self.session.connection
        if wired.endpoint is not connection.endpoint:
            return None
        try:
            return connection.try_send(wired)
        except PeerGone:  # an idle session learns of a restart here
            self._fail_over()
            return None

    async def news(self, request: Request) -> bool:
        """Until `request` has news (tokens, its end or an error); True when it has ended."""
        pending = request.pending
        while not _has_news(pending):
            deadline = request.deadline
            timeout = _WAIT_SLICE_S
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    self._cancel(pending)
                    raise DeadlineExceeded(f"request {pending.txid} did not finish within its timeout")
            waiter = self._loop.create_future()
            self._waiting[id(pending)] = (pending, waiter)
            timer = self._loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiting.pop(id(pending), None)
            if not _has_news(pending):  # a slice passed without news: look at the kernel and the ring
                self._check_kernel()
                self._pump()
        return pending.finished is not None or pending.error is not None

    def _cancel(self, pending: Pending) -> None:
        """Cancel without waiting: now if the lock is free, else from a worker thread."""
        if pending.finished is not None or pending.error is not None:
            return
        lock = self.session.connection.lock
        if self._failover is None and lock.acquire(blocking=False):
            try:
                self.session.connection.cancel(pending)
            except LlmosError:
                pass  # the scheduler is gone, and the request with it (a failover resubmits none ended)
            finally:
                lock.release()
        else:
            self._loop.run_in_executor(None, self._cancel_blocking, pending)

    def _cancel_blocking(self, pending: Pending) -> None:
        try:
            self.session.connection.cancel(pending)
        except LlmosError:
            pass

    # -- public -------------------------------------------------------------------------

    def cancel(self, request: Request) -> None:
        """Stop a request started here, without waiting for its end."""
        self._cancel(request.pending)

    async def stats(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, Any]:
        """As `Session.stats`."""
        connection = self.session.connection
        scheduler = await self.scheduler_stats(timeout)
        memory = await self._off_loop(lambda: connection.memory.call(MsgType.MEM_STATS, b"", timeout))
        kernel = await self._off_loop(lambda: connection.endpoint.kernel_stats(timeout))
        return {"kernel": msgspec.to_builtins(kernel), "scheduler": scheduler,
                "memory": msgspec.to_builtins(P.unpack(memory.payload, P.MemoryStatsReply))}

    async def scheduler_stats(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, Any]:
        """The scheduler's part of `stats` alone (one call, not three)."""
        stats: dict[str, Any] = msgspec.msgpack.decode((await self._call(MsgType.SCHED_STATS, b"", timeout)).payload)
        return stats

    async def ping(self, timeout: float) -> None:
        """The scheduler answers within `timeout` (the gateway's /health asks).

        Raises:
            DeadlineExceeded: it did not.  PeerGone: it is gone and a failover failed.
        """
        await self._call(MsgType.SCHED_MODEL_INFO, b"", timeout)

    async def _call(self, type_: int, payload: bytes, timeout: float) -> Message:
        """A request whose one reply is awaited; a failover sends it again on the new channel."""
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        sent_on: Any = None
        txid = 0

        def send() -> None:
            nonlocal sent_on, txid
            channel = self.session.connection.channel
            try:
                txid = channel.request(type_, payload, on_reply=lambda header, body:
                                       replies.append(Message(header, body)))
                sent_on = channel
            except WouldBlock:
                pass
            except PeerGone:
                self._fail_over()

        while not replies:
            if sent_on is not self.session.connection.channel:
                if self.gone is not None and self._failover is None:
                    raise self.gone
                await self._with_lock(send)
            if replies:
                break
            if time.monotonic() > deadline:
                if sent_on is not None:
                    await self._with_lock(lambda: sent_on.abandon(txid))
                raise DeadlineExceeded(f"no reply from the scheduler within {timeout:g} s")
            await self._wait_news(deadline)
        raise_for_status(replies[0])
        return replies[0]

    def model_info(self) -> P.ModelInfo:
        return self.session.model_info()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.session.tokenizer

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        """As `Session.chat_ids` (no waiting: the template runs here)."""
        return self.session.chat_ids(messages, add_generation_prompt, **template_kwargs)

    async def close(self) -> None:
        self._stop.set()
        self._drained.set()
        await self._off_loop(lambda: self._waker.join(_WAIT_SLICE_S * 2))
        self.session.close()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _has_news(pending: Pending) -> bool:
    return bool(pending.fresh) or pending.finished is not None or pending.error is not None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Connecting:
    """`await connect()` or `async with connect() as session:`."""

    def __init__(self, instance: str | None, name: str = "", window: int = 0) -> None:
        self._instance = instance
        self._name = name
        self._window = window
        self._session: AsyncSession | None = None

    async def _open(self) -> AsyncSession:
        loop = asyncio.get_running_loop()
        # The handshake is a few blocking socket calls, the tokenizer a file to read: off the loop.
        session = await loop.run_in_executor(None, lambda: _connect(self._instance, name=self._name,
                                                                    window=self._window))
        return AsyncSession(session, loop)

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()


def connect(instance: str | None = None, *, name: str = "", window: int = 0) -> _Connecting:
    """Connect to the instance's scheduler; awaitable, or an async context manager.
    `window`: requests this session may have at the scheduler at once (see `libllm.connect`)."""
    return _Connecting(instance, name, window)
