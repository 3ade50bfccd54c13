"""The cluster's HTTP front door (`llmos cluster up` prints its URL), driven by the official
`openai` package on a two-node Ray test cluster: the OpenAI API served from both nodes with
the text one instance alone gives, each tenant spread over the nodes and counted as itself
on each (the front door's tenants reach the nodes' schedulers), and SSE streams that go on,
text unchanged, when a node's actor and instance are killed -9 mid-stream; a node serving
another model file never used; the front door itself killed and back. On the package's Ray
test cluster (conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from llmos import libllm
from llmos.config import load_config
from tests.conftest import unique_instance
from tests.microkernel.procs import wait_until
from tests.system.cluster.conftest import KEYS, WAIT, Running

ray = pytest.importorskip("ray")

from llmos.cluster import commands  # noqa: E402
from llmos.libllm import cluster  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "stories260K"
PROMPTS = [f"The {who} {verb} to the" for who in ("dog", "girl", "bird", "king") for verb in ("ran", "went", "came")]
LONG = 400  # tokens: a stream still running when its node is killed


def client(running: Running, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key=key, timeout=WAIT, max_retries=0)


@pytest.fixture(scope="module")
def expected(running: Running) -> dict[str, str]:
    """Each prompt's greedy text from one node's instance alone, directly (no front door)."""
    with libllm.connect(running.rows[0]["instance"]) as direct:
        return {p: direct.generate(p, max_tokens=LONG, temperature=0.0).text for p in PROMPTS}


def metric(running: Running, name: str) -> dict[str, float]:
    """A metric's samples at the front door, by label set."""
    text = httpx.get(running.url + "/metrics", headers={"authorization": "Bearer key-a"}, timeout=WAIT).text
    return {labels: float(value) for labels, value in re.findall(rf"^{re.escape(name)}(\{{.*?\}}|) (\S+)$", text,
                                                                   re.MULTILINE)}


def node_stats(running: Running) -> dict[str, dict[str, Any]]:
    return {row["instance"]: row["stats"] for row in commands.status(running.ray_cluster.address)}


def test_the_front_door_serves_the_openai_api_from_every_node(running: Running, expected: dict[str, str]) -> None:
    api = client(running)
    assert [m.id for m in api.models.list().data] == [MODEL]
    routed_before = metric(running, "llmos_cluster_routed_total")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        done = list(pool.map(lambda p: api.completions.create(model=MODEL, prompt=p, max_tokens=LONG, temperature=0),
                             PROMPTS))
    assert {p: d.choices[0].text for p, d in zip(PROMPTS, done, strict=True)} == expected
    routed = metric(running, "llmos_cluster_routed_total")
    assert len(routed) == 2 and all(routed[k] > routed_before.get(k, 0) for k in routed), routed
    assert metric(running, "llmos_cluster_instances") == {"": 2.0}
    # Chat, streamed and whole: the same text.
    messages: Any = [{"role": "user", "content": "Tell me a story."}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    pieces = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == whole.choices[0].message.content
    # Refused at the door, nothing sent on: a bad key, a model it does not serve, a bad token id.
    routed = metric(running, "llmos_cluster_routed_total")
    with pytest.raises(openai.AuthenticationError):
        client(running, "nobody").completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="token id"):
        api.completions.create(model=MODEL, prompt=[10**9], max_tokens=1)
    assert metric(running, "llmos_cluster_routed_total") == routed


def test_a_tenant_is_spread_over_the_nodes_and_counted_as_itself_on_each(running: Running) -> None:
    before = node_stats(running)
    flood = ThreadPoolExecutor(4)
    heavy = [flood.submit(client(running, "key-a").completions.create, model=MODEL, prompt=p, max_tokens=200,
                          temperature=0) for p in PROMPTS[:4]]
    # Two choices of one short prompt (no prefix to prefer a node): one per node, beside the flood.
    light = client(running, "key-b").completions.create(model=MODEL, prompt="Zoo", max_tokens=50, n=2, seed=7)
    assert len(light.choices) == 2
    for f in heavy:
        f.result(WAIT)
    flood.shutdown()
    after = node_stats(running)
    finished = {name: {t: after[name]["num_finished_by_client"].get(t, 0)
                       - before[name]["num_finished_by_client"].get(t, 0) for t in KEYS.values()} for name in after}
    assert sorted(f["tenant-b"] for f in finished.values()) == [1, 1], finished  # one each: spread, and named
    assert sum(f["tenant-a"] for f in finished.values()) == 4, finished


