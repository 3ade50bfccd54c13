"""Long prompts in the scheduler: the submits waiting for the memory server's answer, and
the checks on the ids read from the client's segment (no processes: fakes and one arena)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from llmos.libllm import protocol as P
from llmos.microkernel import Arena
from llmos.microkernel.control import ErrorReply, pack
from llmos.microkernel.endpoint import Message
from llmos.microkernel.errors import ErrorCode, InvalidRequest, WouldBlock
from llmos.microkernel.messages import Header, MsgFlag, MsgType
from llmos.servers.scheduler.prompts import PromptFetch, PromptFetches, read_prompt

CONTEXT, VOCAB, SENDER = 512, 512, 7


@dataclass
class FakeInfo:
    client_id: int = SENDER


@dataclass
class FakeChannel:
    channel_id: int
    window: int = 8
    info: FakeInfo = field(default_factory=FakeInfo)
    sent: list[tuple[int, bytes, Any]] = field(default_factory=list)

    def request(self, type: int, payload: bytes, *, on_reply: Any = None, timeout: float | None = None) -> int:
        if len(self.sent) >= self.window:
            raise WouldBlock("window full")
        self.sent.append((type, payload, on_reply))
        return len(self.sent)


REF = P.SegmentRef(3, 1)


def submit(txid: int, n: int = 300, ids: list[int] | None = None) -> Message:
    body = P.Submit(ids or [], prompt_segment=REF, num_prompt_ids=n)
    return Message(Header(MsgType.SCHED_SUBMIT, txid=txid), P.pack(body))


def add(fetches: PromptFetches, client: FakeChannel, message: Message) -> None:
    fetches.add(client, message, P.unpack(message.payload, P.Submit), CONTEXT)  # type: ignore[arg-type]


def reply(payload: bytes, status: int = 0) -> tuple[Header, bytes]:
    return Header(MsgType.MEM_SEGMENT_INFO, flags=MsgFlag.REPLY, status=status), payload


def test_questions_wait_for_window_space_and_answers_reach_waiting_submits_only() -> None:
    fetches, client, memory = PromptFetches(), FakeChannel(1), FakeChannel(99, window=2)
    answered: list[int] = []
    for txid in (1, 2, 3):
        add(fetches, client, submit(txid))
    fetches.ask(memory, lambda fetch, h, p: answered.append(fetch.message.header.txid))  # type: ignore[arg-type]
    assert len(memory.sent) == 2 and fetches.has_unasked  # the third waits for room
    assert fetches.cancel(1, 2) is not None  # cancelled while its question is out
    for _, payload, on_reply in memory.sent:
        assert P.unpack(payload, P.SegmentRef) == P.SegmentRef(3, 1)
        on_reply(*reply(b""))
    assert answered == [1]  # the cancelled one's answer is dropped
    memory.sent.clear()
    fetches.ask(memory, lambda fetch, h, p: answered.append(fetch.message.header.txid))  # type: ignore[arg-type]
    assert len(memory.sent) == 1 and not fetches.has_unasked
    memory.sent[0][2](*reply(b""))
    assert answered == [1, 3] and not fetches.waiting


def test_a_gone_client_is_forgotten_and_a_gone_memory_server_is_asked_again() -> None:
    fetches, memory = PromptFetches(), FakeChannel(99)
    answered: list[PromptFetch] = []
    a, b = FakeChannel(1), FakeChannel(2)
    add(fetches, a, submit(1))
    add(fetches, b, submit(1))
    fetches.ask(memory, lambda fetch, h, p: answered.append(fetch))  # type: ignore[arg-type]
    fetches.drop_channel(1)
    assert list(fetches.waiting) == [(2, 1)]
    memory.sent[0][2](*reply(b""))  # the gone client's answer: dropped
    fetches.ask_again()  # the memory server went: its answers will never come
    new_memory = FakeChannel(100)
    fetches.ask(new_memory, lambda fetch, h, p: answered.append(fetch))  # type: ignore[arg-type]
    assert len(new_memory.sent) == 1
    new_memory.sent[0][2](*reply(b""))
    memory.sent[1][2](*reply(b""))  # should the old one's answer come after all: the first answer wins
    assert [f.channel for f in answered] == [b] and not fetches.waiting


@pytest.mark.parametrize(("message", "field"), [
    (submit(1, ids=[1, 2]), "prompt_ids"),
    (submit(1, n=0), "num_prompt_ids"),
    (submit(1, n=CONTEXT), "num_prompt_ids"),
])
def test_bad_long_prompt_fields_are_refused(message: Message, field: str) -> None:
    fetches = PromptFetches()
    with pytest.raises(InvalidRequest, match=field):
        add(fetches, FakeChannel(1), message)
    assert not fetches.waiting


def fetch_of(n: int) -> PromptFetch:
    message = submit(1, n=n)
    return PromptFetch(FakeChannel(1), message, P.unpack(message.payload, P.Submit))  # type: ignore[arg-type]


def info(offset: int, requested: int, owner: int = SENDER) -> bytes:
    return P.pack(P.SegmentInfo(3, 1, offset, requested, requested, owner))


def test_read_prompt_copies_and_checks_the_ids(arena: Arena) -> None:
    offset = arena.size - 4096
    ids = np.arange(1, 301, dtype=np.int32)
    arena.ndarray(offset, (300,), np.int32)[:] = ids
    got = read_prompt(fetch_of(300), *reply(info(offset, 1200)), arena, VOCAB)
    assert got == ids.tolist()
    arena.ndarray(offset, (300,), np.int32)[:] = 0
    assert got == ids.tolist()  # a copy: the client's later writes change nothing
    bad: list[tuple[tuple[Header, bytes], str]] = [
        (reply(pack(ErrorReply("segment handle (3, 1) is stale or unknown")), ErrorCode.INVALID_REQUEST),
         "prompt_segment (3, 1): segment handle (3, 1) is stale"),
        (reply(info(offset, 1200, owner=SENDER + 1)), "does not belong to the sender"),
        (reply(info(offset, 1196)), "too few"),
    ]
    for (header, payload), match in bad:
        with pytest.raises(InvalidRequest, match=re.escape(match)):
            read_prompt(fetch_of(300), header, payload, arena, VOCAB)
    arena.ndarray(offset, (300,), np.int32)[:] = VOCAB
    with pytest.raises(InvalidRequest, match=r"prompt_segment .* outside the vocabulary"):
        read_prompt(fetch_of(300), *reply(info(offset, 1200)), arena, VOCAB)
    arena.ndarray(offset, (300,), np.int32)[:] = -1
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        read_prompt(fetch_of(300), *reply(info(offset, 1200)), arena, VOCAB)
