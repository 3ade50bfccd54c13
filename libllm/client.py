"""Sessions: how a client program generates text with llmos.

Runs in the client's process. A session connects to the kernel, opens a channel to the
scheduler and loads the model's tokenizer (from MODEL_INFO), so only token ids cross the
rings. Tokenisation, incremental detokenisation and stop strings live here; a stop
string seen in the text cancels the request. One lock serialises the channel, so a
session may be shared by threads.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec

from libllm import protocol as P
from libllm.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer
from microkernel import instance as I
from microkernel.endpoint import Channel, Endpoint, Message, raise_for_status
from microkernel.errors import InvalidRequest, LlmosError, PeerGone, Timeout, WouldBlock
from microkernel.messages import MsgFlag, MsgType

DEFAULT_CONNECT_TIMEOUT_S = 30.0
PUMP_SLICE_S = 0.05  # a thread waiting for window space holds the session lock this long at most
WAIT_SLICE_S = 1.0  # a parked waiter looks at its deadline (and the kernel) at least this often
FAILOVER_TIMEOUT_S = 120.0  # how long a failover waits for the instance to come back
RECONNECT_PAUSE_S = 0.05


class ServerGone(PeerGone):
    """The scheduler (or the whole instance) went away while a request was open."""


class DeadlineExceeded(Timeout):
    """A request's timeout passed before it finished."""


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True, frozen=True)
class Timings:
    queue_s: float  # scheduler: submit -> first step that included it
    ttft_s: float  # scheduler: submit -> first token
    total_s: float  # scheduler: submit -> finish
    per_token_s: float  # (total - ttft) / (tokens - 1)


