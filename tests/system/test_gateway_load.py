"""The gateway under real load: Gemma 3 270M (seconds per request on this machine), hundreds
of concurrent HTTP clients, and a prompt that takes seconds to tokenise. Nothing may be lost,
the gateway must not be restarted (its event loop keeps heartbeating), and the scheduler
must see the gateway's requests at once, not a channel window's worth."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmos.config import servers_toml
from tests.microkernel.procs import wait_until
from tests.models import gemma3_270m
from tests.system.cli import Cli, running_instance, scheduler_stats

pytestmark = pytest.mark.slow
WAIT = 300.0
CLIENTS = 256


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    config = f"""
[model]
path = "{gemma3_270m()}"
threads = 2
[memory]
pages = "128M"
[gateway]
port = 0
max_tokens = 64
max_body_bytes = 2000000
""" + servers_toml(1, gateway=True)
    with running_instance(tmp_path_factory, config, "load") as instance:
        url = (Path(os.environ["LLMOS_RUNTIME_DIR"]) / instance / "gateway.url").read_text().strip()
        yield instance, url


def gateway_pid(instance: str) -> int:
    return Cli(Path(os.environ["LLMOS_RUNTIME_DIR"])).pids(instance)["gateway"]


def loop_lag_over(url: str, bound: str) -> int:
    """Samples of the gateway's event-loop lag above `bound` seconds (a bucket bound)."""
    samples = {}
    for line in httpx.get(url + "/metrics", timeout=WAIT).text.splitlines():
        if line.startswith("llmos_gateway_event_loop_lag_seconds_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = 'model_name="gemma-3-270m-q4_k_m"'
    count = samples[f"llmos_gateway_event_loop_lag_seconds_count{{{label}}}"]
    return int(count - samples[f'llmos_gateway_event_loop_lag_seconds_bucket{{{label},le="{bound}"}}'])


def test_hundreds_of_clients_lose_nothing_and_all_reach_the_scheduler(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    pid = gateway_pid(instance)
    seen_at_once = [0]
    done = threading.Event()

    def watch() -> None:  # the gateway's requests at the scheduler, as its stats count them
        while not done.is_set():
            stats = scheduler_stats(instance)
            seen_at_once[0] = max(seen_at_once[0], stats["num_running"] + stats["num_waiting"])
            if seen_at_once[0] >= CLIENTS // 2:
                return

    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        if i % 2:
            stream = await client.completions.create(model="gemma-3-270m-q4_k_m", prompt=f"Story {i}:",
                                                     max_tokens=4, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            assert usage is not None
            return usage.completion_tokens
        reply = await client.completions.create(model="gemma-3-270m-q4_k_m", prompt=f"Story {i}:", max_tokens=4,
                                                temperature=0)
        assert reply.usage is not None
        return reply.usage.completion_tokens

    async def main() -> list[int | BaseException]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS + 8), timeout=WAIT)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)), return_exceptions=True)
        finally:
            await client.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        watcher.join(WAIT)
    lost = [r for r in results if isinstance(r, BaseException)]
    assert not lost, f"{len(lost)} of {CLIENTS} lost, e.g. {lost[0]!r}"
    assert all(1 <= r <= 4 for r in results if isinstance(r, int))
    assert seen_at_once[0] >= CLIENTS // 2, f"at most {seen_at_once[0]} requests ever reached the scheduler at once"
    assert gateway_pid(instance) == pid, "the gateway was restarted"
    assert loop_lag_over(url, "1") == 0, "the gateway's event loop was held for over a second"


def test_a_megabyte_prompt_is_tokenised_off_the_loop(gateway: tuple[str, str]) -> None:
    """Tokenising it takes seconds: meanwhile other requests are served and the loop runs."""
    instance, url = gateway
    pid = gateway_pid(instance)
    big = "The quick brown fox jumps over the lazy dog. " * 22_000  # ~1 MB, far past the context
    results: dict[str, httpx.Response] = {}

    def send_big() -> None:
        results["big"] = httpx.post(url + "/v1/completions", json={"model": "gemma-3-270m-q4_k_m", "prompt": big,
                                                                   "max_tokens": 1}, timeout=WAIT)

    sender = threading.Thread(target=send_big)
    sender.start()
    small = httpx.post(url + "/v1/completions", json={"model": "gemma-3-270m-q4_k_m", "prompt": "Hi",
                                                      "max_tokens": 2}, timeout=WAIT)
    sender.join(WAIT)
    assert small.status_code == 200
    assert results["big"].status_code == 400 and "context" in results["big"].json()["error"]["message"]
    wait_until(lambda: httpx.get(url + "/health", timeout=WAIT).status_code == 200, "the gateway to answer")
    assert gateway_pid(instance) == pid
    assert loop_lag_over(url, "1") == 0
