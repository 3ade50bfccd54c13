"""The requests one connection has open, and what a failover resubmits: pure bookkeeping.

Runs in the client's process, under the connection's lock; no I/O, no clock. The connection
(connection.py) sends and receives; this table files each reply with its request (tokens as
they come, the end, an error) and, after a failover, says what each open request becomes:
the same submit with the tokens it already has appended to its prompt, so (seed, position)
sampling continues the text exactly.
"""

from __future__ import annotations

from collections import deque

import msgspec

from llmos.libllm import protocol as P
from llmos.libllm.request import Pending
from llmos.microkernel.endpoint import Message, raise_for_status
from llmos.microkernel.messages import Header, MsgFlag


class RequestTable:
    """Requests by txid once sent, and resubmissions still waiting for window space."""

    __slots__ = ("_sent", "_unsent")

    def __init__(self) -> None:
        self._sent: dict[int, Pending] = {}
        # Resubmissions a failover could not send yet (the channel's window was full), with
        # their payloads: sent as replies free slots, oldest first.
        self._unsent: deque[tuple[Pending, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._sent) + len(self._unsent)

    def sent(self, pending: Pending) -> None:
        """`pending` went out under `pending.txid`."""
        self._sent[pending.txid] = pending

    def route(self, header: Header, payload: bytes) -> Pending | None:
        """File one reply with its request. Returns the request if this reply ended it (its
        prompt's segment can go back); None for a token record or a reply to no request."""
        request = self._sent.get(header.txid)
        if request is None:
            return None
        if header.status:
            try:
                raise_for_status(Message(header, payload))
            except Exception as exc:  # stored: raised in the caller's thread
                request.error = exc
        elif header.flags & MsgFlag.MORE:
            tokens: P.Tokens = P.unpack(payload, P.Tokens)
            request.token_ids.extend(tokens.token_ids)
            request.logprobs.extend(tokens.logprobs)
            request.fresh.extend(tokens.token_ids)
            return None
        else:
            request.finished = P.unpack(payload, P.Finished)
        del self._sent[header.txid]
        return request

    def take_open(self) -> list[Pending]:
        """Every request not ended, sent or not (a failover's to resubmit); the table is empty after."""
        taken = [r for r in self._sent.values() if r.finished is None and r.error is None]
        taken += [pending for pending, _ in self._unsent]
        self._sent.clear()
        self._unsent.clear()
        return taken

    def fail_open(self, error: BaseException) -> None:
        """The instance did not come back: every open request ends with `error`."""
        for pending in self.take_open():
            pending.error = error

    def wait_for_window(self, pending: Pending, payload: bytes) -> None:
        self._unsent.append((pending, payload))

    def next_unsent(self) -> tuple[Pending, bytes] | None:
        return self._unsent[0] if self._unsent else None

    def unsent_went(self, txid: int) -> None:
        """The oldest unsent resubmission went out under `txid`."""
        pending, _ = self._unsent.popleft()
        pending.txid = txid
        self.sent(pending)

    def cancel_unsent(self, pending: Pending) -> bool:
        """End a resubmission that never went out ("cancelled"); False if it is not waiting."""
        for i, (waiting, _) in enumerate(self._unsent):
            if waiting is pending:
                del self._unsent[i]
                pending.finished = P.Finished("cancelled", len(pending.submit.prompt_ids), len(pending.token_ids),
                                              pending.submit.seed or 0, 0.0, 0.0, 0.0)
                return True
        return False


def resubmission(pending: Pending) -> P.Submit | None:
    """What `pending` is sent as after a failover: its submit with the tokens it has made
    appended to the prompt (counted as made, for the penalties) and that many fewer to make.
    None, and `pending` finished ("length"), when it had made them all (only its last reply
    was lost)."""
    first, made = pending.submit, len(pending.token_ids)
    if made >= first.max_tokens:
        pending.finished = P.Finished("length", len(first.prompt_ids), made, first.seed or 0, 0.0, 0.0, 0.0)
        return None
    return msgspec.structs.replace(first, prompt_ids=first.prompt_ids + pending.token_ids,
                                   max_tokens=first.max_tokens - made, num_resumed_ids=made)
