"""Find and remove what an instance left behind: its processes, its arena in /dev/shm, its
socket and run dir. A process is identified by pid *and* start time (from /proc), as the
supervisor recorded them, so a reused pid is never killed. Used by `llmos up` (stale
instances), `llmos down` and the supervisor's shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from llmos.microkernel import instance as I

STATE_FILE = "state.json"


def failure_path(instance: str) -> Path:
    """Why the instance last stopped on its own; beside the run dir, which is gone by then."""
    return I.runtime_base() / f"{I.instance_name(instance)}.failure"


def lock_path(instance: str) -> Path:
    """Held (flock) by the instance's supervisor for its whole life."""
    return I.runtime_base() / f"{I.instance_name(instance)}.lock"


def read_state(instance: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((I.run_dir(instance) / STATE_FILE).read_text())
        return data
    except (OSError, ValueError):
        return {}


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def is_same_process(pid: Any, ticks: Any) -> bool:
    """True if `pid` is alive and is the process that started at `ticks`."""
    return isinstance(pid, int) and isinstance(ticks, int) and pid != os.getpid() and start_ticks(pid) == ticks


def supervisor_alive(instance: str) -> bool:
    state = read_state(instance)
    return is_same_process(state.get("supervisor_pid"), state.get("supervisor_start"))


def kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(start_ticks(pid) is not None for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def clean_instance(instance: str, *, by_supervisor: bool = False) -> bool:
    """Kill the instance's recorded processes that still run, remove its arena, socket and
    run dir. Returns True when something was there. Never touches another instance.

    Args:
        by_supervisor: the caller is the instance's supervisor (it is not killed).
    """
    found = False
    state = read_state(instance)
    recorded = [(p.get("pid"), p.get("start")) for p in state.get("processes", [])]
    if not by_supervisor:
        recorded.append((state.get("supervisor_pid"), state.get("supervisor_start")))
    leftovers = [pid for pid, ticks in recorded if is_same_process(pid, ticks)]
    if leftovers:
        kill_and_wait(leftovers)
        found = True
    arena = Path("/dev/shm") / I.arena_name(instance)
    if arena.exists():
        arena.unlink(missing_ok=True)
        found = True
    if failure_path(instance).exists():
        failure_path(instance).unlink(missing_ok=True)
        found = True
    run_dir = I.run_dir(instance)
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        found = True
    return found
