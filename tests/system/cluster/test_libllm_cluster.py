"""llmos on Ray through libllm.cluster: an instance per node of the package's Ray test cluster
(conftest.py), requests spread and prefix affinity seen in the hit rates, a node's actor
killed -9 mid-load with every text identical to an undisturbed run, a node added under load
used and one removed leaving nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import msgspec
import pytest

from llmos import libllm
from llmos.config import ConfigError, load_config
from tests.microkernel.procs import wait_until
from tests.system.cluster.conftest import WAIT, Running

ray = pytest.importorskip("ray")

from llmos.cluster import commands  # noqa: E402
from llmos.libllm import cluster  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = [f"Tom had a {thing} and {verb}" for thing in ("dog", "cat", "ball", "car", "hat", "cup") for verb in
           ("ran", "sat", "hid")]
MAX_TOKENS = 480
SHARED = "Once upon a time, in a small town by the sea, there lived a girl who loved to draw pictures of boats "


def greedy(session: Any, prompt: str) -> list[int]:
    return list(session.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0).token_ids)


@pytest.fixture(scope="module")
def expected(running: Running) -> dict[str, list[int]]:
    """Each prompt's text from one node's instance, directly (no router, no Ray), one at a time."""
    with libllm.connect(running.rows[0]["instance"]) as direct:
        return {prompt: greedy(direct, prompt) for prompt in PROMPTS}


def test_every_node_runs_an_instance_and_the_router_spreads_requests(running: Running,
                                                                     expected: dict[str, list[int]]) -> None:
    session = running.session
    assert len(running.rows) == 2 and all(row["ready"] for row in running.rows)
    assert len({row["instance"] for row in running.rows}) == 2
    before = session.placements()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(lambda p: greedy(session, p), PROMPTS), strict=True))
    assert got == expected  # the same text on either node as on one instance alone
    after = session.placements()
    routed = {name: after[name]["routed"] - before.get(name, {}).get("routed", 0) for name in after}
    assert len(routed) == 2 and all(n > 0 for n in routed.values()), routed


def test_a_shared_prefix_goes_to_one_instance_and_hits_its_cache(running: Running) -> None:
    session = running.session
    before = session.stats()
    placed_before = session.placements()
    for i in range(6):  # one at a time: the loads are even, so affinity decides every one
        session.generate(f"{SHARED}number {i}.", max_tokens=4, temperature=0.0)
    after = session.stats()
    placed = session.placements()
    affine = {n: placed[n]["affine"] - placed_before[n]["affine"] for n in placed}
    hits = {n: after[n]["num_prefix_hit_tokens"] - before[n]["num_prefix_hit_tokens"] for n in after}
    home = max(affine, key=lambda n: affine[n])
    assert affine[home] == 6, affine
    block = session.info.block_tokens
    shared_blocks = len(session.tokenizer.encode(SHARED)) // block
    assert hits[home] >= 5 * shared_blocks * block, hits  # every request after the first read the prefix
    assert all(hits[n] == 0 for n in hits if n != home), hits


def test_a_request_left_early_counts_no_more_at_its_instance(running: Running) -> None:
    """A client that stops reading (an HTTP client gone, a loop left) cancels its request, and
    the router stops counting it at once: nobody may ever read its end."""
    session = running.session
    before = sum(p["open"] for p in session.placements().values())
    request = session.stream(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
    assert sum(p["open"] for p in session.placements().values()) == before + 1
    for _ in request:
        break  # one piece, then gone: the request is cancelled at its instance
    assert sum(p["open"] for p in session.placements().values()) == before


def test_a_node_killed_mid_load_loses_no_request_and_changes_no_text(running: Running,
                                                                     expected: dict[str, list[int]]) -> None:
    session = running.session
    failovers = session.num_failovers
    victim_row = running.rows[1]
    victim = next(name for name in session.instances() if name.endswith(victim_row["node_id"]))
    requests = [session.stream(p, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS]
    got: dict[str, list[int]] = {}
    first_tokens = threading.Barrier(len(PROMPTS) + 1, timeout=WAIT)

    def drain(prompt: str, request: libllm.Request) -> None:
        pieces = iter(request)
        next(pieces, None)  # the first batch has arrived: the kill lands mid-stream
        first_tokens.wait()
        for _ in pieces:
            pass
        got[prompt] = request.completion().token_ids

    threads = [threading.Thread(target=drain, args=(p, r)) for p, r in zip(PROMPTS, requests, strict=True)]
    for thread in threads:
        thread.start()
    first_tokens.wait()
    assert session.placements()[victim]["open"] > 0  # its clients hold off: their requests are open
    # The node's actor, its instance's supervisor and kernel: everything of that node but Ray.
    for pid in (victim_row["pid"], victim_row["supervisor_pid"]):
        os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(WAIT)
    assert got == expected
    assert session.num_failovers - failovers >= 1
    # Ray restarts the actor on its node; it takes the old instance down and starts a new one.
    wait_until(lambda: victim in session.instances(), "the killed node's actor back", timeout=WAIT)
    rows = commands.status(running.ray_cluster.address)
    assert all(row["ready"] for row in rows) and {r["instance"] for r in rows} == {r["instance"] for r in running.rows}
    running.rows = rows


def test_a_node_added_under_load_is_used_and_one_removed_leaves_nothing(running: Running,
                                                                        expected: dict[str, list[int]]) -> None:
    session = running.session
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for prompt in PROMPTS[:4]:
                assert greedy(session, prompt) == expected[prompt]

    with ThreadPoolExecutor(4) as pool:  # more requests than instances: the new one must take some
        loaders = [pool.submit(load) for _ in range(4)]
        try:
            node = running.ray_cluster.add_node(num_cpus=1)
            wait_until(lambda: len(session.instances()) == 3, "the new node's instance", timeout=WAIT)
            new = next(n for n in session.instances() if not any(n.endswith(r["node_id"]) for r in running.rows))
            wait_until(lambda: session.placements()[new]["routed"] > 0, "a request on the new node", timeout=WAIT)
        finally:
            stop.set()  # (a failure above must not leave the loaders running: the pool's exit waits for them)
        for loader in loaders:
            loader.result(WAIT)
    # The node leaves (its raylet and workers end): its instance stops with its actor.
    arena = f"llmos.{running.prefix}-{new.removeprefix(cluster.ACTOR_PREFIX)[:12]}"
    assert os.path.exists(f"/dev/shm/{arena}")
    running.ray_cluster.remove_node(node)
    wait_until(lambda: not os.path.exists(f"/dev/shm/{arena}"), "the removed node's instance down", timeout=WAIT)
    wait_until(lambda: len(session.instances()) == 2, "the router to drop the removed node", timeout=WAIT)


def test_cluster_status_shows_every_nodes_instance(running: Running) -> None:
    out = subprocess.run([sys.executable, "-m", "llmos", "cluster", "status", "--address",
                          running.ray_cluster.address, "--json"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["instances"]
    assert {row["instance"] for row in rows} == {row["instance"] for row in running.rows}
    assert all(row["ready"] and row["stats"]["num_finished"] > 0 for row in rows)


def test_a_second_up_with_another_config_is_refused_and_changes_nothing(running: Running) -> None:
    other = load_config(None)
    other = replace(other, scheduler=replace(other.scheduler, policy="fcfs" if other.scheduler.policy != "fcfs"
                                             else "fair"))
    with pytest.raises(ConfigError, match="already up with another config"):
        commands.up(running.ray_cluster.address, msgspec.to_builtins(other), WAIT, running.prefix)
    assert {row["instance"] for row in commands.status(running.ray_cluster.address)} == \
        {row["instance"] for row in running.rows}

