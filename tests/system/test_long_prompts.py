"""Prompts longer than libllm's inline limit travel as a segment handle in the submit:
the text is exactly the model's own, the segment is freed when the request ends, forged or
stale handles get an error naming the field (and the scheduler goes on serving), and a
scheduler killed mid-request changes nothing, shared tensors included."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.libllm import protocol as P
from llmos.libllm.memory import INLINE_PROMPT_TOKENS
from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from llmos.microkernel.endpoint import Channel, Endpoint
from llmos.microkernel.messages import MsgFlag, MsgType
from llmos.servers.runner.loaders import default_tokenizer_path
from llmos.servers.runner.model import Model, generate
from llmos.servers.runner.sampling import SamplingParams
from tests.system.cli import Cli, running_instance
from tests.system.segments import Memory, used, wait_for_used

pytestmark = pytest.mark.slow
WAIT = 60.0
CONFIG = """
rings = "8M"
restart_backoff_s = 0.1
heartbeat_timeout_s = 5.0
[memory]
pages = "4M"
segments = "1M"
""" + servers_toml(1)
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high. ")
LONG = STORY * 5  # ~300 tokens: past the inline limit, well inside the 512-token context
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "long") as name:
        yield name


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_tokenizer_path())


@pytest.fixture(scope="module")
def expected(tokenizer: Tokenizer) -> str:
    """The greedy text of LONG computed by the model in this process, alone."""
    ids = tokenizer.encode(LONG)
    assert INLINE_PROMPT_TOKENS < len(ids) < 512 - MAX_TOKENS
    out = generate(Model.load(), ids, MAX_TOKENS, SamplingParams(), stop_ids=tokenizer.stop_ids)
    text: str = tokenizer.decoder(ids).push_many(out)
    return text


@pytest.fixture(scope="module")
def memory(instance: str) -> Iterator[Memory]:
    with Endpoint.connect(instance) as endpoint:
        yield Memory(endpoint)


def test_a_long_prompt_gives_the_models_own_text_and_its_segment_is_freed(instance: str, memory: Memory,
                                                                          tokenizer: Tokenizer,
                                                                          expected: str) -> None:
    before = used(memory)
    with libllm.connect(instance) as session:
        request = session.submit(LONG, max_tokens=MAX_TOKENS)
        num_ids = len(tokenizer.encode(LONG))
        assert used(memory) >= before + 4 * num_ids  # the prompt went in a segment; nothing routed its end yet
        done = request.result(timeout=WAIT)
        assert done.text.rstrip("\ufffd") == expected.rstrip("\ufffd")
        assert done.usage.prompt_tokens == num_ids
        assert used(memory) == before  # freed when the request ended
        streamed = "".join(session.stream(LONG, max_tokens=MAX_TOKENS, timeout=WAIT))
        assert streamed.rstrip("\ufffd") == expected.rstrip("\ufffd")
        assert session.generate("Zoo", max_tokens=5).usage.completion_tokens == 5  # short ones stay inline
        assert used(memory) == before


def test_cancelling_a_long_prompt_frees_its_segment(instance: str, memory: Memory, expected: str) -> None:
    before = used(memory)
    with libllm.connect(instance) as session:
        stream = session.stream(LONG, max_tokens=MAX_TOKENS)
        first = next(iter(stream))
        done = stream.cancel()
        assert done.finish_reason in ("cancelled", "length")  # it may have finished meanwhile
        assert expected.startswith(first)
        assert used(memory) == before
        many = [session.submit(LONG, max_tokens=3) for _ in range(10)]  # more than the window
        assert all(r.result(timeout=WAIT).usage.completion_tokens == 3 for r in many)
    assert used(memory) == before


def submit_raw(channel: Channel, submit: P.Submit) -> tuple[list[int], P.Finished]:
    """Send a Submit on a raw channel and read its replies to the end (raises the error reply)."""
    from llmos.microkernel.endpoint import raise_for_status

    txid = channel.request(MsgType.SCHED_SUBMIT, P.pack(submit))
    tokens: list[int] = []
    while True:
        message = channel.receive(WAIT)
        assert message.header.txid == txid
        channel.complete(message)
        raise_for_status(message)
        if message.header.flags & MsgFlag.MORE:
            tokens += P.unpack(message.payload, P.Tokens).token_ids
        else:
            finished: P.Finished = P.unpack(message.payload, P.Finished)
            return tokens, finished


def alloc_ids(endpoint: Endpoint, memory: Memory, ids: list[int], size: int | None = None) -> P.SegmentRef:
    nbytes = 4 * len(ids) if size is None else size
    segment: P.Segment = P.unpack(memory.call(MsgType.MEM_ALLOC_SEGMENT, P.pack(P.AllocSegment(nbytes)),
                                              timeout=WAIT).payload, P.Segment)
    endpoint.arena.ndarray(segment.offset, (len(ids),), np.int32)[:] = ids
    return P.SegmentRef(segment.segment_id, segment.generation)


def test_forged_and_stale_handles_are_refused_naming_the_field(instance: str, memory: Memory,
                                                               tokenizer: Tokenizer, expected: str) -> None:
    ids = tokenizer.encode(LONG)
    before = used(memory)
    with Endpoint.connect(instance) as mine, Endpoint.connect(instance) as other:
        scheduler = mine.open_channel("scheduler", wait=True, timeout=WAIT)
        my_memory = mine.open_channel("memory", wait=True, timeout=WAIT)
        other_memory = other.open_channel("memory", wait=True, timeout=WAIT)

        def refused(submit: P.Submit, *match: str) -> None:
            with pytest.raises(libllm.InvalidRequest) as caught:
                submit_raw(scheduler, submit)
            for text in match:
                assert text in str(caught.value), str(caught.value)

        def long(ref: P.SegmentRef, n: int = len(ids), **kwargs: object) -> P.Submit:
            return P.Submit([], max_tokens=MAX_TOKENS, prompt_segment=ref, num_prompt_ids=n, **kwargs)  # type: ignore[arg-type]

        refused(long(P.SegmentRef(10**6, 1)), "prompt_segment")
        refused(long(P.SegmentRef(-1, 0)), "prompt_segment")
        stale = alloc_ids(mine, my_memory, ids)
        my_memory.call(MsgType.MEM_FREE_SEGMENT, P.pack(stale), timeout=WAIT)
        refused(long(stale), "prompt_segment", "stale")
        theirs = alloc_ids(other, other_memory, ids)
        refused(long(theirs), "prompt_segment", "does not belong")
        small = alloc_ids(mine, my_memory, ids[:16])
        refused(long(small), "prompt_segment", "too few")
        outside = alloc_ids(mine, my_memory, [10**6] * len(ids))
        refused(long(outside), "prompt_segment", "vocabulary")
        good = alloc_ids(mine, my_memory, ids)
        refused(P.Submit(ids[:3], prompt_segment=good, num_prompt_ids=len(ids)), "prompt_ids")
        refused(long(good, 0), "num_prompt_ids")
        refused(long(good, 600), "num_prompt_ids")
        tokens, finished = submit_raw(scheduler, long(good, seed=1))  # and it goes on serving
        assert finished.num_prompt_tokens == len(ids) and finished.num_output_tokens == len(tokens)
        assert tokenizer.decoder(ids).push_many(tokens).rstrip("\ufffd") == expected.rstrip("\ufffd")
    wait_for_used(memory, before, "PEER_GONE to free the raw endpoints' segments")
    with libllm.connect(instance) as session:
        assert session.generate(LONG, max_tokens=MAX_TOKENS).text.rstrip("\ufffd") == expected.rstrip("\ufffd")


def test_a_cancel_or_a_memory_restart_while_the_scheduler_asks_where_the_prompt_lies(
        instance: str, memory: Memory, tokenizer: Tokenizer, expected: str) -> None:
    """With the memory server stopped, the scheduler's question about a long prompt stays
    unanswered: a cancel then ends the request at once, and a killed (restarted) memory
    server is asked again, and the request goes on to the model's text."""
    ids = tokenizer.encode(LONG)
    cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
    before = used(memory)
    with Endpoint.connect(instance) as endpoint:
        scheduler = endpoint.open_channel("scheduler", wait=True, timeout=WAIT)
        own_memory = endpoint.open_channel("memory", wait=True, timeout=WAIT)
        ref = alloc_ids(endpoint, own_memory, ids)
        submit = P.Submit([], max_tokens=MAX_TOKENS, seed=1, prompt_segment=ref, num_prompt_ids=len(ids))
        pid = cli.pids(instance)["memory"]
        os.kill(pid, signal.SIGSTOP)
        try:
            txid = scheduler.request(MsgType.SCHED_SUBMIT, P.pack(submit))
            scheduler.send(MsgType.SCHED_CANCEL, P.pack(P.Cancel(txid)), flags=MsgFlag.WAKE)
            reply = scheduler.receive(WAIT)  # answered without the memory server
            scheduler.complete(reply)
            cancelled: P.Finished = P.unpack(reply.payload, P.Finished)
            assert (reply.header.txid, cancelled.finish_reason, cancelled.num_output_tokens) == (txid, "cancelled", 0)
            txid = scheduler.request(MsgType.SCHED_SUBMIT, P.pack(submit))
        finally:
            os.kill(pid, signal.SIGKILL)  # the question it holds dies with it
            os.kill(pid, signal.SIGCONT)
        tokens: list[int] = []
        while True:  # the restarted memory server rebuilt its tables (the segment is still ours) and answers
            message = scheduler.receive(WAIT)
            assert message.header.txid == txid and message.header.status == 0, message
            scheduler.complete(message)
            if not message.header.flags & MsgFlag.MORE:
                break
            tokens += P.unpack(message.payload, P.Tokens).token_ids
        assert tokenizer.decoder(ids).push_many(tokens).rstrip("\ufffd") == expected.rstrip("\ufffd")
        # Freed by hand: the restarted memory server never had a channel with this endpoint,
        # so only its periodic sweep would notice the endpoint's end.
        endpoint.drop_channel(own_memory.channel_id)
        own_memory = endpoint.open_channel("memory", wait=True, timeout=WAIT)
        own_memory.call(MsgType.MEM_FREE_SEGMENT, P.pack(ref), timeout=WAIT)
    assert used(memory) == before


def test_a_killed_scheduler_changes_no_text_and_keeps_the_shared_tensors(instance: str, memory: Memory,
                                                                         expected: str) -> None:
    cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
    pids = cli.pids(instance)
    before = used(memory)
    with libllm.connect(instance) as session:
        tensor = session.alloc(256, np.float32)
        tensor.array[:] = np.arange(256)
        # With the runner stopped nothing is computed, so the kill surely lands mid-request.
        os.kill(pids["runner.0"], signal.SIGSTOP)
        try:
            stream = session.stream(LONG, max_tokens=MAX_TOKENS, timeout=WAIT)
            os.kill(pids["scheduler"], signal.SIGKILL)
        finally:
            os.kill(pids["runner.0"], signal.SIGCONT)
        text = "".join(stream)
        assert text.rstrip("\ufffd") == expected.rstrip("\ufffd")
        assert session.num_failovers >= 1
        np.testing.assert_array_equal(tensor.array, np.arange(256, dtype=np.float32))  # same connection: still ours
        with libllm.connect(instance) as other:
            assert other.attach(tensor.handle, (256,), np.float32).array[255] == 255.0
        assert used(memory) == before + 1024  # the old prompt's segment and the new one's are both freed
        tensor.free()
    assert used(memory) == before
