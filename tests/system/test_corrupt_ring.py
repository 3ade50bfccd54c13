"""A ring between two servers corrupted, as a stray write of a process with the arena mapped
could: the side that finds it drops the channel, the scheduler stops using that runner and
requeues its steps on the other, logs it once, and opens a new channel after a backoff; every
text stays what the model gives alone. (A running producer rewrites its own counter at once,
so the scheduler is held still with SIGSTOP while the counter is changed and the runner reads
it.)"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.microkernel import layout as L
from llmos.microkernel.arena import Arena
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.instance import arena_name, log_dir
from llmos.servers.runner.loaders import default_tokenizer_path
from llmos.servers.runner.model import Model, generate
from tests.microkernel.procs import wait_until
from tests.system.cli import running_instance, scheduler_stats

pytestmark = pytest.mark.slow
WAIT = 120.0
PROMPTS = ["Once upon a time", "Zoo", "The little dog", "One day", "Tom and Sue", "The sun"]
# The scheduler is stopped for a moment: its heartbeats may lapse that long, not 10 s.
CONFIG = "heartbeat_timeout_s = 10.0\n[scheduler]\ndecode_steps = 2\n" + servers_toml(2)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "ring") as name:
        yield name


@pytest.fixture(scope="module")
def expected() -> list[str]:
    model = Model.load()
    tok = libllm.tokenizer.load_tokenizer(default_tokenizer_path())
    return [tok.decoder(tok.encode(p)).push_many(generate(model, tok.encode(p), 120, stop_ids=tok.stop_ids))
            for p in PROMPTS]


def log_of(instance: str, name: str) -> str:
    return (log_dir(instance) / f"{name}.log").read_text()


def corrupt(instance: str, runner: str, field: int, value: int) -> None:
    """Write `value` at `field` of the scheduler -> `runner` request ring, the scheduler held
    still until the runner has read it (it re-reads an idle ring within 100 ms)."""
    with Endpoint.connect(instance) as ep:
        stats = ep.kernel_stats()
    ids = {e.name: e.endpoint_id for e in stats.endpoints}
    pid = next(e.pid for e in stats.endpoints if e.name == "scheduler")
    ring = next(r for r in stats.rings if r.direction == "request" and r.client_id == ids["scheduler"]
                and r.server_id == ids[runner])
    arena = Arena.attach(arena_name(instance))
    os.kill(pid, signal.SIGSTOP)
    try:
        struct.pack_into("<Q", arena.buf, ring.offset + field, value)
        wait_until(lambda: "is corrupt" in log_of(instance, runner), f"{runner} to find the corrupt ring")
    finally:
        os.kill(pid, signal.SIGCONT)
        arena.close()


def generate_all(instance: str) -> list[str]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool, libllm.connect(instance) as session:
        return list(pool.map(lambda p: session.generate(p, max_tokens=120, timeout=WAIT).text, PROMPTS))


def test_a_corrupt_ring_to_a_runner_is_dropped_and_reopened_and_no_text_changes(
        instance: str, expected: list[str]) -> None:
    runner, found_by = "runner.0", "runner.0 dropped"  # whichever side of the scheduler learns it first
    assert generate_all(instance) == expected
    before = log_of(instance, "scheduler").count(found_by)
    corrupt(instance, runner, L.RH_TAIL, 2**40)
    assert generate_all(instance) == expected
    wait_until(lambda: log_of(instance, "scheduler").count(found_by) > before, "the scheduler to drop it")
    wait_until(lambda: scheduler_stats(instance)["num_runners"] == 2, f"the scheduler to reopen {runner}",
               timeout=WAIT)
    assert generate_all(instance) == expected
    log = log_of(instance, "scheduler")
    assert log.count(found_by) == before + 1 and log.count(f"{runner} is back") >= 1, log[-3000:]
