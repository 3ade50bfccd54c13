"""Start llmos processes for tests and wait for their "ready" line: an event, not a sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmos.supervisor import LineReader
from tests.conftest import unique_instance

WAIT = 60.0


def start(args: list[str], ready_prefix: str, log_path: Path, env: dict[str, str], timeout: float = WAIT) -> subprocess.Popen[str]:
    """Run `python args...`, stderr to `log_path`, and return once stdout says `ready_prefix`."""
    log = open(log_path, "a")  # noqa: SIM115 - the child owns it; closed with the Popen
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    assert proc.stdout is not None
    lines = LineReader(proc.stdout.fileno(), time.monotonic() + timeout)
    while line := lines.readline():
        if line.startswith(ready_prefix):
            return proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"{args} not ready within {timeout} s (exit code {proc.returncode}); "
                         f"log: {log_path.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(WAIT)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class Instance:
    """A kernel (and optional servers) under a unique instance name and a private run dir."""

    runtime: Path
    name: str = field(default_factory=lambda: unique_instance("k"))
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LLMOS_RUNTIME_DIR": str(self.runtime), "LLMOS_INSTANCE": self.name}

    @property
    def run_dir(self) -> Path:
        return self.runtime / self.name

    def log(self, who: str) -> Path:
        return self.runtime / f"{self.name}.{who}.log"

    def start_kernel(self, *extra: str) -> None:
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        self.procs["kernel"] = start(["-m", "llmos.microkernel.kernel", "--instance", self.name, "--rings", "16M", *extra],
                                     "llmos kernel ready", self.log("kernel"), self.env)

    def start_echo(self, name: str = "echo") -> subprocess.Popen[str]:
        proc = start(["-m", "llmos.servers.echo", "--instance", self.name, "--name", name],
                     f"llmos {name} ready", self.log(name), self.env)
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for who in [w for w in self.procs if w != "kernel"] + (["kernel"] if "kernel" in self.procs else []):
            stop(self.procs.pop(who))
