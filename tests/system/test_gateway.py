"""The OpenAI-compatible gateway, driven by the official `openai` package (sync, async,
streaming and not) and by raw HTTP for the errors. One instance, gateway on port 0."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.libllm.sampling import SamplingParams
from llmos.servers.runner.model import Model, SeqChunk
from tests.microkernel.procs import wait_until
from tests.system.cli import all_blocks_free, running_instance

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
body_timeout_s = 2.0
""" + servers_toml(1, gateway=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with running_instance(tmp_path_factory, CONFIG, "gw") as instance:
        url = (Path(os.environ["LLMOS_RUNTIME_DIR"]) / instance / "gateway.url").read_text().strip()
        yield instance, url


KEY_A = {"authorization": "Bearer key-a"}


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


def test_penalties_reach_the_runner_and_follow_its_definition(gateway: tuple[str, str]) -> None:
    """OpenAI's presence and frequency penalties and vLLM's repetition penalty, over HTTP and
    through libllm: the same text, another than without them, and the one this process makes
    a token at a time with the model and the penalties' history (over the scheduler's
    multi-token steps, which keep the history themselves)."""
    instance, url = gateway
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    with libllm.connect(instance) as session:
        expected = session.generate("Once upon a time", max_tokens=40, **penalties)
        plain = session.generate("Once upon a time", max_tokens=40).text
        prompt = session.tokenizer.encode("Once upon a time")
    over_http = httpx.post(url + "/v1/completions", headers=KEY_A, timeout=WAIT, json={
        "model": "stories260K", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, **penalties})
    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["choices"][0]["text"] == expected.text != plain
    model = Model.load()
    params = SamplingParams(**penalties)
    kv = model.new_kv_pool(model.blocks_needed(len(prompt) + 40))
    table, made = list(range(kv.shape[0])), []
    while len(made) < len(expected.token_ids):  # 40, or fewer with a stop token
        chunk = SeqChunk(table, 0, prompt + made, sampling=params, penalty_prompt_ids=prompt,
                         penalty_output_ids=made)
        made.append(int(model.step([chunk], kv).token_ids[0]))
    assert made == expected.token_ids


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
    text = httpx.get(url + "/metrics", headers=KEY_A, timeout=WAIT).text
    for name in ("llmos_scheduling_delay_steps", "llmos_generated_tokens_total", "llmos_runner_busy_seconds_total",
                 "llmos_kv_blocks", "llmos_fragmentation_ratio", "llmos_prefix_cache_hit_ratio",
                 "llmos_ring_latency_seconds", "llmos_ring_lost_messages_total", "llmos_ring_bytes_total",
                 "llmos_ttft_seconds_bucket", "llmos_time_per_output_token_seconds_count"):
        assert name in text, name


def test_every_metric_is_defined_in_the_docs(gateway: tuple[str, str]) -> None:
    """docs/metrics.md defines every series /metrics exports, by its exact name."""
    _, url = gateway
    text = httpx.get(url + "/metrics", headers=KEY_A, timeout=WAIT).text
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    assert len(exported) > 20
    assert {name for name in exported if f"`{name}" not in doc} == set()


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


def test_a_prompt_list_gets_n_choices_per_prompt(gateway: tuple[str, str]) -> None:
    """What LangChain's OpenAI.batch sends: one request, several prompts (text or ids)."""
    instance, url = gateway
    with libllm.connect(instance) as session:
        zoo, once = (session.generate(p, max_tokens=5) for p in ("Zoo", "Once upon"))
        zoo_ids = session.tokenizer.encode("Zoo")
    done = client(url).completions.create(model="stories260K", prompt=["Zoo", "Once upon"], max_tokens=5,
                                          temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [zoo.text, zoo.text, once.text, once.text]
    assert done.usage is not None
    assert done.usage.prompt_tokens == zoo.usage.prompt_tokens + once.usage.prompt_tokens
    assert done.usage.completion_tokens == 2 * (zoo.usage.completion_tokens + once.usage.completion_tokens)
    by_ids = client(url).completions.create(model="stories260K", prompt=zoo_ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == zoo.text
    two = client(url).completions.create(model="stories260K", prompt=[zoo_ids, zoo_ids], max_tokens=5, temperature=0)
    assert [c.text for c in two.choices] == [zoo.text, zoo.text]


def test_a_stream_carries_every_choice_its_finish_reason_and_usage(gateway: tuple[str, str]) -> None:
    _, url = gateway
    whole = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=6, temperature=1.0,
                                           seed=3, n=2)
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=6, temperature=1.0,
                                                seed=3, n=2, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_chat_takes_max_completion_tokens_and_defaults_to_the_context_left(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    messages = [{"role": "user", "content": "A dog"}]
    with libllm.connect(instance) as session:
        three = session.chat(messages, max_tokens=3)
        context_left = session.model_info().context_length - three.usage.prompt_tokens
        default = session.chat(messages, max_tokens=min(200, context_left))  # the gateway's cap is 200
    done = client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                               max_completion_tokens=3, temperature=0)
    assert done.choices[0].message.content == three.text
    assert done.usage is not None and done.usage.completion_tokens == three.usage.completion_tokens
    unbounded = client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                                    temperature=0)
    assert unbounded.choices[0].message.content == default.text
    chunks = list(client(url).chat.completions.create(model="stories260K", messages=messages,  # type: ignore[arg-type]
                                                      max_completion_tokens=3, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == three.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        done.choices[0].finish_reason]


@pytest.mark.parametrize(("extra", "field"), [
    ({"logprobs": 21}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"best_of": 3}, "best_of"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"temprature": 0.5}, "temprature"),
])
def test_what_we_do_not_implement_is_a_400_naming_the_field(gateway: tuple[str, str], extra: dict[str, object],
                                                             field: str) -> None:
    _, url = gateway
    body = {"model": "stories260K", "prompt": "Zoo", "max_tokens": 2, **extra}
    reply = httpx.post(url + "/v1/completions", json=body, headers=KEY_A, timeout=WAIT)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field and field in reply.json()["error"]["message"]


