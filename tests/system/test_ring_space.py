"""A client cannot exhaust the kernel's ring space for others: it may hold max_client_channels
channels, the clients of one process max_process_rings rings, clients together may not take
the share kept for the servers (a server restarted meanwhile still gets its rings), and
whatever a client held is reusable once it has gone, for any size of ring (a channel ring
serves as a new client's control ring)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos import libllm
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import Overloaded
from tests.microkernel.procs import wait_until
from tests.system.cli import WAIT, Cli, running_instance

pytestmark = pytest.mark.slow
PROCESS_RINGS = 160
# 64M of rings: room for about 400 channels, so the servers' share is reached by several
# processes of clients, each stopped at its own limit first.
CONFIG = (f"heartbeat_timeout_s = 5.0\nrestart_backoff_s = 0.1\nmax_process_rings = {PROCESS_RINGS}\nrings = \"64M\"\n"
          "[model]\nrunners = 1\nthreads = 1\n")
# A process of clients that opens channels until the kernel refuses, says why, and holds
# them until its stdin closes.
HOG = """
import sys
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import Overloaded
held = []
try:
    while True:
        held.append(Endpoint.connect(sys.argv[1]))
        for _ in range(64):
            held[-1].open_channel("scheduler")
except Overloaded as exc:
    print("refused:", exc, flush=True)
sys.stdin.read()
"""


def start_hog(instance: str) -> tuple[subprocess.Popen[str], str]:
    hog = subprocess.Popen([sys.executable, "-c", HOG, instance], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    assert hog.stdout is not None
    return hog, hog.stdout.readline()  # blocks until it is refused: the kernel answers each open at once


def stop_hogs(hogs: list[subprocess.Popen[str]]) -> None:
    for hog in hogs:
        assert hog.stdin is not None
        hog.stdin.close()
    for hog in hogs:
        hog.wait(WAIT)
        assert hog.stdout is not None
        hog.stdout.close()


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "space") as name:
        yield name


def sixteen_sessions_generate(instance: str) -> bool:
    """16 new sessions connect at once and each generates (the space the hog held is back)."""
    sessions = []
    try:
        for _ in range(16):
            sessions.append(libllm.connect(instance, timeout=WAIT))
        texts = [s.generate("Zoo", max_tokens=4, timeout=WAIT).text for s in sessions]
    except Overloaded:
        return False  # the departed hog's rings are freed once the servers let go of their ends
    finally:
        for s in sessions:
            s.close()
    return len(set(texts)) == 1


@pytest.mark.parametrize("name", ["", "a-name-of-its-own"])  # a name without the supervisor's key is no server
def test_one_client_is_refused_at_its_channel_limit(instance: str, name: str) -> None:
    with Endpoint.connect(instance, name=name) as hog:
        held = 0
        with pytest.raises(Overloaded, match=r"already holds 64 channels, the most a client may \(max_client_channels"):
            for _ in range(1000):
                hog.open_channel("scheduler")
                held += 1
        assert held == 64
        assert sixteen_sessions_generate(instance)  # others are not starved meanwhile
    wait_until(lambda: sixteen_sessions_generate(instance), "sessions after the hog left", timeout=WAIT)


def test_clients_together_leave_the_servers_room_and_give_it_back(instance: str) -> None:
    hogs: list[subprocess.Popen[str]] = []
    try:
        why = ""
        while "kept for the servers" not in why:  # process after process, each up to its own limit
            assert len(hogs) < 16, why
            hog, why = start_hog(instance)
            hogs.append(hog)
        assert len(hogs) > 1  # one process alone was stopped by its own limit first
        with pytest.raises(Overloaded, match="kept for the servers"):
            libllm.connect(instance, timeout=WAIT)
        # A server restarted now still gets its control ring and its channel from the scheduler.
        cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
        old = cli.pids(instance)["runner.0"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: cli.pids(instance).get("runner.0", old) != old, "runner.0 to be restarted")
    finally:
        stop_hogs(hogs)
    wait_until(lambda: sixteen_sessions_generate(instance), "sessions after the hogs left", timeout=WAIT)
    with libllm.connect(instance) as session:
        assert session.stats()["scheduler"]["num_runners"] == 1


def test_one_process_of_many_clients_is_refused_at_its_ring_limit(instance: str) -> None:
    """A process that leaks sessions is stopped at max_process_rings; another process's
    sessions connect and generate meanwhile, and the leaked rings come back when it ends."""
    hog, why = start_hog(instance)
    try:
        assert f"already hold {PROCESS_RINGS} rings, the most one process may (max_process_rings" in why, why
        assert sixteen_sessions_generate(instance)  # this process is another: not held by the hog's limit
    finally:
        stop_hogs([hog])
    wait_until(lambda: sixteen_sessions_generate(instance), "sessions after the hog left", timeout=WAIT)