def test_streams_through_the_front_door_go_on_unchanged_when_a_node_is_killed(running: Running,
                                                                             expected: dict[str, str]) -> None:
    api = client(running)
    failovers = metric(running, "llmos_cluster_failovers_total")[""]
    victim = running.rows[1]
    got: dict[str, str] = {}
    first_pieces = threading.Barrier(len(PROMPTS) + 1, timeout=WAIT)

    def follow(prompt: str) -> None:
        stream = api.completions.create(model=MODEL, prompt=prompt, max_tokens=LONG, temperature=0, stream=True)
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if not text:
                    first_pieces.wait()  # every stream is under way: the kill lands mid-stream
                text += chunk.choices[0].text
        got[prompt] = text

    threads = [threading.Thread(target=follow, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    first_pieces.wait()
    # The node's actor, its instance's supervisor and kernel: everything of that node but Ray.
    for pid in (victim["pid"], victim["supervisor_pid"]):
        os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(WAIT)
    assert got == expected
    assert metric(running, "llmos_cluster_failovers_total")[""] > failovers
    # Ray restarts the actor on its node; the front door uses it again once it answers.
    wait_until(lambda: metric(running, "llmos_cluster_instances") == {"": 2.0}, "the killed node's instance back",
               timeout=WAIT)
    running.rows = commands.status(running.ray_cluster.address)


def test_a_front_door_killed_comes_back_and_serves(running: Running, expected: dict[str, str]) -> None:
    """Ray restarts it (on a new port here: the tests ask for port 0; a configured port is kept)."""
    address = running.ray_cluster.address
    door = commands.front_door(address)
    assert door is not None
    os.kill(door["pid"], signal.SIGKILL)

    def back() -> bool:
        try:
            again = commands.front_door(address)
        except ray.exceptions.RayError:
            return False  # restarting
        if again is None or again["pid"] == door["pid"] or len(again["instances"]) < 2:
            return False
        running.url = again["url"]
        return True

    wait_until(back, "the front door back", timeout=WAIT)
    done = client(running).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=LONG, temperature=0)
    assert done.choices[0].text == expected[PROMPTS[0]]


def test_health_and_status_name_the_front_door(running: Running) -> None:
    assert httpx.get(running.url + "/health", timeout=WAIT).json() == {"status": "ok", "model": MODEL}
    out = subprocess.run([sys.executable, "-m", "llmos", "cluster", "status", "--address",
                          running.ray_cluster.address, "--json"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["front_door"]["url"] == running.url
    assert len(status["front_door"]["instances"]) == 2
    assert {row["instance"] for row in status["instances"]} == {row["instance"] for row in running.rows}


def test_an_instance_serving_another_model_file_is_never_used(running: Running, tmp_path: Path) -> None:
    """A node whose file differs (here: one weight's byte, as a fine-tune would) is refused by
    its sha256: the front door would otherwise mix two models' texts under one name."""
    from llmos.cluster.node import NodeInstance
    from llmos.servers.runner.loaders import default_model_path, default_tokenizer_path

    other = tmp_path / "stories260K-tuned.bin"
    weights = bytearray(default_model_path().read_bytes())
    weights[4096] ^= 0x01
    other.write_bytes(bytes(weights))
    (tmp_path / "tokenizer.bin").write_bytes(default_tokenizer_path().read_bytes())  # (where llama2.c keeps it)
    config = load_config(None)
    config = replace(config, model=replace(config.model, path=str(other)), gateway=replace(config.gateway, port=0))
    name = cluster.ACTOR_PREFIX + "other"
    actor = ray.remote(NodeInstance).options(name=name, namespace=cluster.NAMESPACE, num_cpus=0).remote(
        "f" * 40, msgspec.to_builtins(config), unique_instance("other"))
    try:
        assert ray.get(actor.info.remote(), timeout=WAIT)["instance"]  # up, and listed by Ray like the others
        address = running.ray_cluster.address

        def refused() -> dict[str, str]:
            door = commands.front_door(address)
            return door["refused"] if door else {}

        wait_until(lambda: name in refused(), "the other model refused", timeout=WAIT)
        assert "sha256" in refused()[name]
        api = client(running)
        for prompt in PROMPTS[:4]:
            api.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert metric(running, "llmos_cluster_instances") == {"": 2.0}
        assert not any(name in labels for labels in metric(running, "llmos_cluster_routed_total"))
    finally:
        ray.get(actor.stop.remote(), timeout=WAIT)
        ray.kill(actor, no_restart=True)
