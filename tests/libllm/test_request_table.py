"""The connection's request table and what a failover resubmits, without any process: each
reply lands with its request, the end of a request is reported once, and a resubmission
continues the text where it stopped (its tokens join the prompt, counted as made)."""

from __future__ import annotations

import pytest

from llmos.libllm import protocol as P
from llmos.libllm.request import Pending
from llmos.libllm.request_table import RequestTable, resubmission
from llmos.microkernel import control as C
from llmos.microkernel.errors import ErrorCode, QuotaExceeded
from llmos.microkernel.messages import Header, MsgFlag, MsgType

SUBMIT = P.Submit([1, 5, 7], max_tokens=6, seed=42)


def reply(txid: int, payload: bytes, flags: int, status: int = 0) -> tuple[Header, bytes]:
    return Header(MsgType.SCHED_SUBMIT, flags=flags, txid=txid, status=status), payload


def tokens(txid: int, ids: list[int]) -> tuple[Header, bytes]:
    return reply(txid, P.pack(P.Tokens(ids)), MsgFlag.REPLY | MsgFlag.MORE)


def finished(txid: int, made: int) -> tuple[Header, bytes]:
    return reply(txid, P.pack(P.Finished("length", 3, made, 42, 0.0, 0.0, 0.0)), MsgFlag.REPLY)


def test_replies_land_with_their_request_and_its_end_is_reported_once() -> None:
    table = RequestTable()
    a, b = Pending(1, SUBMIT), Pending(2, SUBMIT)
    table.sent(a)
    table.sent(b)
    assert table.route(*tokens(1, [9, 9])) is None
    assert table.route(*tokens(2, [4])) is None
    assert (a.token_ids, list(a.fresh), b.token_ids) == ([9, 9], [9, 9], [4])
    assert table.route(*finished(1, 2)) is a and a.finished is not None
    assert table.route(*finished(1, 2)) is None  # a late duplicate: no request any more
    assert table.route(*tokens(7, [1])) is None  # a reply to nobody: dropped
    assert len(table) == 1


def test_an_error_reply_ends_its_request_with_the_servers_error() -> None:
    table = RequestTable()
    pending = Pending(3, SUBMIT)
    table.sent(pending)
    header, _ = reply(3, b"", MsgFlag.REPLY, status=int(ErrorCode.QUOTA_EXCEEDED))
    assert table.route(header, C.pack(C.ErrorReply("over its KV quota"))) is pending
    assert isinstance(pending.error, QuotaExceeded) and "over its KV quota" in str(pending.error)


def test_a_resubmission_continues_where_the_request_stopped() -> None:
    pending = Pending(1, SUBMIT, token_ids=[9, 8])
    again = resubmission(pending)
    assert again is not None
    assert (again.prompt_ids, again.max_tokens, again.num_resumed_ids, again.seed) == ([1, 5, 7, 9, 8], 4, 2, 42)
    done = Pending(2, SUBMIT, token_ids=[1, 2, 3, 4, 5, 6])  # all made: only its last reply was lost
    assert resubmission(done) is None
    assert done.finished is not None and (done.finished.finish_reason, done.finished.num_output_tokens) == ("length", 6)


def test_a_failover_takes_every_open_request_and_sends_them_as_the_window_allows() -> None:
    table = RequestTable()
    open_one, ended = Pending(1, SUBMIT), Pending(2, SUBMIT)
    table.sent(open_one)
    table.sent(ended)
    table.route(*finished(2, 0))
    taken = table.take_open()
    assert taken == [open_one] and len(table) == 0
    table.wait_for_window(open_one, b"payload")
    assert table.next_unsent() == (open_one, b"payload")
    table.unsent_went(11)  # sent under a new txid: its replies find it there
    assert table.next_unsent() is None
    assert table.route(*tokens(11, [3])) is None and open_one.token_ids == [3]


def test_a_resubmission_never_sent_is_cancelled_here_and_a_lost_instance_fails_them_all() -> None:
    table = RequestTable()
    waiting, sent = Pending(1, SUBMIT, token_ids=[4]), Pending(2, SUBMIT)
    table.wait_for_window(waiting, b"x")
    assert table.cancel_unsent(waiting)
    assert waiting.finished is not None and waiting.finished.finish_reason == "cancelled"
    assert not table.cancel_unsent(waiting)
    table.sent(sent)
    gone = RuntimeError("instance gone")
    table.fail_open(gone)
    assert sent.error is gone and len(table) == 0


@pytest.mark.parametrize("made", [0, 5])
def test_resubmission_counts_what_was_made_for_the_penalties(made: int) -> None:
    pending = Pending(1, SUBMIT, token_ids=list(range(10, 10 + made)))
    again = resubmission(pending)
    assert again is not None and again.num_resumed_ids == made and again.max_tokens == SUBMIT.max_tokens - made
