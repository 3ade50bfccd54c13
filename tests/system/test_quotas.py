"""Per-tenant KV block quotas hold for generation, through the whole system: a prompt the
quota cannot hold is a 429 naming it, a request that reaches it ends with "length" at
exactly the quota, and a tenant flooding the instance gets its own texts while another
tenant is served beside it, never holding more than its quota."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llmos import libllm
from llmos.config import servers_toml
from tests.system.cli import running_instance, scheduler_stats

pytestmark = pytest.mark.slow
WAIT = 60.0
QUOTA_BLOCKS = 8
BLOCK_TOKENS = 16
CONFIG = f"""
[memory]
pages = "8M"
block_tokens = {BLOCK_TOKENS}
quota_blocks = {QUOTA_BLOCKS}
[gateway]
port = 0
api_keys = {{ "key-a" = "tenant-a", "key-b" = "tenant-b" }}
""" + servers_toml(1, gateway=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with running_instance(tmp_path_factory, CONFIG, "quota") as instance:
        url = (Path(os.environ["LLMOS_RUNTIME_DIR"]) / instance / "gateway.url").read_text().strip()
        yield instance, url


def complete(url: str, key: str, prompt: list[int], max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=WAIT,
                      json={"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def prompt_of(session: libllm.Session, text: str, num_tokens: int) -> list[int]:
    ids = session.tokenizer.encode(text)
    while len(ids) < num_tokens:
        ids += ids[1:]
    return ids[:num_tokens]


def test_a_prompt_the_quota_cannot_hold_is_a_429_and_changes_nothing(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        too_long = prompt_of(session, "Once upon a time", QUOTA_BLOCKS * BLOCK_TOKENS)
    refused = complete(url, "key-a", too_long, 4)
    assert refused.status_code == 429, refused.text
    assert "quota" in refused.json()["error"]["message"] and "tenant-a" in refused.json()["error"]["message"]
    assert complete(url, "key-a", too_long[:-1], 1).status_code == 200  # one token less fits


def test_a_request_that_reaches_the_quota_ends_with_length_there(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        prompt = prompt_of(session, "The little dog", 100)
        alone = session.generate(prompt, max_tokens=QUOTA_BLOCKS * BLOCK_TOKENS - 100)  # what the quota holds
    done = complete(url, "key-a", prompt, 200).json()
    choice = done["choices"][0]
    assert choice["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == QUOTA_BLOCKS * BLOCK_TOKENS - 100
    assert choice["text"] == alone.text


def test_a_flooding_tenant_keeps_its_quota_and_its_texts_and_the_other_is_served(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        prompts = [prompt_of(session, text, 30) for text in
                   ("Once upon a time", "The sun was", "Lily and Tom", "A big red ball", "One day a cat", "The bird")]
        expected = [session.generate(p, max_tokens=60).text for p in prompts]
    most_held = {"tenant-a": 0, "tenant-b": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held = scheduler_stats(instance)["num_kv_blocks_by_client"]
            for tenant in most_held:
                most_held[tenant] = max(most_held[tenant], held.get(tenant, 0))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            flood = [pool.submit(complete, url, "key-a", p, 60) for p in prompts]
            other = pool.submit(complete, url, "key-b", prompts[0], 60)
            texts = [f.result().json()["choices"][0]["text"] for f in flood]
            assert other.result().json()["choices"][0]["text"] == expected[0]
    finally:
        done.set()
        watcher.join(WAIT)
    assert texts == expected
    assert most_held["tenant-a"] <= QUOTA_BLOCKS, most_held
