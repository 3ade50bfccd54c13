"""How a worker of `llmos bench serve` sends one request and what it records: through
libllm, through the HTTP gateway, to the naive server's queue, or to any OpenAI-compatible
server (serve_openai). Runs in the workers (forked by serve_harness), each of which makes
one client and sends with it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmos.bench.instances import WAIT
from llmos.bench.serve_workload import WorkItem, digest


@dataclass(slots=True, frozen=True)
class Record:
    """One request as a worker saw it. Times in seconds; None where not measured.

    queue_s, ttft_s and per_token_s are the server's (Completion.timings, or the naive
    server's clock); e2e_s is the client's, submit to result; stream_* are the client's
    when streaming (first piece, then per token after it), with itl_s the gaps between
    consecutive streamed pieces. A failed request (an external server's refusal, a broken
    stream) has its reason in `error` and no tokens."""

    index: int
    priority: int
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    finish_reason: str
    queue_s: float | None
    ttft_s: float | None
    per_token_s: float | None
    e2e_s: float
    start_s: float  # submit, from the start of the run
    late_s: float  # open loop: how late after its arrival time it was sent
    stream_ttft_s: float | None = None
    stream_per_token_s: float | None = None
    digest: int | None = None  # of the output's token ids (None over HTTP)
    itl_s: tuple[float, ...] = ()
    error: str = ""
    output_tokens_from: str = ""  # external servers: "usage" (the server's count) or "chunks" (ours)


@dataclass(slots=True, frozen=True)
class ClientSpec:
    kind: str  # "libllm", "http", "naive" or "openai" (an external server)
    instance: str = ""
    url: str = ""
    stream: bool = False
    open_loop: bool = False
    model: str = ""  # "openai": the request's "model"
    api_key: str = ""  # "openai": sent as a bearer token when set


class Client(Protocol):
    def send(self, item: WorkItem, late: float = 0.0) -> Record: ...

    def close(self) -> None: ...


def _record(item: WorkItem, output_tokens: int, reason: str, timings: tuple[float | None, float | None, float | None],
            sent: float, end: float, t0: float, late: float, stream: tuple[float | None, float | None] = (None, None),
            token_digest: int | None = None, itl: tuple[float, ...] = ()) -> Record:
    return Record(item.index, item.priority, item.prompt_tokens, item.max_tokens, output_tokens, reason, *timings,
                  end - sent, sent - t0, late, *stream, token_digest, itl)


def stream_timings(sent: float, first: float | None, end: float, tokens: int) -> tuple[float | None, float | None]:
    """(TTFT, time per token after the first) of a streamed request, as the client saw them."""
    if first is None:
        return None, None
    return first - sent, ((end - first) / (tokens - 1) if tokens > 1 else None)


class PieceClock:
    """When each streamed piece arrived: the first one, and the gaps between the others."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []

    def tick(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now


class LibllmClient:
    """A libllm session: `submit().result()` (server timings), or `stream()` timed here too."""

    def __init__(self, spec: ClientSpec, t0: Callable[[], float]) -> None:
        from llmos import libllm

        self.session = libllm.connect(spec.instance, timeout=WAIT)
        self.stream, self.t0 = spec.stream, t0

    def send(self, item: WorkItem, late: float = 0.0) -> Record:
        kwargs: dict[str, Any] = dict(max_tokens=item.max_tokens, temperature=item.temperature, seed=item.seed,
                                      priority=item.priority, timeout=WAIT)
        sent = time.monotonic()
        clock = PieceClock()
        if self.stream:
            request = self.session.stream(item.prompt, **kwargs)
            for _piece in request:
                clock.tick()
            done = request.completion()
        else:
            done = self.session.submit(item.prompt, **kwargs).result()
        end = time.monotonic()
        n = done.usage.completion_tokens
        t = done.timings
        return _record(item, n, done.finish_reason, (t.queue_s, t.ttft_s, t.per_token_s if n > 1 else None), sent,
                       end, self.t0(), late, stream_timings(sent, clock.first, end, n) if self.stream else (None, None),
                       digest(done.token_ids), tuple(clock.gaps))

    def close(self) -> None:
        self.session.close()


class HttpClient:
    """POST /v1/completions on the gateway, with the class in its `priority` extension field.
    Non-streaming answers carry no timings; streaming ones are timed here, and their token
    count is the text's re-encoding (approximate)."""

    def __init__(self, spec: ClientSpec, t0: Callable[[], float]) -> None:
        import httpx

        from llmos.libllm.tokenizer import load_tokenizer
        from llmos.servers.runner.loaders import default_tokenizer_path

        self.client = httpx.Client(base_url=spec.url, timeout=WAIT)
        self.model = self.client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        self.tokenizer = load_tokenizer(default_tokenizer_path())
        self.stream, self.t0 = spec.stream, t0

    def send(self, item: WorkItem, late: float = 0.0) -> Record:
        body = {"model": self.model, "prompt": item.prompt, "max_tokens": item.max_tokens,
                "temperature": item.temperature, "seed": item.seed, "stream": self.stream,
                "priority": item.priority}
        sent = time.monotonic()
        clock = PieceClock()
        if self.stream:
            pieces, reason = [], "length"
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["text"]:
                        clock.tick()
                        pieces.append(choice["text"])
                    reason = choice["finish_reason"] or reason
            end = time.monotonic()
            n = len(self.tokenizer.encode("".join(pieces), bos=False))
            return _record(item, n, reason, (None, None, None), sent, end, self.t0(), late,
                           stream_timings(sent, clock.first, end, n), itl=tuple(clock.gaps))
        reply = self.client.post("/v1/completions", json=body).raise_for_status().json()
        end = time.monotonic()
        return _record(item, reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"],
                       (None, None, None), sent, end, self.t0(), late)

    def close(self) -> None:
        self.client.close()


class NaiveClient:
    """A client of the naive server: its request queue, and this worker's reply queue."""

    def __init__(self, slot: int, requests: Any, reply: Any, t0: Callable[[], float]) -> None:
        self.slot, self.requests, self.reply, self.t0 = slot, requests, reply, t0

    def send(self, item: WorkItem, late: float = 0.0) -> Record:
        sent = time.monotonic()
        self.requests.put((self.slot, item.index, sent))
        made, received, first, finished = self.reply.get(timeout=WAIT)
        end = time.monotonic()
        n = len(made)
        per_token = (finished - first) / (n - 1) if n > 1 else None
        return _record(item, n, "length" if n >= item.max_tokens else "stop", (received - sent, first - sent, per_token),
                       sent, end, self.t0(), late, token_digest=digest(made))

    def close(self) -> None:
        pass


def connect(spec: ClientSpec, t0: Callable[[], float], slot: int,
            naive: tuple[Any, Sequence[Any]] | None = None) -> Client:
    """Worker `slot`'s client of the kind `spec` names; `naive` is the naive server's
    (request queue, one reply queue per worker). `t0()` is the run's start time."""
    if spec.kind == "libllm":
        return LibllmClient(spec, t0)
    if spec.kind == "http":
        return HttpClient(spec, t0)
    if spec.kind == "openai":
        from llmos.bench.serve_openai import OpenAIClient

        return OpenAIClient(spec, t0)
    assert naive is not None
    return NaiveClient(slot, naive[0], naive[1][slot], t0)
