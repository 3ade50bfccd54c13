"""Long prompts: submits whose ids lie in a segment of the client's, waiting for the
memory server to say where that segment lies.

Runs inside the scheduler. libllm puts a prompt longer than its inline limit into a segment
of its own endpoint as int32 ids and sends the handle in the Submit (docs/design.md: a client
hands a server a handle, never an offset). The scheduler asks the memory server where the
handle lies (MEM_SEGMENT_INFO) instead of reading the segment table in the arena itself:

- the table's layout is the memory server's private format, and no server imports
  another (tests/servers/test_isolation.py): one reader of it, one place to change it;
- the memory server answers from the state it owns, in its one loop, so a handle that was
  freed, reused, or repaired by a restarted memory server is never half-read;
- the round trip costs tens of microseconds, next to the prefill of the hundreds of
  tokens that make a prompt take this path.

Nothing here blocks: the question is a request with a callback. A full window to the
memory server, or a memory server that is restarting, only delays the admission: what
was not asked, or whose answer went with the old channel, is asked (again) later. The
answer's ids are copied out at once and checked (owner, size, vocabulary); the request
then goes the way of an inline one. A client that frees its segment before the request
ends (libllm never does) can only spoil its own prompt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from llmos.libllm import protocol as P
from llmos.microkernel.arena import Arena
from llmos.microkernel.endpoint import Channel, Message, raise_for_status
from llmos.microkernel.errors import InvalidRequest, LlmosError
from llmos.microkernel.messages import Header, MsgType

PROMPT_ID_DTYPE = np.dtype(P.PROMPT_ID_DTYPE)
FIELD = "prompt_segment"


@dataclass(slots=True)
class PromptFetch:
    """A submit whose prompt lies in the sender's segment."""

    channel: Channel
    message: Message
    submit: P.Submit
    asked: bool = False


Answer = Callable[[PromptFetch, Header, bytes], None]


class PromptFetches:
    """The submits waiting for the memory server's answer, keyed by (channel, txid)."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, int], PromptFetch] = {}
        self._unasked: deque[tuple[int, int]] = deque()

    @property
    def has_unasked(self) -> bool:
        return bool(self._unasked)

    def add(self, channel: Channel, message: Message, submit: P.Submit, context_length: int) -> None:
        """Check the submit's long-prompt fields and queue its question.

        Raises:
            InvalidRequest: ids both inline and in a segment, or a count out of range.
        """
        if submit.prompt_ids:
            raise InvalidRequest(f"prompt_ids must be empty when {FIELD} carries the prompt, got "
                                 f"{len(submit.prompt_ids)} ids")
        if not isinstance(submit.num_prompt_ids, int) or not 1 <= submit.num_prompt_ids < context_length:
            raise InvalidRequest(f"num_prompt_ids must be in [1, {context_length}) with {FIELD}, "
                                 f"got {submit.num_prompt_ids!r}")
        key = (channel.channel_id, message.header.txid)
        self.waiting[key] = PromptFetch(channel, message, submit)
        self._unasked.append(key)

    def ask(self, memory: Channel, answer: Answer) -> None:
        """Send the questions not yet sent, as far as the memory channel's window allows;
        `answer` gets each reply whose submit is still waiting."""
        while self._unasked:
            key = self._unasked[0]
            fetch = self.waiting.get(key)
            if fetch is None or fetch.asked:  # cancelled or its client left meanwhile
                self._unasked.popleft()
                continue
            ref = fetch.submit.prompt_segment
            try:
                memory.request(MsgType.MEM_SEGMENT_INFO, P.pack(ref), on_reply=partial(self._answered, key, fetch,
                                                                                        answer))
            except LlmosError:  # WouldBlock: the window is full; PeerGone: the memory server is restarting
                return
            fetch.asked = True
            self._unasked.popleft()

    def _answered(self, key: tuple[int, int], fetch: PromptFetch, answer: Answer, header: Header,
                  payload: bytes) -> None:
        if self.waiting.get(key) is not fetch:
            return
        del self.waiting[key]
        answer(fetch, header, payload)

    def cancel(self, channel_id: int, txid: int) -> PromptFetch | None:
        """Forget a waiting submit; returns it (None when there was none)."""
        return self.waiting.pop((channel_id, txid), None)

    def drop_channel(self, channel_id: int) -> None:
        """A client left: forget its submits (any answer that still comes is dropped)."""
        for key in [k for k in self.waiting if k[0] == channel_id]:
            del self.waiting[key]

    def ask_again(self) -> None:
        """The memory server went: what was asked on its old channel gets no answer, so
        every waiting submit is asked again on the next channel."""
        for fetch in self.waiting.values():
            fetch.asked = False
        self._unasked = deque(self.waiting)


def read_prompt(fetch: PromptFetch, header: Header, payload: bytes, arena: Arena, vocab_size: int) -> list[int]:
    """The ids of a long prompt, copied out of the sender's segment and checked.

    Raises:
        InvalidRequest: the memory server refused the handle (stale, freed, unknown), or
            the segment is someone else's, too small for `num_prompt_ids`, or holds ids
            outside the vocabulary (the message names prompt_segment).
    """
    ref = fetch.submit.prompt_segment
    assert ref is not None
    name = f"{FIELD} ({ref.segment_id}, {ref.generation})"
    if header.status:
        try:
            raise_for_status(Message(header, payload))
        except LlmosError as exc:
            raise InvalidRequest(f"{name}: {exc}") from None
    info: P.SegmentInfo = P.unpack(payload, P.SegmentInfo)
    sender = fetch.channel.info.client_id
    if info.owner_id != sender:
        raise InvalidRequest(f"{name} does not belong to the sender (endpoint {sender})")
    count = fetch.submit.num_prompt_ids
    if info.requested < count * PROMPT_ID_DTYPE.itemsize:
        raise InvalidRequest(f"{name} holds {info.requested} bytes, too few for num_prompt_ids={count} "
                             f"int32 ids")
    ids = arena.ndarray(info.offset, (count,), PROMPT_ID_DTYPE).copy()  # the client's memory: copied at once
    if count and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InvalidRequest(f"{name} holds token ids outside the vocabulary [0, {vocab_size})")
    prompt: list[int] = ids.tolist()
    return prompt
