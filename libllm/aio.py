"""The asyncio flavour of libllm: the same surface, awaitable.

    async with libllm.aio.connect() as session:
        print((await session.generate("Once upon a time")).text)
        async for piece in session.stream("Zoo"):
            print(piece, end="")

One thread per session parks on the reply ring's doorbell (no thread per request, no
polling) and wakes the event loop when replies arrive; the loop routes them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

from libllm.client import Session
from libllm.client import connect as _connect
from libllm.request import Completion, Request
from microkernel.errors import Closed, PeerGone

_WAIT_SLICE_S = 1.0


class AsyncSession:
    """Wraps a `Session` for asyncio. Use `libllm.aio.connect()`."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self._loop = loop
        self._changed = asyncio.Event()
        self._drained = threading.Event()
        self._stop = threading.Event()
        self._waker = threading.Thread(target=self._wake_loop, name="libllm-aio-waker", daemon=True)
        self._waker.start()

    def _wake_loop(self) -> None:
        """Park on the ring; on news, let the loop look (it drains under the session lock)."""
        incoming = self.session._channel.incoming
        while not self._stop.is_set():
            try:
                if incoming.wait_readable(_WAIT_SLICE_S):
                    self._loop.call_soon_threadsafe(self._changed.set)
                    # Give the loop a moment to drain before parking again on the same data.
                    self._drained.wait(_WAIT_SLICE_S)
                    self._drained.clear()
            except (Closed, PeerGone, RuntimeError):
                self._loop.call_soon_threadsafe(self._changed.set)
                return

    async def _settle(self, request: Request) -> bool:
        """Route what has arrived; wait for more unless `request` has news. True when done."""
        while True:
            self.session._drain_locked()
            self._drained.set()
            pending = request._request
            if pending.fresh or pending.finished is not None or pending.error is not None:
                return pending.finished is not None or pending.error is not None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), _WAIT_SLICE_S)
            except asyncio.TimeoutError:
                # Look again: news the waker saw can have been drained by a call on the loop
                # (a submit waiting for window space) before this wait began, and a slice is
                # the most a missed wake-up may cost.
                pass

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        """As `Session.generate` (text or token ids); the loop runs other tasks while it waits."""
        return await self._result(self.session.submit(prompt, **kwargs))

    async def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Completion:
        """As `Session.chat`: the reply to a conversation, through the model's chat template."""
        return await self.generate(self.session.chat_ids(messages), **kwargs)

    async def generate_n(self, prompt: str | Sequence[int], n: int, **kwargs: Any) -> list[Completion]:
        """As `Session.generate_n`: n completions of one prompt, computed together."""
        return [await self._result(r) for r in self.session.submit_n(prompt, n, **kwargs)]

    async def _result(self, request: Request) -> Completion:
        while not await self._settle(request):
            for _ in request._ready_pieces(final=False):
                pass
        return request.result()

    def submit(self, prompt: str | Sequence[int], **kwargs: Any) -> Request:
        return self.session.submit(prompt, **kwargs)

    async def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> AsyncIterator[str]:
        """As `Session.stream`: text pieces as tokens arrive; leaving early cancels."""
        request = self.session.stream(prompt, **kwargs)
        done = False
        try:
            while True:
                finished = await self._settle(request)
                for piece in request._ready_pieces(final=finished):
                    yield piece
                if finished or request._stopped_by_string:
                    done = True
                    return
        finally:
            if not done:
                self.session._cancel(request._request)

    def model_info(self) -> Any:
        return self.session.model_info()

    async def close(self) -> None:
        self._stop.set()
        self._drained.set()
        await asyncio.get_running_loop().run_in_executor(None, self._waker.join, _WAIT_SLICE_S * 2)
        self.session.close()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class _Connecting:
    """`await connect()` or `async with connect() as session:`."""

    def __init__(self, instance: str | None, name: str = "") -> None:
        self._instance = instance
        self._name = name
        self._session: AsyncSession | None = None

    async def _open(self) -> AsyncSession:
        loop = asyncio.get_running_loop()
        # The handshake is a few blocking socket calls: off the loop.
        session = await loop.run_in_executor(None, lambda: _connect(self._instance, name=self._name))
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


def connect(instance: str | None = None, *, name: str = "") -> _Connecting:
    """Connect to the instance's scheduler; awaitable, or an async context manager."""
    return _Connecting(instance, name)
