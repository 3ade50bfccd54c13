"""A request's whole trip, client -> scheduler -> runner -> client, through real processes
(`llmos up` with the memory server, two runners and the scheduler) on the built-in model.
Texts are compared with the model computed in this process, alone."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.libllm import protocol as P
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.messages import MsgType
from llmos.servers.runner.model import Model, generate
from llmos.servers.runner.sampling import SamplingParams
from tests.microkernel.procs import wait_until
from tests.system.cli import all_blocks_free, running_instance, scheduler_stats

pytestmark = pytest.mark.slow
WAIT = 120.0
ONCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the\n"
        "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.").replace("\n", " ")
ZOO = "Zoo was a little girl named Lily. She loved to play outside in the park."
CONFIG = """
rings = "16M"
[memory]
pages = "8M"
segments = "1M"
""" + servers_toml(2)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "e2e") as name:
        yield name


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load()


def test_greedy_texts_equal_the_models_own(instance: str) -> None:
    with libllm.connect(instance) as session:
        info = session.model_info()
        assert Path(info.model_path).name == "stories260K.bin"
        once = session.generate("", max_tokens=200)
        assert once.text.startswith(ONCE)
        zoo = session.generate("Zoo", max_tokens=40)
        assert ("Zoo" + zoo.text).startswith(ZOO)
        assert zoo.finish_reason == "length" and zoo.usage.completion_tokens == 40
        assert zoo.timings.ttft_s >= zoo.timings.queue_s >= 0


def _prompts() -> list[tuple[str, int, SamplingParams]]:
    rng = random.Random(7)
    words = ["the", "cat", "dog", "park", "ball", "sun", "happy", "sad", "big", "little", "tree", "bird", "mom", "said", "played", "ran"]
    cases = []
    for i in range(32):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30))).capitalize()
        sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.9, seed=1000 + i)
        cases.append((prompt, rng.randint(1, 120), sampling))
    return cases


def test_32_concurrent_clients_each_get_the_text_they_get_alone(instance: str, model: Model) -> None:
    cases = _prompts()
    tokenizer = libllm.connect(instance)
    tok = tokenizer.tokenizer
    tokenizer.close()
    expected = []
    for prompt, max_tokens, sampling in cases:
        ids = tok.encode(prompt)
        out = generate(model, ids, max_tokens, sampling, stop_ids=tok.stop_ids)
        expected.append(tok.decoder(ids).push_many(out))
    start = threading.Barrier(len(cases))

    def client(case: tuple[str, int, SamplingParams]) -> str:
        prompt, max_tokens, sampling = case
        with libllm.connect(instance) as session:
            start.wait(WAIT)
            return session.generate(prompt, max_tokens=max_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p, seed=sampling.seed, timeout=WAIT).text

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(client, cases))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.rstrip("\ufffd") == e.rstrip("\ufffd"), f"client {i}"
    wait_until(lambda: all_blocks_free(instance), "every KV block to be free again")


def test_stream_pieces_join_to_the_text_and_cancel_frees_blocks(instance: str) -> None:
    with libllm.connect(instance) as session:
        whole = session.generate("Zoo", max_tokens=30).text
        assert "".join(session.stream("Zoo", max_tokens=30)) == whole
        pieces = session.stream("Once upon a time", max_tokens=300)
        it = iter(pieces)
        first = [next(it) for _ in range(3)]
        done = pieces.cancel()
        assert done.finish_reason == "cancelled"
        assert done.text.startswith("".join(first))
        assert done.usage.completion_tokens < 300
    wait_until(lambda: all_blocks_free(instance), "the cancelled request's blocks to be free")


def test_stop_strings_end_the_text_before_the_stop(instance: str) -> None:
    with libllm.connect(instance) as session:
        out = session.generate("Zoo", max_tokens=60, stop=["Lily"])
        assert out.text == " was a little girl named "
        assert out.finish_reason == "stop"
        assert "".join(session.stream("Zoo", max_tokens=60, stop=["Lily"])) == out.text
    wait_until(lambda: all_blocks_free(instance), "the stopped request's blocks to be free")


def test_a_client_that_never_reads_does_not_stall_one_that_does(instance: str) -> None:
    with libllm.connect(instance) as idle, libllm.connect(instance) as busy:
        # Requests whose replies nobody reads: their channel fills, and only they pause.
        for _ in range(4):
            idle.stream("Once upon a time", max_tokens=400)
        for _ in range(3):
            assert busy.generate("Zoo", max_tokens=40, timeout=WAIT).text.startswith(" was a little girl")
    wait_until(lambda: all_blocks_free(instance), "the departed client's blocks to be free")


def test_bad_requests_are_refused_with_the_field_named(instance: str) -> None:
    with libllm.connect(instance) as session:
        for kwargs, field in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
                              ({"top_p": 0.0}, "top_p"), ({"seed": -5}, "seed"), ({"stop": "x"}, "stop"),
                              ({"max_tokens": 10**30}, "max_tokens"), ({"top_k": 10**30}, "top_k"),
                              ({"priority": 10**30}, "priority"), ({"temperature": "hot"}, "temperature"),
                              ({"temperature": None}, "temperature"), ({"timeout": -1}, "timeout")]:
            with pytest.raises(libllm.InvalidRequest, match=field):
                session.generate("Zoo", **kwargs)
            with pytest.raises(libllm.InvalidRequest, match=field):
                session.submit_n("Zoo", 2, **kwargs)
        with pytest.raises(libllm.InvalidRequest, match="context"):
            session.generate("word " * 600)
        with pytest.raises(libllm.InvalidRequest, match="not valid Unicode"):
            session.generate("Zoo \ud800 zoo")
        assert session.generate("Zoo", max_tokens=3).usage.completion_tokens == 3


def test_a_timeout_that_passes_is_deadline_exceeded_however_short(instance: str) -> None:
    """One behaviour whether the timeout passes here first or at the scheduler first: the
    request ends and DeadlineExceeded is raised (never a Completion cut short)."""
    with libllm.connect(instance) as session:
        for timeout in (1e-9, 1e-4, 0.001):  # 400 tokens take longer than any of these
            with pytest.raises(libllm.DeadlineExceeded):
                session.generate("Zoo", max_tokens=400, timeout=timeout)
            with pytest.raises(libllm.DeadlineExceeded):
                list(session.stream("Zoo", max_tokens=400, timeout=timeout))
        # The scheduler ends it first (its end waits in the ring before we look): the same.
        with libllm.connect(instance) as watcher:
            finished = watcher.stats()["scheduler"]["num_finished"]
            late = session.submit("Zoo", max_tokens=400, timeout=0.001)
            wait_until(lambda: watcher.stats()["scheduler"]["num_finished"] > finished, "the scheduler to end it")
        with pytest.raises(libllm.DeadlineExceeded):
            late.result()
        assert session.generate("Zoo", max_tokens=5, timeout=WAIT).finish_reason == "length"
    wait_until(lambda: all_blocks_free(instance), "the timed-out requests' blocks to be free")


def test_token_id_prompts_equal_their_texts(instance: str) -> None:
    with libllm.connect(instance) as session:
        ids = session.tokenizer.encode("Zoo")
        whole = session.generate("Zoo", max_tokens=30)
        again = session.generate(ids, max_tokens=30)
        assert (again.text, again.token_ids, again.usage) == (whole.text, whole.token_ids, whole.usage)
        assert session.generate(tuple(ids), max_tokens=30).text == whole.text
        assert "".join(session.stream(ids, max_tokens=30)) == whole.text
        assert [c.text for c in session.generate_n(ids, 2, max_tokens=30)] == [whole.text] * 2  # greedy
        assert session.submit(ids, max_tokens=30, stop=["Lily"]).result().text == " was a little girl named "
        vocab = session.model_info().vocab_size
        for bad, words in [([], "at least one"), ([1, vocab], r"prompt\[1\]"), ([-1], r"prompt\[0\]"),
                           ([1, True], r"prompt\[1\]"), ([1.0], "token id"), (b"Zoo", "str or a list"),
                           ([1] * 600, "context")]:
            with pytest.raises(libllm.InvalidRequest, match=words):
                session.generate(bad, max_tokens=3)  # type: ignore[arg-type]


def test_chat_without_a_template_is_role_lines(instance: str) -> None:
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A dog"}]
    with libllm.connect(instance) as session:
        assert session.tokenizer.chat_template is None  # the built-in model has none
        lines = "System: Tell stories.\nUser: A dog\nAssistant:"
        assert session.chat_ids(messages) == session.tokenizer.encode(lines)
        replied, expected = session.chat(messages, max_tokens=20), session.generate(lines, max_tokens=20)
        assert (replied.text, replied.usage) == (expected.text, expected.usage)
        with pytest.raises(libllm.InvalidRequest, match="role"):
            session.chat([{"content": "A dog"}])


def test_without_an_instance_connect_says_how_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(libllm.KernelUnavailable, match="llmos up"):
        libllm.connect("nowhere")


def test_model_info_and_stats_through_the_scheduler(instance: str) -> None:
    with Endpoint.connect(instance) as ep:
        info = P.unpack(ep.open_channel("scheduler").call(MsgType.SCHED_MODEL_INFO).payload, P.ModelInfo)
    assert info.context_length == 512
    stats = scheduler_stats(instance)
    assert stats["num_generated_tokens"] > 0 and stats["num_steps"] > 0


def test_more_requests_than_the_window_in_one_session(instance: str) -> None:
    with libllm.connect(instance) as session:
        streams = [session.stream("Zoo", max_tokens=20 + i) for i in range(12)]  # the window is 7
        texts = ["".join(s) for s in streams]
    assert all(t.startswith(" was a little girl") for t in texts)
    wait_until(lambda: all_blocks_free(instance), "every request's blocks to be free")


def test_leaving_a_stream_early_cancels_it(instance: str) -> None:
    with libllm.connect(instance) as session:
        for piece in session.stream("Once upon a time", max_tokens=400):
            if piece.strip():
                break
        wait_until(lambda: all_blocks_free(instance), "the abandoned request to be cancelled")
        assert session.generate("Zoo", max_tokens=5).usage.completion_tokens == 5


def test_threads_share_one_session(instance: str) -> None:
    with libllm.connect(instance) as session:
        def one(seed: int) -> str:
            return session.generate("Zoo", max_tokens=30, temperature=0.8, seed=seed).text

        expected = [one(seed) for seed in range(16)]
        assert len(set(expected)) > 1  # each thread has a text of its own to get
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(one, range(16)))
    assert texts == expected


_inherited: libllm.Session | None = None  # a parent's session, used by forked pool workers


def _connect_and_generate(instance: str, seed: int) -> str:
    with libllm.connect(instance) as session:
        return session.generate("Zoo", max_tokens=12, temperature=0.8, seed=seed).text


def _generate_on_inherited(seed: int) -> str:
    assert _inherited is not None
    return _inherited.generate("Zoo", max_tokens=12, temperature=0.8, seed=seed).text


def test_worker_pools_fork_and_spawn(instance: str) -> None:
    global _inherited
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    seeds = list(range(4))
    with libllm.connect(instance) as session:
        expected = [session.generate("Zoo", max_tokens=12, temperature=0.8, seed=s).text for s in seeds]
        for method in ("fork", "spawn"):
            with mp.get_context(method).Pool(2) as pool:
                assert pool.starmap(_connect_and_generate, [(instance, s) for s in seeds]) == expected, method
        _inherited = session  # forked workers use the parent's session: each connects on first use
        try:
            with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as executor:
                assert list(executor.map(_generate_on_inherited, seeds)) == expected
        finally:
            _inherited = None
        assert session.generate("Zoo", max_tokens=12, temperature=0.8, seed=0).text == expected[0]


def test_submit_returns_handles_that_finish_in_any_order(instance: str) -> None:
    with libllm.connect(instance) as session:
        handles = [session.submit("Zoo", max_tokens=10 + 5 * i) for i in range(5)]
        for i, handle in reversed(list(enumerate(handles))):
            done = handle.result(timeout=WAIT)
            assert done.usage.completion_tokens == 10 + 5 * i == len(handle.token_ids)
            assert handle.done and handle.finish_reason == "length"
            assert done.timings.total_s >= done.timings.ttft_s >= done.timings.queue_s >= 0
        slow = session.submit("Once upon a time", max_tokens=300)
        with pytest.raises(libllm.DeadlineExceeded):
            slow.result(timeout=0.000001)
        assert slow.result(timeout=WAIT).usage.completion_tokens > 0  # it went on


def test_n_completions_compute_the_prompt_once_and_equal_single_requests(instance: str) -> None:
    with libllm.connect(instance) as session:
        prompt_ids = session.tokenizer.encode(ONCE)
        block = session.model_info().block_tokens
        full = (len(prompt_ids) - 1) // block * block  # positions in full blocks, the last token apart
        before = scheduler_stats(instance)
        many = session.generate_n(ONCE, 4, max_tokens=20, temperature=0.8, seed=11, timeout=WAIT)
        after = scheduler_stats(instance)
        singles = [session.generate(ONCE, max_tokens=20, temperature=0.8, seed=11 + i, timeout=WAIT)
                   for i in range(4)]
        with pytest.raises(libllm.InvalidRequest, match="n must"):
            session.submit_n(ONCE, 0)
        with pytest.raises(libllm.InvalidRequest, match="seed"):  # refused whole: none of the three starts
            session.submit_n(ONCE, 3, seed=2**64 - 2)
    assert [c.text for c in many] == [c.text for c in singles]
    assert len({c.text for c in many}) > 1 and [c.seed for c in many] == [11, 12, 13, 14]
    assert after["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"] >= 3 * full
    # The prompt's full blocks were computed at most once (not at all when an earlier test left them).
    assert after["num_prompt_tokens"] - before["num_prompt_tokens"] <= len(prompt_ids) + 3 * block
    wait_until(lambda: all_blocks_free(instance), "every block of the n requests back")


def test_stats_and_instances(instance: str) -> None:
    assert instance in libllm.instances()
    with libllm.connect(instance) as session:
        session.generate("Zoo", max_tokens=5)
        stats = session.stats()
    assert stats["scheduler"]["num_generated_tokens"] >= 5
    assert sum(stats["scheduler"]["ttft_us_log2_hist"]) >= 1  # TTFT histogram
    assert stats["scheduler"]["delay_p99_steps"] >= 0  # T_s in steps
    assert stats["memory"]["num_blocks"] > 0
    rings = stats["kernel"]["rings"]
    assert rings and all(r["seq_gaps"] == 0 for r in rings)  # L_r = 0
    assert any(r["latency_count"] > 0 for r in rings)  # L_s measured


def test_a_forked_child_makes_its_own_connection(instance: str) -> None:
    import os

    with libllm.connect(instance) as session:
        expected = session.generate("Zoo", max_tokens=12).text
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only os._exit from here
            code = 1
            try:
                os.close(read_fd)
                os.write(write_fd, session.generate("Zoo", max_tokens=12).text.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as child:
            got = child.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert got == expected
        assert session.generate("Zoo", max_tokens=12).text == expected  # the parent's still works


def test_asyncio_generate_and_stream_run_concurrently(instance: str) -> None:
    import asyncio

    from llmos.libllm import aio

    conversation = [{"role": "user", "content": "Zoo"}]
    with libllm.connect(instance) as sync:  # never a blocking call on the event loop's session
        chat_reply = sync.chat(conversation, max_tokens=20).text

    async def main() -> tuple[list[str], str, str, list[str]]:
        async with aio.connect(instance) as session:
            texts = await asyncio.gather(*(session.generate("Zoo", max_tokens=20 + i) for i in range(8)))
            pieces = [p async for p in session.stream("Zoo", max_tokens=20)]
            async for _ in session.stream("Once upon a time", max_tokens=300):
                break  # leaving early cancels it
            choices = await session.generate_n("Zoo", 3, max_tokens=20)
            replied = await session.chat(conversation, max_tokens=20)
            assert replied.text == chat_reply
            return ([t.text for t in texts], "".join(pieces), (await session.generate("Zoo", max_tokens=20)).text,
                    [c.text for c in choices])

    texts, streamed, again, choices = asyncio.run(main())
    assert all(t.startswith(" was a little girl") for t in texts)
    assert choices == [again] * 3  # greedy: n choices alike
    assert streamed == again == texts[0]
    wait_until(lambda: all_blocks_free(instance), "the abandoned async stream to be cancelled")