@dataclass(slots=True, frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    seed: int
    timings: Timings


@dataclass(slots=True)
class _Pending:
    txid: int
    submit: P.Submit  # as first sent, seed included: what a failover resubmits from
    token_ids: list[int] = field(default_factory=list)
    fresh: deque[int] = field(default_factory=deque)  # received, not yet seen by the caller
    finished: P.Finished | None = None
    error: BaseException | None = None


class Session:
    """A connection to one instance's scheduler. Use `libllm.connect()`."""

    def __init__(self, endpoint: Endpoint, channel: Channel) -> None:
        self.instance = endpoint.instance
        self._pid = os.getpid()
        self._endpoint = endpoint
        self._channel = channel
        # Re-entrant: an abandoned stream's cleanup may run (from the garbage collector)
        # while this very thread holds the lock.
        self._lock = threading.RLock()
        self._requests: dict[int, _Pending] = {}
        self.num_failovers = 0  # reconnections after the scheduler or the instance went away
        info = self._call(MsgType.SCHED_MODEL_INFO, b"", DEFAULT_CONNECT_TIMEOUT_S)
        self.info: P.ModelInfo = P.unpack(info.payload, P.ModelInfo)
        self.tokenizer: Tokenizer = load_tokenizer(self.info.tokenizer_path)
        self.closed = False

    # -- public -------------------------------------------------------------------------

    def model_info(self) -> P.ModelInfo:
        return self.info

    def generate(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, priority: int = 0,
                 timeout: float | None = None) -> Completion:
        """Generate a continuation of `prompt` and return it whole.

        Raises:
            InvalidRequest: a bad parameter (the message names it).  DeadlineExceeded: `timeout`
            passed.  ServerGone: the instance went away.
        """
        return self.submit(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=stop, priority=priority, timeout=timeout).result()

    def submit(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, priority: int = 0,
               timeout: float | None = None, tenant: str = "") -> Request:
        """Start a request and return its handle at once (`result()`, `cancel()`, iterate it).
        Many may be in flight per session; tokens arrive in batches (the client is woken at
        the end), which costs least. Same arguments and errors as `generate`."""
        return self._start(prompt, max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, False,
                           tenant)

    def stream(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, priority: int = 0,
               timeout: float | None = None, tenant: str = "") -> Request:
        """Like `submit`, but tokens are sent (and this process woken) as they are made:
        iterate the result for text pieces; `result()` after for the whole Completion."""
        return self._start(prompt, max_tokens, temperature, top_k, top_p, seed, stop, priority, timeout, True,
                           tenant)

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
        with self._lock:
            scheduler = msgspec.msgpack.decode(self._channel.call(MsgType.SCHED_STATS, b"", timeout).payload)
        memory = self._endpoint.open_channel("memory", timeout=timeout)
        try:
            mem = msgspec.to_builtins(P.unpack(memory.call(MsgType.MEM_STATS, b"", timeout).payload,
                                               P.MemoryStatsReply))
        finally:
            self._endpoint.drop_channel(memory.channel_id)
        return {"kernel": msgspec.to_builtins(self._endpoint.kernel_stats(timeout)), "scheduler": scheduler,
                "memory": mem}

    def _start(self, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
               seed: int | None, stop: list[str] | None, priority: int, timeout: float | None,
               stream: bool, tenant: str = "") -> Request:
        self._check_open()
        self._ensure_process()
        prompt_ids = self._validate(prompt, max_tokens, temperature, top_k, top_p, seed, stop, timeout)
        if seed is None:  # chosen here, so a resubmission after a failover draws the same tokens
            seed = secrets.randbits(63)
        # The scheduler believes `tenant` only from the gateway (for fair share and quotas).
        submit = P.Submit(prompt_ids, max_tokens, float(temperature), top_k, float(top_p), seed, priority,
                          stream, timeout, tenant)
        deadline = None if timeout is None else time.monotonic() + timeout
        payload = P.pack(submit)
        while True:
            with self._lock:
                try:
                    txid = self._channel.request(MsgType.SCHED_SUBMIT, payload, timeout=timeout)
                except WouldBlock:  # the channel's window is full: take replies until a slot frees
                    self._receive_slice(deadline)
                    continue
                pending = _Pending(txid, submit)
                self._requests[txid] = pending
                break
        return Request(self, pending, self.tokenizer.decoder(prompt_ids), list(stop or ()), deadline)

    def _ensure_process(self) -> None:
        """After a fork, the child gets a connection of its own on first use; the parent's
        rings are never touched from the child (dropping the copies closes nothing)."""
        if self._pid == os.getpid():
            return
        endpoint = Endpoint.connect(self.instance, name=self._endpoint.name)
        self._endpoint = endpoint
        self._channel = endpoint.open_channel("scheduler", wait=True)
        self._lock = threading.RLock()
        self._requests = {}
        self._pid = os.getpid()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
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

    def _validate(self, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, stop: list[str] | None, timeout: float | None) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a str, got {type(prompt).__name__}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not 0.0 <= temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {temperature!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise InvalidRequest(f"top_k must be an int >= 0, got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise InvalidRequest(f"seed must be a non-negative int, got {seed!r}")
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise InvalidRequest("stop must be a list of non-empty strings")
        if timeout is not None and timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout!r}")
        ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.info.context_length:
            raise InvalidRequest(f"prompt of {len(ids)} tokens does not fit the context of "
                                 f"{self.info.context_length} tokens")
        return ids

    def _call(self, type_: int, payload: bytes, timeout: float) -> Message:
        with self._lock:
            return self._channel.call(type_, payload, timeout)

    def _pump(self, request: _Pending, deadline: float | None) -> None:
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
        """Route every reply that is already there (lock held)."""
        try:
            while (message := self._channel.try_receive()) is not None:
                self._route(message)
        except PeerGone:
            self._failover()

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
        try:
            self._endpoint.close()
        except LlmosError:
            pass
        deadline = time.monotonic() + FAILOVER_TIMEOUT_S
        while True:
            try:
                endpoint = Endpoint.connect(self.instance, name=self._endpoint.name, timeout=5.0)
            except (LlmosError, OSError):
                endpoint = None
            if endpoint is not None:
                try:
                    self._channel = endpoint.open_channel("scheduler", wait=True,
                                                          timeout=max(1.0, deadline - time.monotonic()))
                    self._endpoint = endpoint
                    break
                except LlmosError:
                    endpoint.close()
            if time.monotonic() > deadline:
                raise ServerGone(f"instance {self.instance!r} did not come back within {FAILOVER_TIMEOUT_S:g} s")
            time.sleep(RECONNECT_PAUSE_S)  # waiting on another process to restart: bounded
        self._requests = {}
        self.num_failovers += 1
        for pending in open_requests:
            first, made = pending.submit, len(pending.token_ids)
            if made >= first.max_tokens:  # its last reply was lost, not its work
                pending.finished = P.Finished("length", len(first.prompt_ids), made, first.seed or 0, 0.0, 0.0, 0.0)
                continue
            again = P.Submit(first.prompt_ids + pending.token_ids, first.max_tokens - made, first.temperature,
                             first.top_k, first.top_p, first.seed, first.priority, first.stream, first.timeout_s,
                             first.tenant)
            pending.txid = self._channel.request(MsgType.SCHED_SUBMIT, P.pack(again))
            self._requests[pending.txid] = pending

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
        elif header.flags & MsgFlag.MORE:
            tokens: P.Tokens = P.unpack(message.payload, P.Tokens)
            request.token_ids.extend(tokens.token_ids)
            request.fresh.extend(tokens.token_ids)
        else:
            request.finished = P.unpack(message.payload, P.Finished)
            self._requests.pop(header.txid, None)

    def _cancel(self, request: _Pending) -> None:
        if request.finished is not None or request.error is not None:
            return
        with self._lock:
            self._channel.send(MsgType.SCHED_CANCEL, P.pack(P.Cancel(request.txid)), flags=MsgFlag.WAKE)


class Request:
    """A request in flight: iterate it for text pieces as they arrive, `result()` for the
    whole Completion, `cancel()` to stop it. Returned by `Session.submit` and `stream`."""

    def __init__(self, session: Session, request: _Pending, decoder: IncrementalDecoder, stop: list[str],
                 deadline: float | None) -> None:
        self._session = session
        self._request = request
        self._decoder = decoder
        self._stop = stop
        self._deadline = deadline
        self._text = ""  # everything decoded so far (cut at a stop string)
        self._emitted = 0  # how much of it the caller has been given
        self._stopped_by_string = False
        self._num_kept = 0

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._pieces()
        finally:
            request = self._request
            if request.finished is None and request.error is None and not self._stopped_by_string:
                self._session._cancel(request)  # the caller stopped early: free its blocks

    def _pieces(self) -> Iterator[str]:
        request = self._request
        while True:
            self._session._pump(request, self._deadline)
            finished = request.finished is not None
            yield from self._ready_pieces(final=finished)
            if finished or self._stopped_by_string:
                return

    def _ready_pieces(self, *, final: bool) -> Iterator[str]:
        """Text for the tokens already received (no waiting); with `final`, also what the
        decoder and the stop-string check still hold."""
        request = self._request
        if request.error is not None:
            raise request.error
        while request.fresh and not self._stopped_by_string:
            piece = self._decoder.push(request.fresh.popleft())
            self._num_kept += 1
            if piece:
                yield from self._emit(piece)
        if final and not self._stopped_by_string:
            tail = self._decoder.flush()
            if tail:
                yield from self._emit(tail)
            if not self._stopped_by_string:
                yield from self._release_held()

    def _emit(self, piece: str) -> Iterator[str]:
        """Pass text on, holding back a tail that could still become a stop string."""
        self._text += piece
        if not self._stop:
            self._emitted = len(self._text)
            yield piece
            return
        search_from = max(0, self._emitted - max(len(s) for s in self._stop))
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            self._stopped_by_string = True
            self._session._cancel(self._request)
            self._text = self._text[:cut]
            safe = cut
        else:
            safe = len(self._text) - _longest_stop_prefix(self._text, self._stop)
        if safe > self._emitted:
            yield self._text[self._emitted : safe]
            self._emitted = safe

    def cancel(self) -> Completion:
        """Stop the request now; returns what was made so far (finish reason "cancelled")."""
        request = self._request
        self._session._cancel(request)
        while request.finished is None and request.error is None:
            self._session._pump(request, self._deadline)
            request.fresh.clear()
        if request.error is not None:
            raise request.error
        return self.completion()

    def _release_held(self) -> Iterator[str]:
        if len(self._text) > self._emitted:
            yield self._text[self._emitted :]
            self._emitted = len(self._text)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and return the whole Completion.

        Raises:
            DeadlineExceeded: not finished within `timeout` seconds (the request goes on).
        """
        own = self._deadline
        if timeout is not None:
            limit = time.monotonic() + timeout
            self._deadline = limit if own is None else min(own, limit)
        try:
            for _ in self._pieces():  # not __iter__: a timeout here must not cancel the request
                pass
        finally:
            self._deadline = own
        return self.completion()

    @property
    def token_ids(self) -> list[int]:
        """The ids received so far."""
        return list(self._request.token_ids)

    @property
    def done(self) -> bool:
        return self._request.finished is not None or self._request.error is not None

    @property
    def finish_reason(self) -> str | None:
        """None until the request has finished."""
        if self._stopped_by_string:
            return "stop"
        finished = self._request.finished
        return finished.finish_reason if finished is not None else None

    def completion(self) -> Completion:
        """The whole result; call after iterating to the end (or use `result()`)."""
        request = self._request
        if self._stopped_by_string:
            # Wait for the cancelled request to finish so its blocks are freed before we return.
            while request.finished is None and request.error is None:
                self._session._pump(request, self._deadline)
                request.fresh.clear()
            if request.error is not None:
                raise request.error
            reason = "stop"
            token_ids = request.token_ids[: self._num_kept]
        else:
            assert request.finished is not None, "iterate the stream to its end first"
            reason = request.finished.finish_reason
            token_ids = list(request.token_ids)
        finished = request.finished
        assert finished is not None
        ttft, total = finished.ttft_s, finished.total_s
        per_token = (total - ttft) / (len(token_ids) - 1) if len(token_ids) > 1 else 0.0
        return Completion(self._text, token_ids, reason, Usage(len(request.submit.prompt_ids), len(token_ids)),
                          finished.seed, Timings(finished.queue_s, ttft, total, per_token))


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def connect(instance: str | None = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S, name: str = "") -> Session:
    """Connect to the instance's scheduler (default instance: $LLMOS_INSTANCE or "default").

    Args:
        name: register this connection under a server name (the gateway does, so the
            scheduler believes the tenants it names); plain clients leave it empty.
    Raises:
        KernelUnavailable: no instance runs; the message says how to start one.
    """
    endpoint = Endpoint.connect(instance, name=name, timeout=timeout)
    try:
        channel = endpoint.open_channel("scheduler", wait=True, timeout=timeout)
        return Session(endpoint, channel)
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
