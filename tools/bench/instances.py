"""Instances for the benchmarks: `llmos up --detach` of a config under a private runtime dir,
`llmos down` after, whatever happens in between.

Runs in the benchmark's process (the user's shell).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WAIT = 300.0  # generous: an instance boots in seconds, a loaded machine may take longer
CLI = [sys.executable, "-m", "llmos.cli"]


@contextmanager
def instance(runtime: str, name: str, config: str) -> Iterator[str]:
    """`llmos up --detach` of `config` as instance `name` under `runtime` (also set as this
    process's LLMOS_RUNTIME_DIR meanwhile, for libllm); `llmos down` after."""
    path = os.path.join(runtime, f"{name}.toml")
    Path(path).write_text(config)
    env = {**os.environ, "LLMOS_RUNTIME_DIR": runtime}
    previous = os.environ.get("LLMOS_RUNTIME_DIR")
    try:  # from `up` on: whatever ends this (an error, Ctrl-C, a timeout), `down` runs
        up = subprocess.run([*CLI, "up", "--detach", "--instance", name, "--config", path], env=env,
                            capture_output=True, text=True, timeout=WAIT, check=False)
        if up.returncode:
            raise RuntimeError(f"llmos up failed: {up.stdout}{up.stderr}".strip())
        os.environ["LLMOS_RUNTIME_DIR"] = runtime
        yield name
    finally:
        if previous is None:
            os.environ.pop("LLMOS_RUNTIME_DIR", None)
        else:
            os.environ["LLMOS_RUNTIME_DIR"] = previous
        subprocess.run([*CLI, "down", "--instance", name], env=env, capture_output=True, timeout=WAIT, check=False)