def test_inert_values_of_those_fields_pass(gateway: tuple[str, str]) -> None:
    _, url = gateway
    body = {"model": "stories260K", "prompt": "Zoo", "max_tokens": 2, "logprobs": None, "echo": False,
            "frequency_penalty": 0, "presence_penalty": 0.0, "best_of": 1, "user": "u", "top_k": 0}
    assert httpx.post(url + "/v1/completions", json=body, headers=KEY_A, timeout=WAIT).status_code == 200


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/metrics", {}, 401), ("GET", "/v1/models", {}, 401), ("GET", "/version", {}, 401),
    ("GET", "/v1/models", {"authorization": "key-a"}, 401),  # a key without its scheme
    ("GET", "/v1/models", {"authorization": "bearer key-a"}, 200),  # the scheme in any case
    ("GET", "/health", {}, 200),
])
def test_every_route_but_health_needs_a_bearer_key(gateway: tuple[str, str], method: str, path: str,
                                                    headers: dict[str, str], status: int) -> None:
    _, url = gateway
    reply = httpx.request(method, url + path, headers=headers, timeout=WAIT)
    assert reply.status_code == status, reply.text
    if status == 401:
        assert reply.json()["error"]["type"] == "authentication_error"


def test_unknown_routes_and_methods_answer_in_openai_shape(gateway: tuple[str, str]) -> None:
    _, url = gateway
    missing = httpx.get(url + "/v1/nothing", headers=KEY_A, timeout=WAIT)
    assert missing.status_code == 404 and "/v1/nothing" in missing.json()["error"]["message"]
    wrong = httpx.get(url + "/v1/completions", headers=KEY_A, timeout=WAIT)
    assert wrong.status_code == 405 and "GET" in wrong.json()["error"]["message"]
    surrogate = httpx.post(url + "/v1/completions", content=b'{"model": "stories260K", "prompt": "\\ud800"}',
                           headers={**KEY_A, "content-type": "application/json"}, timeout=WAIT)
    assert surrogate.status_code == 400 and "Unicode" in surrogate.json()["error"]["message"]


def test_the_body_limit_holds_for_chunked_bodies(gateway: tuple[str, str]) -> None:
    _, url = gateway
    prefix = b'{"model": "stories260K", "prompt": "'
    reply = httpx.post(url + "/v1/completions", content=iter([prefix, b"x" * 3000, b"y" * 3000, b'"}']),
                       headers={**KEY_A, "content-type": "application/json"}, timeout=WAIT)
    assert "content-length" not in reply.request.headers  # it went chunked
    assert reply.status_code == 413 and "body over" in reply.json()["error"]["message"]


def test_a_body_that_does_not_arrive_in_time_is_dropped(gateway: tuple[str, str]) -> None:
    _, url = gateway
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        received = b""  # the gateway's body_timeout_s is 2 s; each recv waits up to WAIT
        while chunk := sock.recv(4096):  # to the end: the answer closes the connection
            received += chunk
        answer = received.decode()
    assert answer.startswith("HTTP/1.1 408") and "body_timeout" in answer


def test_tokenize_detokenize_model_and_version(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        ids = session.tokenizer.encode("Once upon a time")
        context = session.model_info().context_length
    tokens = httpx.post(url + "/tokenize", json={"prompt": "Once upon a time"}, headers=KEY_A, timeout=WAIT).json()
    assert tokens == {"count": len(ids), "max_model_len": context, "tokens": ids}
    text = httpx.post(url + "/detokenize", json={"tokens": ids}, headers=KEY_A, timeout=WAIT).json()["prompt"]
    assert text.strip() == "Once upon a time"
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]}, headers=KEY_A, timeout=WAIT)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client(url).models.retrieve("stories260K").id == "stories260K"
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-9")
    assert httpx.get(url + "/version", headers=KEY_A, timeout=WAIT).json()["version"]


