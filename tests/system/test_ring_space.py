"""A client cannot exhaust the kernel's ring space for others: it may hold max_client_channels
channels, clients together may not take the share kept for the servers (a server restarted
meanwhile still gets its rings), and whatever a client held is reusable once it has gone,
for any size of ring (a channel ring serves as a new client's control ring)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos import libllm
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import Overloaded
from tests.microkernel.procs import wait_until
from tests.system.cli import WAIT, Cli, running_instance

pytestmark = pytest.mark.slow
CONFIG = "heartbeat_timeout_s = 5.0\nrestart_backoff_s = 0.1\n[model]\nrunners = 1\nthreads = 1\n"


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
    hogs: list[Endpoint] = []
    try:
        with pytest.raises(Overloaded, match="kept for the servers"):
            for _ in range(1000):
                hogs.append(Endpoint.connect(instance))
                for _ in range(64):
                    hogs[-1].open_channel("scheduler")
        with pytest.raises(Overloaded, match="kept for the servers"):
            libllm.connect(instance, timeout=WAIT)
        # A server restarted now still gets its control ring and its channel from the scheduler.
        cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
        old = cli.pids(instance)["runner.0"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: cli.pids(instance).get("runner.0", old) != old, "runner.0 to be restarted")
    finally:
        for hog in hogs:
            hog.close()
    wait_until(lambda: sixteen_sessions_generate(instance), "sessions after the hogs left", timeout=WAIT)
    with libllm.connect(instance) as session:
        assert session.stats()["scheduler"]["num_runners"] == 1
