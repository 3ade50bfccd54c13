"""The scheduler server's requests: who asked for each sequence, and what to send them.

Pure bookkeeping, no I/O: `Requests.deliver` turns the Scheduler's events into `Send`s
(tokens per step for a streaming client, in batches of NON_STREAM_BATCH otherwise, then
the Finished) and the server loop puts them on the clients' rings. It also keeps the
latency histograms of finished requests (SCHED_STATS).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import NamedTuple

from llmos.libllm import protocol as P
from llmos.microkernel.messages import MsgFlag
from llmos.servers.scheduler.events import Event, FinishEvent, PromptLogprobsEvent, TokenEvent

HIST_BUCKETS = 32  # log2 microsecond buckets: up to ~71 minutes
# Tokens of a non-streaming request travel in batches of this many (and the rest at finish):
# its client is not woken for them, and fewer records cost both sides less. They still
# arrive during generation, so a client knows what it has if the scheduler dies.
NON_STREAM_BATCH = 64
# Flags as plain ints: enum arithmetic is measurable per token.
TOKENS_STREAM = int(MsgFlag.REPLY | MsgFlag.MORE | MsgFlag.WAKE)
TOKENS_QUIET = int(MsgFlag.REPLY | MsgFlag.MORE)
FINAL = int(MsgFlag.REPLY | MsgFlag.WAKE)


class Send(NamedTuple):
    """One SCHED_SUBMIT reply record: to the client on `channel_id`, for its submit `txid`."""

    channel_id: int
    txid: int
    flags: int
    payload: bytes


@dataclass(slots=True)
class Request:
    """A client's submit: where its replies go and its timings."""

    channel_id: int
    txid: int
    stream: bool
    seed: int
    submitted: float
    first_step: float = 0.0
    first_token: float = 0.0
    pending: list[int] = field(default_factory=list)  # tokens not yet sent (non-streaming)
    pending_logprobs: list[P.Logprob] = field(default_factory=list)  # theirs, when asked for
    prompt_logprobs: dict[int, P.Logprob] = field(default_factory=dict)  # position -> Logprob, when asked for

    def take_pending(self, flags: int) -> Send:
        """The tokens not yet sent, as one Tokens record; none are pending after."""
        payload = P.pack(P.Tokens(self.pending, self.pending_logprobs))
        self.pending, self.pending_logprobs = [], []
        return Send(self.channel_id, self.txid, flags, payload)


class Requests:
    """The live requests by seq_id and by (channel, txid), and the histograms of finished ones."""

    def __init__(self) -> None:
        self.by_seq: dict[int, Request] = {}
        self.by_txid: dict[tuple[int, int], int] = {}  # (channel, txid) -> seq_id
        # Bucket i counts values in [2**i, 2**(i+1)) microseconds.
        self.ttft_hist = [0] * HIST_BUCKETS
        self.tpot_hist = [0] * HIST_BUCKETS

    def __len__(self) -> int:
        return len(self.by_seq)

    def add(self, seq_id: int, request: Request) -> None:
        self.by_seq[seq_id] = request
        self.by_txid[(request.channel_id, request.txid)] = seq_id

    def seq_of(self, channel_id: int, txid: int) -> int | None:
        """The sequence a client's submit became, while it is live."""
        return self.by_txid.get((channel_id, txid))

    def pop(self, seq_id: int) -> Request | None:
        """Forget a request (it ended, or will get an error instead): nothing more is sent to it."""
        request = self.by_seq.pop(seq_id, None)
        if request is not None:
            self.by_txid.pop((request.channel_id, request.txid), None)
        return request

    def drop_channel(self, channel_id: int) -> list[int]:
        """Forget every request of a client that left; their seq_ids, to cancel."""
        gone = [s for s, r in self.by_seq.items() if r.channel_id == channel_id]
        for seq_id in gone:
            self.pop(seq_id)
        return gone

    def channels(self) -> Iterator[tuple[int, int]]:
        """(seq_id, channel_id) of every live request."""
        return ((s, r.channel_id) for s, r in self.by_seq.items())

    def stepped(self, seq_ids: Iterable[int], now: float) -> None:
        """These sequences are in a step sent now: the first one ends a request's queue time."""
        for seq_id in seq_ids:
            request = self.by_seq.get(seq_id)
            if request is not None and not request.first_step:
                request.first_step = now

    def deliver(self, events: Seq[Event], now: float) -> list[Send]:
        """What to send for these events, in order: new tokens (per step when streaming, in
        batches otherwise), then for a finished request its last tokens and its Finished.
        Events of requests no longer here (cancelled, failed, their client gone) send nothing."""
        sends: list[Send] = []
        if not events:
            return sends
        touched: dict[int, Request] = {}
        for event in events:
            if isinstance(event, TokenEvent):
                request = self.by_seq.get(event.seq_id)
                if request is not None:
                    request.pending.append(event.token_id)
                    if event.logprob is not None:
                        request.pending_logprobs.append(event.logprob)
                    touched[event.seq_id] = request
            elif isinstance(event, PromptLogprobsEvent):
                request = self.by_seq.get(event.seq_id)
                if request is not None:
                    for i, lp in enumerate(event.logprobs):
                        request.prompt_logprobs[event.first_pos + i] = lp
        for request in touched.values():
            if not request.first_token:
                request.first_token = now
            if request.stream:
                sends.append(request.take_pending(TOKENS_STREAM))
            elif len(request.pending) >= NON_STREAM_BATCH:
                sends.append(request.take_pending(TOKENS_QUIET))
        for event in events:
            if isinstance(event, FinishEvent):
                request = self.pop(event.seq_id)
                if request is not None:
                    sends.extend(self._finish(request, event, now))
        return sends

    def _finish(self, request: Request, event: FinishEvent, now: float) -> list[Send]:
        sends = [request.take_pending(TOKENS_QUIET)] if request.pending else []
        finished = P.Finished(
            str(event.reason), event.num_prompt_tokens, event.num_output_tokens, request.seed,
            queue_s=(request.first_step or now) - request.submitted,
            ttft_s=(request.first_token or now) - request.submitted, total_s=now - request.submitted,
            prompt_logprobs=[request.prompt_logprobs[p] for p in sorted(request.prompt_logprobs)])
        _count(self.ttft_hist, finished.ttft_s)
        if event.num_output_tokens > 1:
            _count(self.tpot_hist, (finished.total_s - finished.ttft_s) / (event.num_output_tokens - 1))
        sends.append(Send(request.channel_id, request.txid, FINAL, P.pack(finished)))
        return sends


def _count(hist: list[int], seconds: float) -> None:
    micros = max(1, int(seconds * 1e6))
    hist[min(len(hist) - 1, micros.bit_length() - 1)] += 1
