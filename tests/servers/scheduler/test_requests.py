"""The scheduler server's request bookkeeping (requests.py): which records each client gets
for the Scheduler's events. No processes: the records are read back as libllm reads them
(MORE: tokens, else the Finished)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmos.libllm import protocol as P
from llmos.microkernel.messages import MsgFlag
from llmos.servers.scheduler import Event, FinishEvent, FinishReason, TokenEvent
from llmos.servers.scheduler.events import PromptLogprobsEvent
from llmos.servers.scheduler.requests import (
    HIST_BUCKETS,
    NON_STREAM_BATCH,
    Request,
    Requests,
    Send,
)
from tests.servers.scheduler.fakes import alone, make
from tests.servers.scheduler.test_scheduler import MAX_CONTEXT, no_stop_spec

CHANNEL, OTHER = 7, 8


@dataclass
class Received:
    """What one client's reply records add up to, checked as they arrive."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[P.Logprob] = field(default_factory=list)
    finished: P.Finished | None = None
    num_records: int = 0
    num_wakes: int = 0

    def take(self, send: Send) -> None:
        assert self.finished is None, "a record after the Finished"
        assert send.flags & MsgFlag.REPLY
        self.num_records += 1
        self.num_wakes += bool(send.flags & MsgFlag.WAKE)
        if send.flags & MsgFlag.MORE:
            tokens = P.unpack(send.payload, P.Tokens)
            assert tokens.token_ids, "an empty Tokens record"
            self.token_ids += tokens.token_ids
            self.logprobs += tokens.logprobs
        else:
            assert send.flags & MsgFlag.WAKE, "the Finished must wake its client"
            self.finished = P.unpack(send.payload, P.Finished)


def receive(sends: list[Send], into: dict[tuple[int, int], Received]) -> None:
    for send in sends:
        into.setdefault((send.channel_id, send.txid), Received()).take(send)


def tokens(seq_id: int, ids: list[int], first_index: int = 0) -> list[TokenEvent]:
    return [TokenEvent(seq_id, t, first_index + i) for i, t in enumerate(ids)]


def finish(seq_id: int, num_output: int, reason: FinishReason = "length") -> FinishEvent:
    return FinishEvent(seq_id, reason, 3, num_output)


def one_request(*, stream: bool, seed: int = 42) -> Requests:
    requests = Requests()
    requests.add(1, Request(CHANNEL, txid=5, stream=stream, seed=seed, submitted=0.0))
    return requests


def test_a_streaming_client_gets_each_steps_tokens_at_once_then_its_finished() -> None:
    requests = one_request(stream=True)
    lp = P.Logprob(-0.5, [3], [-0.5])
    first = requests.deliver([TokenEvent(1, 3, 0, lp)], now=0.25)
    assert first == [Send(CHANNEL, 5, first[0].flags, first[0].payload)]
    assert first[0].flags & MsgFlag.WAKE and first[0].flags & MsgFlag.MORE
    assert P.unpack(first[0].payload, P.Tokens) == P.Tokens([3], [lp])
    # A multi-token decode step: its tokens in one record.
    got: dict[tuple[int, int], Received] = {}
    receive(first, got)
    receive(requests.deliver(tokens(1, [4, 5], 1), now=0.5), got)
    assert got[(CHANNEL, 5)].num_records == 2 and got[(CHANNEL, 5)].token_ids == [3, 4, 5]
    receive(requests.deliver([finish(1, 3)], now=1.0), got)
    done = got[(CHANNEL, 5)]
    assert done.num_records == 3 and done.num_wakes == 3
    assert done.finished is not None
    assert (done.finished.finish_reason, done.finished.num_output_tokens, done.finished.seed) == ("length", 3, 42)
    assert done.finished.ttft_s == 0.25 and done.finished.total_s == 1.0
    assert requests.seq_of(CHANNEL, 5) is None and len(requests) == 0


