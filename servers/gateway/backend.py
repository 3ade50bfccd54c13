"""What the gateway serves from: one instance's scheduler (libllm.aio.AsyncSession, the
gateway process) or every instance of a cluster (libllm.cluster_aio.AsyncClusterSession,
the cluster's front door). The routes and the streams need only this of either."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from llmos.libllm import protocol as P
from llmos.libllm.request import Completion, Request
from llmos.libllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from llmos.libllm.options import RequestArgs


class Backend(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def failing_over(self) -> bool:
        """Reconnecting to a restarted scheduler (/health says so)."""

    def model_info(self) -> P.ModelInfo: ...

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]: ...

    async def generate_n(self, prompt: str | Sequence[int], n: int,
                         **options: Unpack[RequestArgs]) -> list[Completion]: ...

    async def submit_n(self, prompt: str | Sequence[int], n: int, *, stream: bool = False,
                       **options: Unpack[RequestArgs]) -> list[Request]: ...

    def pieces(self, request: Request) -> AsyncIterator[str]: ...

    def cancel(self, request: Request) -> None: ...

    async def ping(self, timeout: float) -> None:
        """Raises LlmosError when requests cannot be served now."""

    async def stats(self, timeout: float = ...) -> dict[str, Any] | None:
        """The instance's figures for /metrics; None when there is no one instance."""
