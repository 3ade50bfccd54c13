"""Sessions: how a client program generates text with llmos.

Runs in the client's process. A session loads the model's tokenizer (from MODEL_INFO), so
only token ids cross the rings, checks and tokenises each request, and hands it to its
Connection (connection.py: the channel to the scheduler, the open requests and the
failover); each request's handle is a Request (request.py: text, stop strings). A session
may be shared by threads (the connection's lock serialises the channel). Its side of the
memory server (shared tensors, long prompts' segments) is memory.py.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, SupportsIndex

import msgspec
import numpy as np
import numpy.typing as npt

from llmos.libllm import chat
from llmos.libllm import protocol as P
from llmos.libllm.connection import Connection
from llmos.libllm.connection import ServerGone as ServerGone
from llmos.libllm.options import (
    Options,
    check_options,
    options_of,
    prompt_ids_of,
    seeds_of,
    submit_of,
)
from llmos.libllm.request import Completion as Completion
from llmos.libllm.request import DeadlineExceeded as DeadlineExceeded
from llmos.libllm.request import Pending, Request
from llmos.libllm.request import Timings as Timings
from llmos.libllm.request import Usage as Usage
from llmos.libllm.tensors import SharedTensor
from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from llmos.microkernel import instance as I
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import Closed, LlmosError
from llmos.microkernel.messages import MsgType

if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Unpack

    from llmos.libllm.options import RequestArgs

DEFAULT_CONNECT_TIMEOUT_S = 30.0


class Session:
    """A connection to one instance's scheduler. Use `libllm.connect()`.

    Every request method takes the same keyword arguments (`libllm.options.RequestArgs`):
    max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, tenant, logprobs
    (0..20: each token's log-probability with that many of the most likely tokens at its
    position, `Completion.logprobs`), prompt_logprobs (the prompt's tokens' too, after the
    first; the prompt is then computed in full, not taken from the prefix cache),
    presence_penalty, frequency_penalty (each in [-2, 2]) and repetition_penalty (in
    (0, 10]): OpenAI's and vLLM's (libllm.sampling.SamplingParams says how they apply).
    A bad one raises InvalidRequest naming it, before anything is sent.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.instance = connection.instance
        info = connection.call(MsgType.SCHED_MODEL_INFO, b"", DEFAULT_CONNECT_TIMEOUT_S)
        self.info: P.ModelInfo = P.unpack(info.payload, P.ModelInfo)
        self.tokenizer: Tokenizer = load_tokenizer(self.info.tokenizer_path)
        self.closed = False

    # -- public -------------------------------------------------------------------------

    @property
    def endpoint_id(self) -> int:
        """This session's endpoint at the kernel (the scheduler names a libllm client by it)."""
        return self.connection.endpoint.endpoint_id

    @property
    def num_failovers(self) -> int:
        """Reconnections after the scheduler or the instance went away."""
        return self.connection.num_failovers

    def model_info(self) -> P.ModelInfo:
        return self.info

    def generate(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Completion:
        """Generate a continuation of `prompt` and return it whole. `prompt` is text (encoded
        with the model's tokenizer) or token ids as they are (e.g. from `chat_ids`).

        Raises:
            InvalidRequest: a bad parameter (the message names it).  DeadlineExceeded: `timeout`
            passed.  QuotaExceeded: the prompt does not fit its client's KV quota.
            ServerGone: the instance went away.
        """
        return self.start(prompt, options_of(options), stream=False).result()

    def submit(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Request:
        """Start a request and return its handle at once (`result()`, `cancel()`, iterate it).
        Many may be in flight per session; tokens arrive in batches (the client is woken at
        the end), which costs least. Same arguments and errors as `generate`."""
        return self.start(prompt, options_of(options), stream=False)

    def stream(self, prompt: str | Sequence[int], **options: Unpack[RequestArgs]) -> Request:
        """Like `submit`, but tokens are sent (and this process woken) as they are made:
        iterate the result for text pieces; `result()` after for the whole Completion."""
        return self.start(prompt, options_of(options), stream=True)

    def submit_n(self, prompt: str | Sequence[int], n: int, *, stream: bool = False,
                 **options: Unpack[RequestArgs]) -> list[Request]:
        """`n` completions of one prompt, each its own Request, drawn with seeds seed, seed+1,
        ... (so they differ unless greedy). They share the prompt's KV: the scheduler
        computes its full blocks once and the others read them.

        Raises:
            InvalidRequest: a bad parameter (the message names it), or n < 1.
        """
        first = options_of(options)
        started: list[Request] = []
        try:
            for one_seed in seeds_of(n, first.seed):
                started.append(self.start(prompt, dataclasses.replace(first, seed=one_seed), stream=stream))
        except BaseException:  # all or none: a caller without the handles could not stop them
            for request in started:
                try:
                    self.connection.cancel(request.pending)
                except LlmosError:
                    pass  # the connection went: so did they
            raise
        return started

    def generate_n(self, prompt: str | Sequence[int], n: int, **options: Unpack[RequestArgs]) -> list[Completion]:
        """`n` whole completions of one prompt (see `submit_n`)."""
        return [r.result() for r in self.submit_n(prompt, n, **options)]

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Unpack[RequestArgs]) -> Completion:
        """The model's reply to a conversation: `generate(chat_ids(messages), **options)`."""
        return self.generate(self.chat_ids(messages), **options)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        """Prompt ids for a conversation (each message {"role", "content"}), through the
        model's chat template (libllm/chat.py); a model without one gets "Role: content"
        lines, then "Assistant:". `template_kwargs` reach the template (e.g. `enable_thinking`).

        Raises:
            InvalidRequest: a malformed message.  ChatTemplateError: the template refused
            the conversation or failed (its message says why).
        """
        return chat.prompt_ids(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                               **template_kwargs)

    def heartbeat(self) -> None:
        """Tell the kernel this process is alive (a supervised server's watchdog listens).

        Raises:
            PeerGone: the kernel is gone.
        """
        self.connection.endpoint.heartbeat()

    def stats(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, Any]:
        """The instance's figures: "kernel" (endpoints and every ring's counters: L_s, L_r,
        B), "scheduler" (steps, tokens, queues, T_s in steps, H) and "memory" (usage, F)."""
        connection = self.connection
        connection.ensure_process()
        scheduler = msgspec.msgpack.decode(connection.call(MsgType.SCHED_STATS, b"", timeout).payload)
        mem = msgspec.to_builtins(P.unpack(connection.memory.call(MsgType.MEM_STATS, b"", timeout).payload,
                                           P.MemoryStatsReply))
        return {"kernel": msgspec.to_builtins(connection.endpoint.kernel_stats(timeout)), "scheduler": scheduler,
                "memory": mem}

    def alloc(self, shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike = np.float32, *,
              timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> SharedTensor:
        """A zero-filled numpy array in the instance's shared arena: `tensor.array`.

        Hand `tensor.handle` (with the shape and dtype) to another process of yours on the
        same instance: its `session.attach(handle, shape, dtype)` maps the very same bytes.
        Freed by `tensor.free()` (or leaving `with tensor:`), when this session closes, or
        when this process dies; libllm/tensors.py has the lifetime rules (views, fork).

        Raises:
            InvalidRequest: a dimension that is not an int >= 1, a dtype that is not a
                fixed-size number, or more bytes than the instance's segment region holds
                (the message names `shape` or `dtype`).
            Overloaded: no free extent that large now; QuotaExceeded: over your segment
                quota (both say what to do).
        """
        self._check_open()
        self.connection.ensure_process()
        return self.connection.memory.alloc(shape, dtype, timeout)

    def attach(self, handle: P.SegmentRef | tuple[int, int], shape: SupportsIndex | Sequence[SupportsIndex],
               dtype: npt.DTypeLike = np.float32, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> SharedTensor:
        """Map a shared tensor that another process of yours allocated on this instance: the
        same bytes, no copy. `handle` is its `tensor.handle` (or a (segment_id, generation)
        pair); `shape` and `dtype` are yours to choose, within the bytes it holds.

        Attaching holds no reference: the owner's `free()` (or its end) frees the memory
        for everyone, so agree with the owner on when it is done. This tensor's `free()`
        only forgets the mapping.

        Raises:
            InvalidRequest: the handle is stale (its owner freed it, or its process ended)
                or unknown, or names no tensor; bad `shape` or `dtype`, or more bytes than
                the segment holds (the message names the field).
        """
        self._check_open()
        self.connection.ensure_process()
        return self.connection.memory.attach(handle, shape, dtype, timeout)

    def close(self) -> None:
        """Free every shared tensor and prompt segment this session holds, then disconnect.
        Idempotent. In a forked child that never used the session, only marks it closed:
        the connection and its segments are the parent's."""
        if self.closed:
            return
        self.closed = True
        self.connection.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- for libllm.aio: the same steps, driven from an event loop -----------------------

    def start(self, prompt: str | Sequence[int], options: Options, *, stream: bool) -> Request:
        """Check, tokenise and send one request; its handle."""
        submit = self.prepare(prompt, options, stream=stream)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        return self.handle(self.connection.submit(submit, deadline), options.stop, deadline)

    def prepare(self, prompt: str | Sequence[int], options: Options, *, stream: bool) -> P.Submit:
        """Check the arguments and tokenise: the request as it will travel (no lock, no I/O)."""
        self._check_open()
        self.connection.ensure_process()
        check_options(options)
        prompt_ids = self._prompt_ids(prompt)
        seed = options.seed
        if seed is None:  # chosen here, so a resubmission after a failover draws the same tokens
            seed = secrets.randbits(63)
        return submit_of(options, prompt_ids, seed, stream)

    def handle(self, pending: Pending, stop: list[str] | None, deadline: float | None,
               canceller: Callable[[Pending], None] | None = None) -> Request:
        """The Request handle of a sent request (`canceller`: how a stop string cancels it)."""
        return Request(self.connection, pending, self.tokenizer.decoder(pending.submit.prompt_ids),
                       list(stop or ()), deadline, canceller)

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise Closed("this session is closed")

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return prompt_ids_of(self.tokenizer, self.info, prompt)


def connect(instance: str | None = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S, name: str = "",
            window: int = 0, key: str = "") -> Session:
    """Connect to the instance's scheduler (default instance: $LLMOS_INSTANCE or "default").

    Args:
        name: register this connection under a server name (the gateway does, so the
            scheduler believes the tenants it names); plain clients leave it empty.
        window: requests this session may have in flight at the scheduler at once (0: the
            instance's `window`); a larger one costs ring memory (~16 KiB per request).
        key: the instance's server key, for a reserved `name` (microkernel/server_key.py).
    Raises:
        KernelUnavailable: no instance runs; the message says how to start one.
        Overloaded: the kernel has no ring space for a channel of that window.
    """
    endpoint = Endpoint.connect(instance, name=name, key=key, timeout=timeout)
    try:
        channel = endpoint.open_channel("scheduler", wait=True, timeout=timeout, window=window)
        return Session(Connection(endpoint, channel, window))
    except BaseException:
        endpoint.close()
        raise


def instances() -> list[str]:
    """Names of the instances whose kernel answers on this machine, for this user."""
    base = I.runtime_base()
    found = []
    for path in sorted(base.glob(f"*/{I.SOCKET_NAME}")):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
            found.append(path.parent.name)
        except OSError:
            pass  # a crash's leftover: `llmos up` cleans it
        finally:
            probe.close()
    return found
