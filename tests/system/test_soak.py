"""Everything a hostile or clumsy neighbour does, at once, for minutes (LLMOS_LONG=1 only):
while 32 clients generate greedy and seeded texts, a second thread keeps doing one of: kill -9
of a random server, SIGSTOP of one (the watchdog replaces it), a channel hog, a squatter on
the servers' names, malformed records on a channel to the scheduler, a slow consumer that
stops reading a stream. Every text must be the one the model gives alone; afterwards nothing
is left. `LLMOS_SOAK_S` sets the length (default 180 s); the figures are printed."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import LlmosError
from llmos.microkernel.messages import MsgType
from llmos.servers.runner.loaders import default_tokenizer_path
from llmos.servers.runner.model import Model, generate
from llmos.servers.runner.sampling import SamplingParams
from tests.microkernel.procs import wait_until
from tests.system.cli import Cli, running_instance

SOAK_S = float(os.environ.get("LLMOS_SOAK_S", "180"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("LLMOS_LONG") != "1", reason="a soak: LLMOS_LONG=1"),
              pytest.mark.timeout(SOAK_S + 900)]
WAIT = 300.0
CLIENTS = 32
PROMPTS = ["Once upon a time", "Zoo", "The little dog", "One day", "Tom and Sue", "The sun", "Lily"]
CONFIG = """
heartbeat_timeout_s = 2.0
restart_backoff_s = 0.1
max_restarts = 1000
restart_window_s = 1.0
[scheduler]
decode_steps = 4
""" + servers_toml(2)
SERVERS = ["runner.0", "runner.1", "scheduler", "memory"]


def sampling_of(i: int) -> dict[str, float | int]:
    return {} if i % 2 == 0 else {"temperature": 0.8, "seed": 1000 + i}


def expected_texts() -> dict[tuple[int, int], str]:
    """(prompt, client parity) -> the model's text alone, for every pair a client may ask."""
    model = Model.load()
    tok = libllm.tokenizer.load_tokenizer(default_tokenizer_path())
    out = {}
    for p, prompt in enumerate(PROMPTS):
        for i in range(CLIENTS):
            ids = tok.encode(prompt)
            made = generate(model, ids, 100, SamplingParams(**sampling_of(i)), stop_ids=tok.stop_ids)
            out[(p, i)] = tok.decoder(ids).push_many(made)
    return out


def test_everything_at_once_changes_no_text_and_leaves_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    expected = expected_texts()
    stop = threading.Event()
    results: Counter[str] = Counter()
    wrong: list[str] = []
    attacks: Counter[str] = Counter()
    lock = threading.Lock()
    with running_instance(tmp_path_factory, CONFIG, "soak") as instance:
        cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))

        def client(i: int) -> None:
            with libllm.connect(instance) as session:
                n = 0
                while not stop.is_set():
                    p = (i + n) % len(PROMPTS)
                    n += 1
                    try:
                        text = session.generate(PROMPTS[p], max_tokens=100, timeout=WAIT, **sampling_of(i)).text
                    except LlmosError as exc:  # nothing may be lost: an error is a failure too
                        with lock:
                            wrong.append(f"client {i} prompt {p}: {exc!r}")
                        continue
                    with lock:
                        results["requests"] += 1
                        if text.rstrip("\ufffd") != expected[(p, i)].rstrip("\ufffd"):
                            wrong.append(f"client {i} prompt {p}: {text!r}")

        def attack(rng: random.Random) -> None:
            kind = rng.choice(["kill", "stop", "hog", "squat", "junk", "slow"])
            attacks[kind] += 1
            if kind in ("kill", "stop"):
                victim = rng.choice(SERVERS)
                pid = cli.pids(instance).get(victim)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                    wait_until(lambda: cli.pids(instance).get(victim, pid) != pid, f"{victim} replaced", timeout=WAIT)
            elif kind == "hog":
                with Endpoint.connect(instance) as hog:
                    try:
                        for _ in range(100):
                            hog.open_channel("scheduler")
                    except LlmosError:
                        pass  # refused at its limit, as it should be
            elif kind == "squat":
                for name in ("gateway", "scheduler", rng.choice(SERVERS)):
                    try:
                        Endpoint.connect(instance, name=name).close()
                        wrong.append(f"a squatter registered {name!r}")
                    except LlmosError:
                        pass
            elif kind == "junk":
                with Endpoint.connect(instance) as ep:
                    channel = ep.open_channel("scheduler")
                    for _ in range(50):
                        channel.outgoing.try_send(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))))
                    channel.send(MsgType.SCHED_SUBMIT, os.urandom(64))
            else:  # a stream nobody reads for a while, then dropped
                with libllm.connect(instance) as slow:
                    stream = slow.stream("Once upon a time", max_tokens=300, timeout=WAIT)
                    next(iter(stream))
                    stop.wait(2.0)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        rng = random.Random(20261203)
        began = time.monotonic()
        while time.monotonic() - began < SOAK_S:
            attack(rng)
            stop.wait(rng.uniform(0.5, 2.0))
        stop.set()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        restarts = {p["name"]: p["restarts"] for p in cli.status(instance)["processes"]}
    print(f"\nsoak {SOAK_S:.0f} s: {results['requests']} requests, {len(wrong)} wrong; attacks {dict(attacks)}; "
          f"restarts {restarts}")
    assert wrong == []
    assert results["requests"] >= CLIENTS
    assert not [e for e in os.listdir("/dev/shm") if e.startswith("llmos.") and "soak" in e]