def test_metrics_have_the_names_dashboards_know(gateway: tuple[str, str]) -> None:
    _, url = gateway
    client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=4, temperature=0)
    list(client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=4, temperature=0, stream=True))
    text = httpx.get(url + "/metrics", headers=KEY_A, timeout=WAIT).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    label = 'model_name="stories260K"'
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"{gauge}{{{label}}}" in samples, gauge
    assert samples[f"vllm:generation_tokens_total{{{label}}}"] >= 8
    assert samples[f'vllm:request_success_total{{{label},finished_reason="length"}}'] >= 2
    for hist in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "llmos_gateway_event_loop_lag_seconds"):
        assert samples[f"{hist}_count{{{label}}}"] >= 1, hist
        assert f"{hist}_sum{{{label}}}" in samples and f'{hist}_bucket{{{label},le="+Inf"}}' in samples


def test_langchain_chat_and_completion_models_including_batch(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    from langchain_openai import ChatOpenAI, OpenAI

    with libllm.connect(instance) as session:
        zoo, once = (session.generate(p, max_tokens=5).text for p in ("Zoo", "Once upon"))
        dog = session.chat([{"role": "user", "content": "A dog"}], max_tokens=5).text
    llm = OpenAI(base_url=url + "/v1", api_key="key-a", model="stories260K", max_tokens=5, temperature=0,
                 max_retries=0, timeout=WAIT)
    assert llm.batch(["Zoo", "Once upon"]) == [zoo, once]  # one request with a prompt list
    chat = ChatOpenAI(base_url=url + "/v1", api_key="key-a", model="stories260K", max_tokens=5,  # type: ignore[call-arg]
                      temperature=0, max_retries=0, timeout=WAIT)
    assert chat.invoke("A dog").content == dog
    assert [m.content for m in chat.batch(["A dog", "A dog"])] == [dog, dog]
    assert "".join(str(c.content) for c in chat.stream("A dog")) == dog


def test_logprobs_are_the_models_and_the_same_every_way(gateway: tuple[str, str]) -> None:
    instance, url = gateway
    with libllm.connect(instance) as session:
        alone = session.generate("Zoo", max_tokens=6, logprobs=3)
    assert alone.logprobs is not None and len(alone.logprobs) == len(alone.token_ids) == 6
    for token, lp in zip(alone.token_ids, alone.logprobs, strict=True):  # greedy: the most likely each time
        assert lp.top_ids[0] == token and lp.top_logprobs[0] == lp.logprob <= 0.0
    done = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=6, temperature=0,
                                          logprobs=3)
    choice = done.choices[0]
    assert choice.text == alone.text and choice.logprobs is not None
    assert choice.logprobs.token_logprobs == [lp.logprob for lp in alone.logprobs]
    assert "".join(choice.logprobs.tokens or []) == alone.text
    assert choice.logprobs.text_offset is not None and choice.logprobs.text_offset[0] == 0
    echoed = client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Zoo" + alone.text
    streamed: list[float] = []
    for chunk in client(url).completions.create(model="stories260K", prompt="Zoo", max_tokens=6, temperature=0,
                                                logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs or []
    assert streamed == choice.logprobs.token_logprobs
    chat = client(url).chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "A dog"}],
                                               max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_echo_with_logprobs_scores_the_prompt_as_the_model_alone_does(gateway: tuple[str, str]) -> None:
    """The request lm-eval's loglikelihood sends (echo, logprobs, max_tokens 1); the prompt is
    longer than a logprobs chunk and its prefix already cached: every token still scored."""
    from llmos.servers.runner.model import Model, SeqChunk
    from llmos.servers.runner.sampling import SamplingParams, logprob_of

    instance, url = gateway
    with libllm.connect(instance) as session:
        ids = session.tokenizer.encode("Once upon a time there was a little girl who liked to play in the park "
                                       "with her dog. One day the dog ran away and")
        session.generate(ids, max_tokens=1)  # now its full blocks are in the prefix cache
    assert len(ids) > 32
    model = Model.load()
    pool = model.new_kv_pool(model.blocks_needed(len(ids)))
    table = list(range(model.blocks_needed(len(ids))))
    expected = [logprob_of(model.step([SeqChunk(table, j, [ids[j]], sampling=SamplingParams())], pool).logits[0],
                           ids[j + 1], 1).logprob for j in range(len(ids) - 1)]
    done = client(url).completions.create(model="stories260K", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                          echo=True)
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[1:-1] == expected
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    refused = httpx.post(url + "/v1/completions", headers=KEY_A, timeout=WAIT, json={
        "model": "stories260K", "prompt": "Zoo", "echo": True, "logprobs": 1, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"