def test_a_quiet_client_gets_tokens_in_batches_without_a_wake_and_the_rest_before_its_finished() -> None:
    requests = one_request(stream=False)
    n = 2 * NON_STREAM_BATCH + 3
    sends: list[Send] = []
    for i in range(n):  # one token per step
        now_sent = requests.deliver(tokens(1, [i % 50], i), now=float(i))
        assert len(now_sent) == (1 if (i + 1) % NON_STREAM_BATCH == 0 else 0)
        sends += now_sent
    assert [len(P.unpack(s.payload, P.Tokens).token_ids) for s in sends] == [NON_STREAM_BATCH] * 2
    assert not any(s.flags & MsgFlag.WAKE for s in sends)
    last = requests.deliver([finish(1, n)], now=float(n))
    assert [s.flags & MsgFlag.MORE for s in last] == [MsgFlag.MORE, 0]  # the rest, then the Finished
    got: dict[tuple[int, int], Received] = {}
    receive(sends + last, got)
    assert got[(CHANNEL, 5)].token_ids == [i % 50 for i in range(n)]
    assert got[(CHANNEL, 5)].num_wakes == 1  # woken once, at the end


def test_tokens_of_the_step_that_finishes_a_request_come_before_its_finished() -> None:
    for stream in (True, False):
        requests = one_request(stream=stream)
        sends = requests.deliver([*tokens(1, [9, 8]), finish(1, 2, "stop")], now=2.0)
        assert [bool(s.flags & MsgFlag.MORE) for s in sends] == [True, False]
        assert P.unpack(sends[0].payload, P.Tokens).token_ids == [9, 8]
        assert P.unpack(sends[1].payload, P.Finished).finish_reason == "stop"


def test_each_client_gets_only_its_own_tokens() -> None:
    requests = Requests()
    requests.add(1, Request(CHANNEL, 5, True, 0, 0.0))
    requests.add(2, Request(OTHER, 5, True, 0, 0.0))  # the same txid on another channel
    got: dict[tuple[int, int], Received] = {}
    receive(requests.deliver([*tokens(1, [1]), *tokens(2, [2]), *tokens(1, [3], 1)], now=1.0), got)
    assert got[(CHANNEL, 5)].token_ids == [1, 3] and got[(OTHER, 5)].token_ids == [2]
    assert requests.seq_of(OTHER, 5) == 2


def test_a_request_cancelled_mid_step_gets_its_finished_and_then_nothing_more() -> None:
    sched, _blocks, runner = make(64)
    sched.add(no_stop_spec(5, 20).make(1))
    requests = one_request(stream=True)
    got: dict[tuple[int, int], Received] = {}
    plan = sched.schedule(0.0)
    assert plan is not None
    receive(requests.deliver(sched.postprocess(plan, runner.step(plan)), now=0.1), got)
    assert len(got[(CHANNEL, 5)].token_ids) == 1
    plan = sched.schedule(0.2)
    assert plan is not None and sched.cancel(1)  # in flight: its token is discarded at the reply
    receive(requests.deliver(sched.postprocess(plan, runner.step(plan)) + sched.pop_events(), now=0.3), got)
    done = got[(CHANNEL, 5)]
    assert done.finished is not None and done.finished.finish_reason == "cancelled"
    assert len(done.token_ids) == 1 and done.finished.num_output_tokens == 1
    # Late events for it (a requeued step's, say) reach no one, and a second cancel finds nothing.
    assert requests.deliver([*tokens(1, [5], 1), finish(1, 2)], now=0.4) == []
    assert requests.seq_of(CHANNEL, 5) is None


def test_the_requests_of_a_client_that_left_get_nothing() -> None:
    requests = Requests()
    requests.add(1, Request(CHANNEL, 5, True, 0, 0.0))
    requests.add(2, Request(CHANNEL, 6, False, 0, 0.0))
    requests.add(3, Request(OTHER, 5, True, 0, 0.0))
    assert sorted(requests.drop_channel(CHANNEL)) == [1, 2]  # to cancel
    sends = requests.deliver([*tokens(1, [1]), *tokens(3, [2]), finish(2, 0, "cancelled")], now=1.0)
    assert [s.channel_id for s in sends] == [OTHER]
    assert requests.pop(1) is None and list(requests.channels()) == [(3, OTHER)]


def test_queue_time_ends_at_the_first_step_and_ttft_at_the_first_token() -> None:
    requests = Requests()
    requests.add(1, Request(CHANNEL, 5, False, 0, submitted=10.0))
    requests.stepped([1, 99], now=10.5)  # 99: a sequence with no request (its client left)
    requests.stepped([1], now=11.0)  # a later step changes nothing
    requests.deliver(tokens(1, [4]), now=12.0)
    requests.deliver(tokens(1, [4], 1), now=13.0)
    (final,) = requests.deliver([finish(1, 2)], now=14.0)[1:]
    finished = P.unpack(final.payload, P.Finished)
    assert (finished.queue_s, finished.ttft_s, finished.total_s) == (0.5, 2.0, 4.0)


