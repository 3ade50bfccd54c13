"""Sessions: how a client program generates text with llmos.

Runs in the client's process. A session connects to the kernel, opens a channel to the
scheduler and loads the model's tokenizer (from MODEL_INFO), so only token ids cross the
rings; it routes the replies to their Requests (libllm/request.py: text, stop strings) and
fails over when the scheduler or the instance restarts. One lock serialises the channel,
so a session may be shared by threads. Its side of the memory server (shared tensors, long
prompts' segments) is libllm/memory.py.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, SupportsIndex

import msgspec
import numpy as np
import numpy.typing as npt

from llmos.libllm import chat
from llmos.libllm import protocol as P
from llmos.libllm.memory import SessionMemory
from llmos.libllm.options import Options, check_options, submit_of, text
from llmos.libllm.request import Completion as Completion
from llmos.libllm.request import DeadlineExceeded as DeadlineExceeded
from llmos.libllm.request import Pending, Request
from llmos.libllm.request import Timings as Timings
from llmos.libllm.request import Usage as Usage
from llmos.libllm.tensors import SharedTensor
from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from llmos.microkernel import instance as I
from llmos.microkernel.endpoint import Channel, Endpoint, Message, raise_for_status
from llmos.microkernel.errors import (
    InvalidRequest,
    LlmosError,
    PeerGone,
    Timeout,
    WouldBlock,
)
from llmos.microkernel.messages import MsgFlag, MsgType

DEFAULT_CONNECT_TIMEOUT_S = 30.0
PUMP_SLICE_S = 0.05  # a thread waiting for window space holds the session lock this long at most
WAIT_SLICE_S = 1.0  # a parked waiter looks at its deadline (and the kernel) at least this often
FAILOVER_TIMEOUT_S = 120.0  # how long a failover waits for the instance to come back
RECONNECT_PAUSE_S = 0.05


class ServerGone(PeerGone):
    """The scheduler (or the whole instance) went away while a request was open."""


@dataclass(slots=True)
class _Wired:
    """A submit as bytes for one connection: a failover makes it again for the next."""

    submit: P.Submit
    endpoint: Endpoint
    payload: bytes
    segment: P.SegmentRef | None


class Session:
    """A connection to one instance's scheduler. Use `libllm.connect()`."""

    def __init__(self, endpoint: Endpoint, channel: Channel, window: int = 0) -> None:
        self.instance = endpoint.instance
        self._window = window  # asked of the kernel for each channel to the scheduler (0: its default)
        self._use_connection(endpoint, channel)
        self.num_failovers = 0  # reconnections after the scheduler or the instance went away
        info = self._call(MsgType.SCHED_MODEL_INFO, b"", DEFAULT_CONNECT_TIMEOUT_S)
        self.info: P.ModelInfo = P.unpack(info.payload, P.ModelInfo)
        self.tokenizer: Tokenizer = load_tokenizer(self.info.tokenizer_path)
        self.closed = False

    # -- public -------------------------------------------------------------------------

    def model_info(self) -> P.ModelInfo:
        return self.info

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 priority: int = 0, timeout: float | None = None, logprobs: int | None = None,
                 prompt_logprobs: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0) -> Completion:
        """Generate a continuation of `prompt` and return it whole. `prompt` is text (encoded
        with the model's tokenizer) or token ids as they are (e.g. from `chat_ids`).
        `logprobs` (0..20): each token's log-probability under the model, with that many of
        the most likely tokens at its position (`Completion.logprobs`); `prompt_logprobs`:
        the prompt's tokens' too, after the first (`Completion.prompt_logprobs`; the prompt
        is then computed in full, not taken from the prefix cache). `presence_penalty`,
        `frequency_penalty` (each in [-2, 2]) and `repetition_penalty` (in (0, 10]) are
        OpenAI's and vLLM's (libllm.sampling.SamplingParams says how they apply).

        Raises:
            InvalidRequest: a bad parameter (the message names it).  DeadlineExceeded: `timeout`
            passed.  ServerGone: the instance went away.
        """
        options = Options(max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, "", logprobs,
                          prompt_logprobs, presence_penalty, frequency_penalty, repetition_penalty)
        return self._start(prompt, options, False).result()

    def submit(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               priority: int = 0, timeout: float | None = None, tenant: str = "",
               logprobs: int | None = None, prompt_logprobs: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> Request:
        """Start a request and return its handle at once (`result()`, `cancel()`, iterate it).
        Many may be in flight per session; tokens arrive in batches (the client is woken at
        the end), which costs least. Same arguments and errors as `generate`."""
        options = Options(max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, tenant, logprobs,
                          prompt_logprobs, presence_penalty, frequency_penalty, repetition_penalty)
        return self._start(prompt, options, False)

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               priority: int = 0, timeout: float | None = None, tenant: str = "",
               logprobs: int | None = None, prompt_logprobs: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> Request:
        """Like `submit`, but tokens are sent (and this process woken) as they are made:
        iterate the result for text pieces; `result()` after for the whole Completion."""
        options = Options(max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, tenant, logprobs,
                          prompt_logprobs, presence_penalty, frequency_penalty, repetition_penalty)
        return self._start(prompt, options, True)

    def submit_n(self, prompt: str | Sequence[int], n: int, *, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 priority: int = 0, timeout: float | None = None, stream: bool = False,
                 tenant: str = "", logprobs: int | None = None, prompt_logprobs: bool = False,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0) -> list[Request]:
        """`n` completions of one prompt, each its own Request, drawn with seeds seed, seed+1,
        ... (so they differ unless greedy). They share the prompt's KV: the scheduler
        computes its full blocks once and the others read them.

        Raises:
            InvalidRequest: a bad parameter (the message names it), or n < 1.
        """
        options = Options(max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, tenant, logprobs,
                          prompt_logprobs, presence_penalty, frequency_penalty, repetition_penalty)
        started: list[Request] = []
        try:
            for one_seed in self._seeds(n, seed):
                started.append(self._start(prompt, dataclasses.replace(options, seed=one_seed), stream))
        except BaseException:  # all or none: a caller without the handles could not stop them
            for request in started:
                try:
                    self._cancel(request._request)
                except LlmosError:
                    pass  # the connection went: so did they
            raise
        return started

    @staticmethod
    def _seeds(n: int, seed: int | None) -> list[int | None]:
        """The n requests' seeds: seed, seed+1, ... (a random start when None)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequest(f"n must be a positive int, got {n!r}")
        if seed is None:
            seed = secrets.randbits(62)
        elif not isinstance(seed, int) or isinstance(seed, bool):
            return [seed] * n  # not a seed: the first request's checks name it
        elif seed + n > 2**64:
            raise InvalidRequest(f"seed + n - 1 must stay below 2**64 (the n seeds are seed, seed+1, ...), got "
                                 f"seed {seed!r}")
        return [seed + i for i in range(n)]

    def generate_n(self, prompt: str | Sequence[int], n: int, *, max_tokens: int = 64, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                   priority: int = 0, timeout: float | None = None, logprobs: int | None = None,
                   prompt_logprobs: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                   repetition_penalty: float = 1.0) -> list[Completion]:
        """`n` whole completions of one prompt (see `submit_n`)."""
        requests = self.submit_n(prompt, n, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop=stop, priority=priority, timeout=timeout,
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 repetition_penalty=repetition_penalty)
        return [r.result() for r in requests]

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Completion:
        """The model's reply to a conversation: `generate(chat_ids(messages), **kwargs)`."""
        return self.generate(self.chat_ids(messages), **kwargs)

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
        self._endpoint.heartbeat()

    def stats(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, Any]:
        """The instance's figures: "kernel" (endpoints and every ring's counters: L_s, L_r,
        B), "scheduler" (steps, tokens, queues, T_s in steps) and "memory" (usage, F, H)."""
        self._ensure_process()
        scheduler = msgspec.msgpack.decode(self._call(MsgType.SCHED_STATS, b"", timeout).payload)
        mem = msgspec.to_builtins(P.unpack(self._memory.call(MsgType.MEM_STATS, b"", timeout).payload,
                                           P.MemoryStatsReply))
        return {"kernel": msgspec.to_builtins(self._endpoint.kernel_stats(timeout)), "scheduler": scheduler,
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
        self._ensure_process()
        return self._memory.alloc(shape, dtype, timeout)

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
        self._ensure_process()
        return self._memory.attach(handle, shape, dtype, timeout)

    def _start(self, prompt: str | Sequence[int], options: Options, stream: bool) -> Request:
        submit = self._prepare(prompt, options, stream)
        timeout = options.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        wired = self._wire(submit, timeout)
        try:
            while True:
                with self._lock:
                    if wired.endpoint is not self._endpoint:  # a failover replaced the connection, and its segments
                        wired = self._wire(submit, timeout)
                    try:
                        pending = self._try_send(wired)
                    except PeerGone:  # an idle session learns of a restart here: fail over, then send
                        self._failover()
                        continue
                    if pending is not None:
                        break
                    self._receive_slice(deadline)  # the window is full: take replies until a slot frees
        except BaseException:
            self._unwire(wired)
            raise
        return self._handle(pending, options.stop, deadline)

    def _prepare(self, prompt: str | Sequence[int], options: Options, stream: bool) -> P.Submit:
        """Check the arguments and tokenise: the request as it will travel (no lock, no I/O)."""
        self._check_open()
        self._ensure_process()
        o = options
        check_options(o)
        prompt_ids = self._prompt_ids(prompt)
        seed = o.seed
        if seed is None:  # chosen here, so a resubmission after a failover draws the same tokens
            seed = secrets.randbits(63)
        return submit_of(o, prompt_ids, seed, stream)

    def _wire(self, submit: P.Submit, timeout: float | None) -> _Wired:
        """The submit's bytes on the current connection; a long prompt gets a segment (a call
        to the memory server: blocking, so async callers run this on a worker thread)."""
        endpoint = self._endpoint
        payload, segment = self._memory.wire(submit, timeout)
        return _Wired(submit, endpoint, payload, segment)

    def _unwire(self, wired: _Wired) -> None:
        if wired.segment is not None and wired.endpoint is self._endpoint:
            self._memory.free_prompt(wired.segment)
        wired.segment = None

    def _try_send(self, wired: _Wired) -> Pending | None:
        """Send a submit wired for the current connection if the window has room; None when
        it is full (lock held). Never waits: the window keeps the ring from filling.

        Raises:
            PeerGone: the scheduler is gone (the caller fails over, then tries again).
        """
        try:
            txid = self._channel.request(MsgType.SCHED_SUBMIT, wired.payload, timeout=0)
        except (WouldBlock, Timeout):  # Timeout: the ring itself is full (the scheduler is behind)
            return None
        pending = Pending(txid, wired.submit, segment=wired.segment)
        wired.segment = None  # the request holds it now
        self._requests[txid] = pending
        return pending

    def _handle(self, pending: Pending, stop: list[str] | None, deadline: float | None) -> Request:
        return Request(self, pending, self.tokenizer.decoder(pending.submit.prompt_ids), list(stop or ()), deadline)

    def _ensure_process(self) -> None:
        """After a fork, the child gets a connection of its own on first use; the parent's
        rings are never touched from the child (dropping the copies closes nothing). The
        parent's segments stay the parent's: the child never frees them."""
        if self._pid == os.getpid():
            return
        endpoint = Endpoint.connect(self.instance, name=self._endpoint.name)
        self._use_connection(endpoint, endpoint.open_channel("scheduler", wait=True, window=self._window))

    def _use_connection(self, endpoint: Endpoint, channel: Channel) -> None:
        """Start afresh on a connection of this process's own (at creation, or in a forked
        child): nothing of another process's requests or segments comes along."""
        self._pid = os.getpid()
        self._endpoint = endpoint
        self._channel = channel
        # Re-entrant: an abandoned stream's cleanup may run (from the garbage collector)
        # while this very thread holds the lock.
        self._lock = threading.RLock()
        self._requests: dict[int, Pending] = {}
        # Resubmissions a failover could not send yet (the channel's window was full): sent as
        # replies free slots, each with its payload.
        self._unsent: deque[tuple[Pending, bytes]] = deque()
        # Shared tensors and long prompts' segments (its lock is taken after _lock, never before).
        self._memory = SessionMemory(self.instance, endpoint)

    def close(self) -> None:
        """Free every shared tensor and prompt segment this session holds, then disconnect.
        Idempotent. In a forked child that never used the session, only marks it closed:
        the connection and its segments are the parent's."""
        if self.closed:
            return
        self.closed = True
        if self._pid != os.getpid():
            return
        self._memory.free_all()
        self._endpoint.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise PeerGone("this session is closed")

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt as token ids, checked (text is encoded with the model's tokenizer)."""
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Sequence, np.ndarray)):
            raise InvalidRequest(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            text("prompt", prompt)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._checked_ids(prompt)
        if len(ids) >= self.info.context_length:
            raise InvalidRequest(f"prompt of {len(ids)} tokens does not fit the context of "
                                 f"{self.info.context_length} tokens")
        return ids

    def _checked_ids(self, prompt: Sequence[int]) -> list[int]:
        """A copy as plain ints (what a failover resubmits stays as it was asked)."""
        if len(prompt) == 0:
            raise InvalidRequest("prompt must hold at least one token id")
        vocab_size = self.info.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
                raise InvalidRequest(f"prompt[{i}] must be a token id, an int in [0, {vocab_size}), got {t!r}")
        return [int(t) for t in prompt]

    def _call(self, type_: int, payload: bytes, timeout: float) -> Message:
        """A request to the scheduler whose reply is waited for; replies to requests in
        flight that come meanwhile are routed to them (`Channel.call` would keep them).

        Raises:
            DeadlineExceeded: no reply within `timeout`.  RemoteError: the scheduler's error.
        """
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        with self._lock:
            sent_on: Channel | None = None
            txid = 0
            while not replies:
                if sent_on is not self._channel:  # not sent yet, or a failover took the channel it went on
                    try:
                        txid = self._channel.request(type_, payload, timeout=timeout, on_reply=lambda header, body:
                                                     replies.append(Message(header, body)))
                        sent_on = self._channel
                    except WouldBlock:  # the window is full: take replies until a slot frees
                        pass
                    except PeerGone:  # an idle session learns of a restart here
                        self._failover()
                        continue
                try:
                    self._receive_slice(deadline)
                except DeadlineExceeded:
                    if sent_on is not None:
                        sent_on.abandon(txid)
                    raise
        raise_for_status(replies[0])
        return replies[0]

    def _release_prompt(self, request: Pending) -> None:
        """The request is over: its prompt's segment goes back. The scheduler copies the ids
        out when it admits a request, but its replies are token records, so the end of the
        request is the first sure sign that it has (lock held)."""
        segment, request.segment = request.segment, None
        if segment is not None:
            self._memory.free_prompt(segment)

    def _pump(self, request: Pending, deadline: float | None) -> None:
        """Receive until `request` has news; replies for other requests are filed away.
        Waiting happens outside the lock (parked on the ring's doorbell), so other threads
        submit, cancel and drain meanwhile; whoever holds the lock routes what came."""
        while True:
            with self._lock:
                self._drain()
                if request.fresh or request.finished is not None or request.error is not None:
                    return
            remaining = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if remaining <= 0:
                raise DeadlineExceeded(f"request {request.txid} did not finish within its timeout")
            if not self._channel.incoming.wait_readable(remaining):
                self._check_kernel()  # a dead kernel closes no ring: look at our socket to it

    def _drain_locked(self) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        """Route every reply that is already there, failing over if the scheduler is gone
        (lock held)."""
        try:
            self._route_ready()
        except PeerGone:
            self._failover()

    def _route_ready(self) -> None:
        """Route every reply that is already there (lock held); never waits. The kernel's news
        on the control ring (names registered, peers gone) is for servers; a client drains it
        so the kernel keeps no backlog for it (a gone scheduler shows on its own ring).

        Raises:
            PeerGone: the scheduler is gone (the caller fails over).
        """
        self._endpoint.poll_control()
        while (message := self._channel.try_receive()) is not None:
            self._route(message)
        self._send_unsent()

    def _check_kernel(self) -> None:
        with self._lock:
            try:
                self._endpoint.heartbeat()
            except PeerGone:
                self._failover()

    def _failover(self) -> None:
        """The scheduler, or the whole instance, went away: reconnect (the supervisor restarts
        it) and resubmit every open request with the tokens it already has as a prefix, under
        the same seed. (seed, position) sampling and batch-invariant kernels make each text
        go on exactly as it would have: the caller sees a delay, no duplicate, no gap (lock held).

        Raises:
            ServerGone: the instance did not come back within FAILOVER_TIMEOUT_S.
        """
        open_requests = [r for r in self._requests.values() if r.finished is None and r.error is None]
        open_requests += [pending for pending, _ in self._unsent]  # from a failover before this one
        self._unsent.clear()
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        if self._reopen_scheduler(deadline):
            for pending in open_requests:  # the new scheduler never saw these; new ones go with the resubmits
                self._release_prompt(pending)
        else:
            self._reconnect(deadline)
            for pending in open_requests:  # they went with the old connection
                pending.segment = None
        self._requests = {}
        self.num_failovers += 1
        for pending in open_requests:
            first, made = pending.submit, len(pending.token_ids)
            if made >= first.max_tokens:  # its last reply was lost, not its work
                pending.finished = P.Finished("length", len(first.prompt_ids), made, first.seed or 0, 0.0, 0.0, 0.0)
                continue
            again = msgspec.structs.replace(first, prompt_ids=first.prompt_ids + pending.token_ids,
                                            max_tokens=first.max_tokens - made, num_resumed_ids=made)
            try:
                payload, pending.segment = self._memory.wire(again, None)  # a long prompt gets a new segment
            except LlmosError as exc:  # e.g. no segment memory now: this request ends, the others go on
                pending.error = exc
                continue
            self._unsent.append((pending, payload))
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send the resubmissions the window had no room for, while it has (lock held)."""
        while self._unsent:
            pending, payload = self._unsent[0]
            try:
                pending.txid = self._channel.request(MsgType.SCHED_SUBMIT, payload)
            except WouldBlock:
                return
            self._unsent.popleft()
            self._requests[pending.txid] = pending

    def _reopen_scheduler(self, deadline: float) -> bool:
        """Only the scheduler went, the kernel still answers: a new channel on the same
        connection (lock held). The endpoint, and so every segment it owns (shared tensors),
        stays ours. False when the kernel is gone too."""
        try:
            self._endpoint.drop_channel(self._channel.channel_id)
            self._endpoint.poll_control()  # the kernel's news of the restart: nothing to act on
            self._channel = self._endpoint.open_channel("scheduler", wait=True, window=self._window,
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
            self._endpoint.close()
        except LlmosError:
            pass
        self._memory.forget_all(ServerGone(f"instance {self.instance!r} restarted, and its shared memory with it"))
        while True:
            try:
                endpoint = Endpoint.connect(self.instance, name=self._endpoint.name, timeout=5.0)
            except (LlmosError, OSError):
                endpoint = None
            if endpoint is not None:
                try:
                    self._channel = endpoint.open_channel("scheduler", wait=True, window=self._window,
                                                          timeout=max(1.0, deadline - time.monotonic()))
                    self._endpoint = self._memory.endpoint = endpoint
                    break
                except LlmosError:
                    endpoint.close()
            if time.monotonic() > deadline:
                raise ServerGone(f"instance {self.instance!r} did not come back within {FAILOVER_TIMEOUT_S:g} s")
            time.sleep(RECONNECT_PAUSE_S)  # waiting on another process to restart: bounded

    def _receive_slice(self, deadline: float | None, txid: int = 0) -> None:
        """Route at most one reply, waiting at most one slice (lock held)."""
        remaining = PUMP_SLICE_S if deadline is None else min(PUMP_SLICE_S, deadline - time.monotonic())
        if remaining <= 0:
            raise DeadlineExceeded(f"request {txid or 'submit'} did not finish within its timeout")
        try:
            message = self._channel.receive(remaining)
        except Timeout:
            return
        except PeerGone:
            self._failover()
            return
        self._route(message)
        self._send_unsent()

    def _route(self, message: Message) -> None:
        header = message.header
        request = self._requests.get(header.txid)
        self._channel.complete(message)  # releases the window slot on the final reply
        if request is None:
            return
        if header.status:
            try:
                raise_for_status(message)
            except Exception as exc:  # stored: raised in the caller's thread
                request.error = exc
            self._requests.pop(header.txid, None)
            self._release_prompt(request)
        elif header.flags & MsgFlag.MORE:
            tokens: P.Tokens = P.unpack(message.payload, P.Tokens)
            request.token_ids.extend(tokens.token_ids)
            request.logprobs.extend(tokens.logprobs)
            request.fresh.extend(tokens.token_ids)
        else:
            request.finished = P.unpack(message.payload, P.Finished)
            self._requests.pop(header.txid, None)
            self._release_prompt(request)

    def _cancel(self, request: Pending) -> None:
        if request.finished is not None or request.error is not None:
            return
        with self._lock:
            for i, (pending, _) in enumerate(self._unsent):
                if pending is request:  # never resubmitted: it ends here
                    del self._unsent[i]
                    request.finished = P.Finished("cancelled", len(request.submit.prompt_ids), len(request.token_ids),
                                                  request.submit.seed or 0, 0.0, 0.0, 0.0)
                    self._release_prompt(request)
                    return
            self._channel.send(MsgType.SCHED_CANCEL, P.pack(P.Cancel(request.txid)), flags=MsgFlag.WAKE)


def connect(instance: str | None = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S, name: str = "",
            window: int = 0) -> Session:
    """Connect to the instance's scheduler (default instance: $LLMOS_INSTANCE or "default").

    Args:
        name: register this connection under a server name (the gateway does, so the
            scheduler believes the tenants it names); plain clients leave it empty.
        window: requests this session may have in flight at the scheduler at once (0: the
            instance's `window`); a larger one costs ring memory (~16 KiB per request).
    Raises:
        KernelUnavailable: no instance runs; the message says how to start one.
        Overloaded: the kernel has no ring space for a channel of that window.
    """
    endpoint = Endpoint.connect(instance, name=name, timeout=timeout)
    try:
        channel = endpoint.open_channel("scheduler", wait=True, timeout=timeout, window=window)
        return Session(endpoint, channel, window)
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
