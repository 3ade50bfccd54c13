"""The OpenAI-compatible gateway, driven by the official `openai` package (sync, async,
streaming and not) and by raw HTTP for the errors. One instance, gateway on port 0."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

import libllm
from tests.microkernel.procs import wait_until
from tests.system.cli import all_blocks_free, running_instance
from tools.config import servers_toml

pytestmark = pytest.mark.slow
WAIT = 60.0
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
CONFIG = f"""
[memory]
pages = "8M"
[gateway]
port = 0
api_keys = {{ {", ".join(f'"{k}" = "{v}"' for k, v in KEYS.items())} }}
max_body_bytes = 4096
max_tokens = 200
max_in_flight = 4
""" + servers_toml(1, gateway=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with running_instance(tmp_path_factory, CONFIG, "gw") as instance:
        url = (Path(os.environ["LLMOS_RUNTIME_DIR"]) / instance / "gateway.url").read_text().strip()
        yield instance, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="key-a", timeout=WAIT, max_retries=0)


def test_models_and_health(gateway: tuple[str, str]) -> None:
    _, url = gateway
    assert [m.id for m in client(url).models.list()] == ["stories260K"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_greedy_text_over_http_equals_libllms(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        expected = session.generate("Zoo", max_tokens=30).text
    done = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=30, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 30
    streamed = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=30, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected


def test_chat_plain_and_streaming_and_n(gateway: tuple[str, str]) -> None:
    _, url = gateway
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A dog"}]
    plain = client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                                max_tokens=20, temperature=0)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.role == "assistant"
    stream = client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    three = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=10, temperature=1.0,
                                           seed=7, n=3)
    assert len(three.choices) == 3 and len({c.text for c in three.choices}) > 1  # diverge by seed


def test_chat_goes_through_libllms_chat(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A dog"}]
    with libllm.connect(instance) as session:
        expected = session.chat(messages, max_tokens=20)  # the built-in model has no template: role lines
    done = client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=20, temperature=0)
    assert done.choices[0].message.content == expected.text
    assert done.usage is not None and done.usage.prompt_tokens == expected.usage.prompt_tokens
    parts = [{"role": "system", "content": [{"type": "text", "text": "Tell stories."}]}, messages[1]]
    again = client(url).chat.completions.create(model="stories260K", messages=parts,  # type: ignore[arg-type]
                                                max_tokens=20, temperature=0)
    assert again.choices[0].message.content == expected.text
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    reply = httpx.post(url + "/v1/chat/completions", json={"model": "stories260K", "messages": image},
                       headers={"authorization": "Bearer key-a"}, timeout=WAIT)
    assert reply.status_code == 400 and "messages" in reply.json()["error"]["message"]


def test_async_client(gateway: tuple[str, str]) -> None:
    _, url = gateway

    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="key-b", timeout=WAIT, max_retries=0)
        done = await asyncio.gather(*(aclient.completions.create(model="stories260K", prompt="Zoo", max_tokens=8,
                                                                 temperature=0) for _ in range(3)))
        await aclient.close()
        return [d.choices[0].text for d in done]

    texts = asyncio.run(main())
    assert len(set(texts)) == 1 and texts[0].startswith(" was")


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "stories260K", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}), 404, "does not exist"),
    (json.dumps({"model": "stories260K", "prompt": "word " * 700}), 400, "context"),
    (json.dumps({"model": "stories260K", "prompt": "x", "max_tokens": 1000}), 400, "max_tokens"),
    (json.dumps({"model": "stories260K", "prompt": "x" * 5000}), 413, "body over"),
    (json.dumps({"model": "stories260K", "prompt": "x", "n": 5}), 429, "too many"),
])
def test_errors_have_the_openai_shape(gateway: tuple[str, str], body: bytes | str, status: int, words: str) -> None:
    _, url = gateway
    reply = httpx.post(url + "/v1/completions", content=body, timeout=WAIT,
                       headers={"authorization": "Bearer key-a", "content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and "type" in error
    if status == 429:
        assert reply.headers["retry-after"]


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}])
def test_a_missing_or_wrong_key_is_401(gateway: tuple[str, str], headers: dict[str, str]) -> None:
    _, url = gateway
    reply = httpx.post(url + "/v1/completions", json={"model": "stories260K", "prompt": "x"}, headers=headers)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"authorization": "Bearer key-a"},
                      timeout=WAIT) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    wait_until(lambda: all_blocks_free(instance), "the abandoned request's blocks to be free")


def test_metrics_name_the_seeds_figures(gateway: tuple[str, str]) -> None:
    _, url = gateway
    text = httpx.get(url + "/metrics", timeout=WAIT).text
    for name in ("llmos_scheduling_delay_steps", "llmos_generated_tokens_total", "llmos_runner_busy_seconds_total",
                 "llmos_kv_blocks", "llmos_fragmentation_ratio", "llmos_prefix_cache_hit_ratio",
                 "llmos_ring_latency_seconds", "llmos_ring_lost_messages_total", "llmos_ring_bytes_total",
                 "llmos_ttft_seconds_bucket", "llmos_time_per_output_token_seconds_count"):
        assert name in text, name


def test_the_priority_extension_reaches_the_scheduler(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    body = {"model": "stories260K", "prompt": "Zoo", "max_tokens": 5, "priority": 7}
    reply = httpx.post(url + "/v1/completions", json=body, headers={"authorization": "Bearer key-a"}, timeout=WAIT)
    assert reply.status_code == 200
    with libllm.connect(instance) as session:
        assert session.stats()["scheduler"]["num_finished_by_priority"].get(7, 0) >= 1
    body["priority"] = 5000
    reply = httpx.post(url + "/v1/completions", json=body, headers={"authorization": "Bearer key-a"}, timeout=WAIT)
    assert reply.status_code == 400 and "priority" in reply.text
