"""The asyncio flavour of libllm.cluster: a cluster's every instance behind one awaitable session.

    async with libllm.cluster_aio.connect("auto") as session:
        print((await session.generate("Once upon a time")).text)

The cluster's HTTP front door (llmos/cluster/front.py) serves the gateway's routes on it:
it has the surface of `libllm.aio.AsyncSession` the gateway uses. Nothing blocks the loop
for long: a request's token batches are awaited as Ray object refs, and a request waiting
for some instance to be live (or, after a failover, to come back) awaits too, and the list
of instances is followed from a worker thread. What the
session does between the waits (routing, bookkeeping) is libllm.cluster's, shared with the
blocking flavour: the same router, the same failover with identical text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llmos.libllm import protocol as P
from llmos.libllm.aio_requests import AwaitedRequests
from llmos.libllm.cluster import (
    CONNECT_TIMEOUT_S,
    REFRESH_S,
    ClusterRequest,
    ClusterSession,
    RoutedRequest,
    init_ray,
    log,
)
from llmos.libllm.connection import ServerGone
from llmos.libllm.options import Options
from llmos.libllm.request import Request
from llmos.libllm.tokenizer import Tokenizer

if TYPE_CHECKING:

    pass


class AsyncClusterSession(AwaitedRequests):
    """Wraps a `ClusterSession` for asyncio. Use `libllm.cluster_aio.connect()`."""

    def __init__(self, session: ClusterSession) -> None:
        self.session = session
        session.refresh_on_send = False  # the list of instances is followed off the loop (_follow)
        self._follower: asyncio.Task[None] | None = None

    def _follow_cluster(self) -> None:
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Look at the cluster's instances every REFRESH_S, on a worker thread (Ray's calls block)."""
        loop = asyncio.get_running_loop()
        while not self.session.closed:
            try:
                await loop.run_in_executor(None, self.session.instances)
            except Exception:  # Ray's control store did not answer: the next look may
                log.warning("could not list the cluster's instances", exc_info=True)
            await asyncio.sleep(REFRESH_S)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.session.tokenizer

    @property
    def failing_over(self) -> bool:
        """(Requests fail over one by one, each on its own: the session as a whole never does.)"""
        return False

    def model_info(self) -> P.ModelInfo:
        return self.session.info

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        return self.session.chat_ids(messages, add_generation_prompt, **template_kwargs)

    # -- requests (the rest are AwaitedRequests') ----------------------------------------

    async def _start(self, prompt: str | Sequence[int], stream: bool, options: Options) -> Request:
        """(Every request streams between node and front door: `stream` is the caller's to
        decide what it sends on.)"""
        self._follow_cluster()
        return await self.session.start_async(prompt, options)

    async def news(self, request: Request) -> bool:
        pending = request.pending
        if not pending.fresh and pending.finished is None and pending.error is None:
            await _routed(request).pump_async(pending)
        return pending.finished is not None or pending.error is not None

    def cancel(self, request: Request) -> None:
        _routed(request).cancel(request.pending)

    # -- the cluster --------------------------------------------------------------------

    async def ping(self, timeout: float) -> None:
        """Some instance is live (the front door's /health asks).

        Raises:
            ServerGone: none is (every node's instance is down or starting).
        """
        if not await asyncio.get_running_loop().run_in_executor(None, self.session.instances):
            raise ServerGone("no instance of the cluster is live (`llmos cluster status` says why)")

    async def stats(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """{"cluster": the instances routed to now, failovers, each's placements} (the front
        door's /metrics; `llmos cluster status` has each instance's own figures)."""
        placements = await asyncio.get_running_loop().run_in_executor(None, self.session.placements)
        return {"cluster": {"instances": len(placements), "failovers": self.session.num_failovers,
                            "placements": placements}}

    async def close(self) -> None:
        self.session.close()
        if self._follower is not None:
            self._follower.cancel()

    async def __aenter__(self) -> AsyncClusterSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _routed(request: Request) -> RoutedRequest:
    if not isinstance(request, ClusterRequest):
        raise TypeError("not a request of a cluster session")
    return request.routed


class _Connecting:
    """`await connect()` or `async with connect() as session:`."""

    def __init__(self, address: str, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._session: AsyncClusterSession | None = None

    async def _open(self) -> AsyncClusterSession:
        def connect() -> ClusterSession:  # joining Ray and the first probes block: off the loop
            init_ray(self._address)
            return ClusterSession(self._timeout)

        return AsyncClusterSession(await asyncio.get_running_loop().run_in_executor(None, connect))

    def __await__(self) -> Generator[Any, None, AsyncClusterSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncClusterSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()


def connect(address: str = "auto", *, timeout: float = CONNECT_TIMEOUT_S) -> _Connecting:
    """An asyncio session over every llmos instance of the Ray cluster at `address` (as
    `libllm.cluster.connect`); awaitable, or an async context manager."""
    return _Connecting(address, timeout)