def test_a_request_that_never_ran_reports_its_whole_wait() -> None:
    requests = one_request(stream=True)
    (final,) = requests.deliver([finish(1, 0, "deadline")], now=3.0)
    finished = P.unpack(final.payload, P.Finished)
    assert (finished.finish_reason, finished.queue_s, finished.ttft_s, finished.total_s) == ("deadline", 3.0, 3.0, 3.0)


def test_prompt_logprobs_arrive_once_each_in_position_order() -> None:
    requests = one_request(stream=False)
    lps = [P.Logprob(-float(i), [i], [-float(i)]) for i in range(1, 5)]
    # Chunked prefill sends them in pieces; a recomputation after a preemption sends some again.
    events: list[Event] = [PromptLogprobsEvent(1, 3, lps[2:]), PromptLogprobsEvent(1, 1, lps[:2]),
                           PromptLogprobsEvent(1, 1, lps[:3]), finish(1, 0)]
    (final,) = requests.deliver(events, now=1.0)
    assert P.unpack(final.payload, P.Finished).prompt_logprobs == lps


def test_the_histograms_count_each_finished_request_in_its_log2_microsecond_bucket() -> None:
    requests = Requests()
    for seq_id in (1, 2):
        requests.add(seq_id, Request(CHANNEL, seq_id, True, 0, submitted=0.0))
    requests.deliver(tokens(1, [1]) + tokens(2, [1]), now=0.001)  # ttft 1000 us: bucket 9
    requests.deliver([finish(2, 1)], now=0.002)  # one token: no time per token
    assert requests.ttft_hist[9] == 1 and sum(requests.ttft_hist) == 1 and sum(requests.tpot_hist) == 0
    requests.deliver([finish(1, 10)], now=0.001 + 9 * 0.002)  # 2000 us per token after the first
    assert requests.ttft_hist[9] == 2 and sum(requests.ttft_hist) == 2
    assert requests.tpot_hist[10] == 1 and sum(requests.tpot_hist) == 1
    requests.add(3, Request(CHANNEL, 3, True, 0, submitted=0.0))
    requests.deliver([finish(3, 0)], now=1e6)  # longer than the last bucket: counted in it
    assert len(requests.ttft_hist) == HIST_BUCKETS and requests.ttft_hist[-1] == 1


def test_driven_by_the_real_scheduler_every_client_receives_exactly_its_output() -> None:
    sched, _blocks, runner = make(64, max_batch_size=4)
    specs = [no_stop_spec(4 + i, 20 + 30 * i, salt=i) for i in range(4)]
    requests = Requests()
    for i, spec in enumerate(specs):
        sched.add(spec.make(i))
        requests.add(i, Request(CHANNEL + i % 2, txid=100 + i, stream=i % 2 == 0, seed=i, submitted=0.0))
    got: dict[tuple[int, int], Received] = {}
    now = 0.0
    while sched.num_unfinished:
        now += 0.01
        plan = sched.schedule(now)
        receive(requests.deliver(sched.pop_events(), now), got)
        assert plan is not None
        requests.stepped(plan.seq_ids, now)
        receive(requests.deliver(sched.postprocess(plan, runner.step(plan)), now), got)
    for i, spec in enumerate(specs):
        mine = got[(CHANNEL + i % 2, 100 + i)]
        expected, reason = alone(spec, MAX_CONTEXT)
        assert mine.token_ids == expected
        assert mine.finished is not None and mine.finished.finish_reason == reason == "length"
        assert mine.finished.num_output_tokens == len(expected) and mine.finished.seed == i
        if i % 2 == 0:  # streaming: a record per step that made a token, each woken
            assert mine.num_wakes == mine.num_records
        else:  # quiet: full batches, then the rest and the Finished
            assert mine.num_records == len(expected) // NON_STREAM_BATCH + 2 and mine.num_wakes == 1
    assert len(requests) == 0 and sum(requests.ttft_hist) == len(specs) == sum(requests.tpot_hist)
