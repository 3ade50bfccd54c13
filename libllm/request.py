"""Requests in flight and their results: Request (the handle `Session.submit` returns),
Completion with its Usage and Timings, and the exception for a passed timeout.

Runs in the client's process. A Request turns the token ids its Session routes to it into
text: incremental detokenisation, and stop strings held back until decided (a stop string
seen in the text cancels the request).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from llmos.libllm import protocol as P
from llmos.libllm.tokenizer import IncrementalDecoder
from llmos.microkernel.errors import InvalidRequest, Timeout


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
    logprobs: list[P.Logprob] | None = None  # per token, when asked for (`logprobs=` k)
    prompt_logprobs: list[P.Logprob] | None = None  # prompt tokens 1 ..., when asked for


@dataclass(slots=True)
class Pending:
    txid: int
    submit: P.Submit  # as asked, seed and every prompt id included (even when a segment carries them):
    # what a failover resubmits from
    token_ids: list[int] = field(default_factory=list)
    fresh: deque[int] = field(default_factory=deque)  # received, not yet seen by the caller
    finished: P.Finished | None = None
    error: BaseException | None = None
    segment: P.SegmentRef | None = None  # the segment carrying the prompt (long prompts), until the end
    logprobs: list[P.Logprob] = field(default_factory=list)  # aligned with token_ids, when asked for


class RequestOwner(Protocol):
    """What a Request needs of its connection (libllm/connection.py)."""

    def pump(self, request: Pending, deadline: float | None) -> None:
        """Receive until `request` has news (tokens, its end or an error)."""

    def cancel(self, request: Pending) -> None:
        """Ask the scheduler to stop `request` (its end still comes as a reply)."""


class Request:
    """A request in flight: iterate it for text pieces as they arrive, `result()` for the
    whole Completion, `cancel()` to stop it. Returned by `Session.submit` and `stream`."""

    def __init__(self, owner: RequestOwner, request: Pending, decoder: IncrementalDecoder, stop: list[str],
                 deadline: float | None, canceller: Callable[[Pending], None] | None = None) -> None:
        self._owner = owner
        self._request = request
        self._decoder = decoder
        self._stop = stop
        self._deadline = deadline
        self._text = ""  # everything decoded so far (cut at a stop string)
        self._emitted = 0  # how much of it the caller has been given
        self._stopped_by_string = False
        self._num_kept = 0
        # How a stop string cancels the request: the connection's call, or libllm.aio's (never waits).
        self._canceller: Callable[[Pending], None] = canceller or owner.cancel

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._pieces()
        finally:
            request = self._request
            if request.finished is None and request.error is None and not self._stopped_by_string:
                self._owner.cancel(request)  # the caller stopped early: free its blocks

    def _pieces(self) -> Iterator[str]:
        request = self._request
        while True:
            self._owner.pump(request, self._deadline)
            finished = request.finished is not None
            yield from self.ready_pieces(final=finished)
            if finished or self._stopped_by_string:
                return

    # -- for libllm.aio and the gateway: the request as its connection sees it --------------

    @property
    def pending(self) -> Pending:
        """What the connection files this request's replies in."""
        return self._request

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def stopped_by_string(self) -> bool:
        """A stop string was seen: the text ends before it, the request is being cancelled."""
        return self._stopped_by_string

    def logprobs_from(self, start: int) -> tuple[list[int], list[P.Logprob]] | None:
        """The token ids and Logprobs received from index `start` on (a stream sends each
        once); None when the request did not ask for Logprobs."""
        request = self._request
        if request.submit.num_logprobs < 0:
            return None
        values = request.logprobs[start:]
        return request.token_ids[start : start + len(values)], values

    def ready_pieces(self, *, final: bool) -> Iterator[str]:
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
            self._raise_if_timed_out()

    def _raise_if_timed_out(self) -> None:
        """The scheduler ended the request at its timeout: that is DeadlineExceeded, as when
        the timeout passes here first (one behaviour, however close the race)."""
        finished = self._request.finished
        if finished is not None and finished.finish_reason == "deadline" and not self._stopped_by_string:
            raise DeadlineExceeded(f"request {self._request.txid} did not finish within its timeout "
                                   f"({len(self._request.token_ids)} tokens made)")

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
            self._canceller(self._request)
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
        self._owner.cancel(request)
        while request.finished is None and request.error is None:
            self._owner.pump(request, self._deadline)
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
                self._owner.pump(request, self._deadline)
                request.fresh.clear()
            if request.error is not None:
                raise request.error
            reason = "stop"
            token_ids = request.token_ids[: self._num_kept]
        else:
            if request.finished is None:
                raise InvalidRequest("completion() is for a request that has ended: iterate it to its end first, "
                                     "or call result()")
            self._raise_if_timed_out()
            reason = request.finished.finish_reason
            token_ids = list(request.token_ids)
        finished = request.finished
        assert finished is not None
        ttft, total = finished.ttft_s, finished.total_s
        per_token = (total - ttft) / (len(token_ids) - 1) if len(token_ids) > 1 else 0.0
        submit = request.submit
        logprobs = request.logprobs[: len(token_ids)] if submit.num_logprobs >= 0 else None
        # After a failover the prompt was resubmitted longer: its first tokens are this prompt's.
        prompt_logprobs = finished.prompt_logprobs[: len(submit.prompt_ids) - 1] if submit.prompt_logprobs else None
        return Completion(self._text, token_ids, reason, Usage(len(submit.prompt_ids), len(token_ids)),
                          finished.seed, Timings(finished.queue_s, ttft, total, per_token), logprobs, prompt_logprobs)


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
