"""Helpers the system tests share: the `llmos` command run as a user would, and a
running instance for a module's tests that kill nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.messages import MsgType
from tests.conftest import unique_instance

WAIT = 60.0


class Cli:
    """Runs the `llmos` command as a user would, against a private runtime dir."""

    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self.env = {**os.environ, "LLMOS_RUNTIME_DIR": str(runtime)}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "llmos.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=WAIT * 2, check=False)
        if check:
            assert proc.returncode == 0, f"llmos {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    def status(self, instance: str) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self("status", "--instance", instance, "--json", check=False).stdout)
        return report

    def pids(self, instance: str) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.status(instance)["processes"] if p["alive"]}

    def config(self, body: str) -> str:
        path = self.runtime / f"config-{len(list(self.runtime.glob('config-*')))}.toml"
        path.write_text(body)
        return str(path)


@contextmanager
def running_instance(tmp_path_factory: pytest.TempPathFactory, config: str, tag: str) -> Iterator[str]:
    """`llmos up --detach` with `config` under a private runtime dir (also set in this
    process, for libllm), yielding the instance name; `llmos down` after."""
    runtime = tmp_path_factory.mktemp("run")
    runtime.chmod(0o700)
    cli = Cli(runtime)
    name = unique_instance(tag)
    cli("up", "--detach", "--instance", name, "--config", cli.config(config))
    patch = pytest.MonkeyPatch()
    patch.setenv("LLMOS_RUNTIME_DIR", str(runtime))
    try:
        yield name
    finally:
        patch.undo()
        cli("down", "--instance", name)


def scheduler_stats(instance: str) -> dict[str, Any]:
    with Endpoint.connect(instance) as ep:
        stats: dict[str, Any] = msgspec.msgpack.decode(
            ep.open_channel("scheduler").call(MsgType.SCHED_STATS, timeout=WAIT).payload)
    return stats


def all_blocks_free(instance: str) -> bool:
    stats = scheduler_stats(instance)
    return bool(stats["num_running"] == 0 and stats["num_waiting"] == 0
                and stats["num_free_blocks"] == stats["num_leased_blocks"])
