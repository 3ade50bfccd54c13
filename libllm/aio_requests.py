"""The request methods every asyncio session of libllm has, built on three of its own.

`libllm.aio.AsyncSession` (one instance, through the rings) and
`libllm.cluster_aio.AsyncClusterSession` (every instance of a cluster, through Ray) differ
in how a request starts (`_start`), how its news is awaited (`news`) and how it is
stopped (`cancel`); generating, n choices, streaming text and a stop string's end are the
same for both, and live here once.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmos.libllm.options import Options, options_of, seeds_of
from llmos.libllm.request import Completion, Request

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from llmos.libllm.options import RequestArgs


class AwaitedRequests(ABC):
    @abstractmethod
    async def _start(self, prompt: str | Sequence[int], stream: bool, options: Options) -> Request:
        """The request's handle once it is sent."""

    @abstractmethod
    async def news(self, request: Request) -> bool:
        """Until `request` has news (tokens, its end or an error); True when it has ended."""

    @abstractmethod
    def cancel(self, request: Request) -> None:
        """Stop a request started here, without waiting for its end."""

    @abstractmethod
    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        """A conversation's prompt ids, through the model's chat template."""

    async def submit(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Request:
        """As `Session.submit`: the request's handle once it is sent."""
        return await self._start(prompt, False, options_of(options))

    async def generate(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Completion:
        """As `Session.generate` (text or token ids); the loop runs other tasks while it waits."""
        return await self._result(await self.submit(prompt, **options))

    async def chat(self, messages: Sequence[Mapping[str, Any]], **options: Unpack[RequestArgs]) -> Completion:
        """As `Session.chat`: the reply to a conversation, through the model's chat template."""
        return await self.generate(self.chat_ids(messages), **options)

    async def generate_n(self, prompt: str | Sequence[int], n: int,
                         **options: Unpack[RequestArgs]) -> list[Completion]:
        """As `Session.generate_n`: n completions of one prompt (seeds seed, seed+1, ...)."""
        requests = await self.submit_n(prompt, n, **options)
        return [await self._result(r) for r in requests]

    async def submit_n(self, prompt: str | Sequence[int], n: int, *, stream: bool = False,
                       **options: Unpack[RequestArgs]) -> list[Request]:
        """As `Session.submit_n`: all n started, or none."""
        first = options_of(options)
        started: list[Request] = []
        try:
            for seed in seeds_of(n, first.seed):
                started.append(await self._start(prompt, stream, dataclasses.replace(first, seed=seed)))
        except BaseException:
            for request in started:
                self.cancel(request)
            raise
        return started

    async def stream(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> AsyncIterator[str]:
        """As `Session.stream`: text pieces as tokens arrive; leaving early cancels."""
        async for piece in self.pieces(await self._start(prompt, True, options_of(options))):
            yield piece

    async def pieces(self, request: Request) -> AsyncIterator[str]:
        """The text pieces of a request started here (e.g. by `submit_n(..., stream=True)`);
        leaving early cancels it."""
        done = False
        try:
            while True:
                finished = await self.news(request)
                for piece in request.ready_pieces(final=finished):
                    yield piece
                if finished or request.stopped_by_string:
                    done = True
                    break
        finally:
            if not done:
                self.cancel(request)
        while not finished:  # a stop string cancelled it: its end frees its blocks (and completion() waits not)
            finished = await self.news(request)
            request.pending.fresh.clear()

    async def _result(self, request: Request) -> Completion:
        while not await self.news(request):
            for _ in request.ready_pieces(final=False):
                pass
        return request.result()
