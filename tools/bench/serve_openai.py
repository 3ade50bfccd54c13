"""`llmos bench serve --base-url URL`: the seeded workload sent to any OpenAI-compatible
server (an llmos gateway, llama.cpp's llama-server, vLLM, ...) as streaming
`/v1/completions` requests, by the same worker processes as the llmos runs (closed or
open loop). No instance is started and no baseline runs: the figures are the server's as
a client sees them. Runs in the benchmark's process (`run_external`) and in its forked
workers (`OpenAIClient`).

Prompts are the workload's text as it is: story sentences, words any tokenizer splits
into ordinary tokens, their length exact in the shipped model's tokenizer (what the
workload was drawn with) and the same count in any other copy of that model. Decoding
the token ids instead would give back this very text, and ids sent as a prompt would tie
the run to one vocabulary. Output tokens are the server's count (the final usage chunk,
asked for with `stream_options.include_usage`) when it sends one, else the number of
chunks with text: no `ignore_eos` (not standard), so a request may end early at EOS.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from llmos.bench.instances import WAIT
from llmos.bench.serve_clients import ClientSpec, PieceClock, Record, stream_timings
from llmos.bench.serve_harness import Harness
from llmos.bench.serve_workload import WorkItem


class Refused(Exception):
    """The server answered, but not with a completion (the message says what it said)."""


def api_root(base_url: str) -> str:
    """"http://host:port" from what a user may type: with a trailing / or /v1."""
    return base_url.rstrip("/").removesuffix("/v1").rstrip("/")


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _refusal(response: httpx.Response) -> str:
    """The server's own words for an HTTP error: OpenAI's error.message when it uses that shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = ""
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message", "") if isinstance(error, dict) else str(error or body.get("detail") or "")
    return f"HTTP {response.status_code}: {message or response.text[:200] or response.reason_phrase}"


def first_model(url: str, api_key: str = "") -> str:
    """The first model id of GET /v1/models (what to name in requests when --model is not given).

    Raises:
        RuntimeError: the server could not be asked or lists no model (the message says how to go on).
    """
    try:
        response = httpx.get(url + "/v1/models", headers=_headers(api_key), timeout=30.0)
        if response.status_code >= 400:
            raise Refused(_refusal(response))
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, Refused, ValueError, LookupError, TypeError) as exc:
        raise RuntimeError(f"cannot list the models of {url} (GET /v1/models: {_why(exc)}); is an "
                           "OpenAI-compatible server listening there? --model NAME skips this") from None


class OpenAIClient:
    """One worker's keep-alive connection; `send` never raises for what the server does:
    an HTTP error, a broken or cut stream, a timeout make a Record with `error` set."""

    def __init__(self, spec: ClientSpec, t0: Callable[[], float]) -> None:
        self.client = httpx.Client(base_url=spec.url, timeout=WAIT, headers=_headers(spec.api_key))
        self.model, self.t0 = spec.model, t0

    def send(self, item: WorkItem, late: float = 0.0) -> Record:
        body = {"model": self.model, "prompt": item.prompt, "max_tokens": item.max_tokens,
                "temperature": item.temperature, "seed": item.seed, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        clock, stream = PieceClock(), StreamState()
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise Refused(_refusal(response))
                for line in response.iter_lines():
                    if stream.feed(line, clock):
                        break
            if not stream.ended:
                raise Refused("the stream ended before [DONE] or a finish_reason")
        except (httpx.HTTPError, Refused, ValueError, LookupError, TypeError, AttributeError) as exc:
            why = str(exc) if isinstance(exc, Refused) else _why(exc)
            return Record(item.index, item.priority, item.prompt_tokens, item.max_tokens, 0, "error", None, None,
                          None, time.monotonic() - sent, sent - self.t0(), late, error=why)
        end = time.monotonic()
        tokens = stream.usage_tokens if stream.usage_tokens is not None else stream.chunks
        return Record(item.index, item.priority, stream.prompt_tokens or item.prompt_tokens, item.max_tokens, tokens,
                      stream.reason or "stop", None, None, None, end - sent, sent - self.t0(), late,
                      *stream_timings(sent, clock.first, end, tokens), itl_s=tuple(clock.gaps),
                      output_tokens_from="usage" if stream.usage_tokens is not None else "chunks")

    def close(self) -> None:
        self.client.close()


class StreamState:
    """What the server-sent events of one completion said so far."""

    def __init__(self) -> None:
        self.chunks = 0  # chunks that carried text
        self.reason = ""
        self.done = False
        self.usage_tokens: int | None = None
        self.prompt_tokens = 0

    @property
    def ended(self) -> bool:
        return self.done or bool(self.reason)

    def feed(self, line: str, clock: PieceClock) -> bool:
        """Take one line of the event stream; True at [DONE]."""
        if not line.startswith("data:"):
            return False  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return True
        event = json.loads(data)
        if event.get("error"):
            error = event["error"]
            raise Refused(f"error in the stream: {error.get('message', error) if isinstance(error, dict) else error}")
        for choice in event.get("choices") or ():
            if choice.get("text"):
                clock.tick()
                self.chunks += 1
            self.reason = choice.get("finish_reason") or self.reason
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        return False


def errors_by_message(records: Sequence[Record]) -> dict[str, int]:
    """How many requests failed with each message, most frequent first."""
    return dict(Counter(r.error for r in records if r.error).most_common())


def run_external(url: str, model: str, api_key: str, items: Sequence[WorkItem], workers: int, open_loop: bool,
                 progress: Callable[[int], None]) -> tuple[list[Record], float]:
    """The workload through `workers` worker processes against the server at `url`.
    Returns the records in workload order and the run's duration (start to the last
    request's end, failed ones included)."""
    spec = ClientSpec("openai", url=url, stream=True, open_loop=open_loop, model=model, api_key=api_key)
    with Harness(spec, items, workers) as harness:
        harness.ready()
        harness.go()
        records, _cpu = harness.collect(progress)
    return records, max(r.start_s + r.e2e_s for r in records)


def external_report(config: dict[str, Any], workload: dict[str, Any], records: Sequence[Record],
                    duration_s: float) -> dict[str, Any]:
    """The JSON report of a --base-url run: "config", "workload", "summary" (vLLM's
    names), "latency" (as the llmos runs'), "errors" (message: count) and "records"."""
    from llmos.bench.serve_metrics import latency
    from llmos.bench.serve_results import records_table
    from llmos.bench.serve_summary import summarise

    return {"config": config, "workload": workload, "summary": summarise(records, duration_s),
            "latency": latency([r for r in records if not r.error]), "errors": errors_by_message(records),
            "output_tokens_from": dict(Counter(r.output_tokens_from for r in records if not r.error)),
            "records": records_table(records)}
