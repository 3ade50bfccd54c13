"""Failover: any server killed while tokens flow, and every request still ends with exactly
the text an undisturbed system gives. One instance per case; the kill lands mid-stream
(after the first tokens have arrived at every client, before any has finished)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.servers.runner.model import Model, generate
from llmos.servers.runner.sampling import SamplingParams
from tests.conftest import unique_instance
from tests.microkernel.procs import wait_until
from tests.system.cli import Cli, running_instance

pytestmark = pytest.mark.slow
WAIT = 120.0
CLIENTS = 24
CONFIG = """
heartbeat_timeout_s = 2.0
restart_backoff_s = 0.1
[memory]
pages = "8M"
[scheduler]
decode_steps = 2
max_batch_size = 16
""" + servers_toml(2)


@pytest.fixture(scope="module")
def expected() -> list[str]:
    """What each client's request gives on an undisturbed system: the model alone."""
    model = Model.load()
    with libllm_tokenizer() as tok:
        texts = []
        for i in range(CLIENTS):
            sampling = SamplingParams(**client_sampling(i))
            ids = tok.encode(PROMPTS[i % len(PROMPTS)])
            out = generate(model, ids, 150, sampling, stop_ids=tok.stop_ids)
            texts.append(tok.decoder(ids).push_many(out))
    return texts


PROMPTS = ["Once upon a time", "Zoo", "The little dog", "One day", "Tom and Sue"]


def client_sampling(i: int) -> dict[str, float | int]:
    """Client i's sampling: greedy or seeded, and every third with penalties, which count the
    tokens made before a failover as made (the resubmission says how many there were)."""
    sampling: dict[str, float | int] = {} if i % 2 == 0 else {"temperature": 0.8, "seed": 500 + i}
    if i % 3 == 2:
        sampling |= {"frequency_penalty": 0.8, "presence_penalty": 0.3, "repetition_penalty": 1.2}
    return sampling


class libllm_tokenizer:
    def __enter__(self) -> libllm.tokenizer.Tokenizer:
        from llmos.servers.runner.loaders import default_tokenizer_path

        return libllm.tokenizer.load_tokenizer(default_tokenizer_path())

    def __exit__(self, *exc: object) -> None:
        pass


def run_clients(instance: str, kill: object) -> tuple[list[str], list[int], float]:
    """24 streaming clients; `kill()` runs once every client has its first tokens. Returns
    the texts, each client's failover count, and the longest wait from the kill to a
    client's next piece: the longest gap between pieces after the kill (seconds: reported,
    never asserted)."""
    started = threading.Barrier(CLIENTS + 1)
    killed_at: list[float] = []
    gaps: list[float] = []

    def client(i: int) -> tuple[str, int]:
        sampling = client_sampling(i)
        with libllm.connect(instance) as session:
            pieces = []
            prompt: str | list[int] = PROMPTS[i % len(PROMPTS)]
            if i % 4 == 1:  # some as token ids: resubmitted the same way
                prompt = session.tokenizer.encode(prompt)
            stream = session.stream(prompt, max_tokens=150, timeout=WAIT, **sampling)
            it = iter(stream)
            pieces.append(next(it))
            started.wait(WAIT)
            last = None
            for piece in it:
                now = time.monotonic()
                if killed_at:
                    gaps.append(now - max(last or 0.0, killed_at[0]))
                last = now
                pieces.append(piece)
            return "".join(pieces), session.num_failovers

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(CLIENTS)]
        started.wait(WAIT)
        killed_at.append(time.monotonic())
        kill()  # type: ignore[operator]
        results = [f.result(timeout=WAIT) for f in futures]
    return [r[0] for r in results], [r[1] for r in results], max(gaps, default=0.0)


@pytest.mark.parametrize("victim, how", [
    ("runner.1", signal.SIGKILL),
    ("scheduler", signal.SIGKILL),
    ("memory", signal.SIGKILL),
    ("kernel", signal.SIGKILL),
    ("runner.0", signal.SIGSTOP),
])
def test_a_killed_server_delays_but_changes_no_text(tmp_path_factory: pytest.TempPathFactory, expected: list[str],
                                                     victim: str, how: int) -> None:
    with running_instance(tmp_path_factory, CONFIG, victim.split(".")[0]) as instance:
        cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
        pid = cli.pids(instance)[victim]

        def kill() -> None:
            os.kill(pid, how)

        got, failovers, worst = run_clients(instance, kill)
        print(f"\n{victim} ({signal.Signals(how).name}): longest wait from the kill to a client's next piece "
              f"{worst * 1000:.0f} ms; failovers {sum(failovers)}")
        if how == signal.SIGSTOP:  # the supervisor's watchdog kills it (it never resumes)
            wait_until(lambda: cli.pids(instance).get(victim, pid) != pid, "the hung server to be replaced")
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g.rstrip("\ufffd") == e.rstrip("\ufffd"), f"client {i} after {victim} was killed"
        if victim in ("scheduler", "kernel"):  # the kill landed while the clients were mid-stream
            assert sum(f >= 1 for f in failovers) >= CLIENTS // 2, failovers


def test_up_kill_9_a_random_process_down_leaves_nothing(tmp_path: Path) -> None:
    """Cycles of up / kill -9 of a random process / down: nothing left in /dev/shm, the run
    dir or the process table. 5 cycles here, 50 with LLMOS_LONG=1."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    cli = Cli(runtime)
    config = cli.config(CONFIG)
    rng = random.Random(11)
    before = sorted(os.listdir("/dev/shm"))
    for cycle in range(50 if os.environ.get("LLMOS_LONG") == "1" else 5):
        instance = unique_instance(f"cyc{cycle}")
        cli("up", "--detach", "--instance", instance, "--config", config)
        pids = cli.pids(instance)
        victim = rng.choice(sorted(pids))
        os.kill(pids[victim], signal.SIGKILL)
        cli("down", "--instance", instance)
        assert not (runtime / instance).exists()
        for pid in pids.values():
            wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or
                       Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                       f"pid {pid} to be gone after cycle {cycle}")
    assert sorted(os.listdir("/dev/shm")) == before
