"""A session that was idle when the scheduler (or the whole instance) restarted fails over
on its next call, whatever the call: the caller does nothing. The gateway is such a
session, and says on /health when the scheduler does not answer."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from llmos import libllm
from llmos.config import servers_toml
from tests.microkernel.procs import wait_until
from tests.system.cli import Cli, running_instance

pytestmark = pytest.mark.slow
WAIT = 60.0
# A watchdog slower than /health's 5 s ping, so a stopped scheduler is seen stopped first.
CONFIG = """
heartbeat_timeout_s = 30.0
[gateway]
port = 0
""" + servers_toml(1, gateway=True)


def restarted(cli: Cli, instance: str, name: str, old: int) -> bool:
    pid = cli.pids(instance).get(name)
    return pid is not None and pid != old and cli.status(instance).get("state", "running") == "running"


def completion(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "stories260K", "prompt": "Zoo", "max_tokens": 8,
                                                     "temperature": 0}, timeout=WAIT)


def test_idle_sessions_and_the_gateway_fail_over_on_their_next_call(tmp_path_factory: pytest.TempPathFactory
                                                                     ) -> None:
    with running_instance(tmp_path_factory, CONFIG, "idle") as instance:
        cli = Cli(Path(os.environ["LLMOS_RUNTIME_DIR"]))
        url = (cli.runtime / instance / "gateway.url").read_text().strip()
        with libllm.connect(instance) as generating, libllm.connect(instance) as asking:
            expected = generating.generate("Zoo", max_tokens=8).text
            assert completion(url).json()["choices"][0]["text"] == expected
            scheduler = cli.pids(instance)["scheduler"]

            os.kill(scheduler, signal.SIGSTOP)
            health = httpx.get(url + "/health", timeout=WAIT)
            assert health.status_code == 503 and "scheduler" in health.json()["reason"]
            os.kill(scheduler, signal.SIGKILL)
            wait_until(lambda: restarted(cli, instance, "scheduler", scheduler), "the scheduler to restart",
                       timeout=WAIT)

            assert generating.generate("Zoo", max_tokens=8).text == expected  # idle: fails over in submit
            assert asking.stats()["scheduler"]["num_finished"] >= 1  # idle: fails over in stats
            assert generating.num_failovers == 1 and asking.num_failovers == 1
            reply = completion(url)  # the gateway was idle too
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
            assert httpx.get(url + "/health", timeout=WAIT).status_code == 200
