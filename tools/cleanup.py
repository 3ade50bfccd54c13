"""Find and remove what an instance left behind: its processes (checked by command line
so a reused pid is never killed), its arena in /dev/shm, its socket and run dir.
Used by `llmos up` (stale instances), `llmos down` and the supervisor's shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from microkernel import instance as I

STATE_FILE = "state.json"


def failure_path(instance: str) -> Path:
    """Why the instance last stopped on its own; beside the run dir, which is gone by then."""
    return I.runtime_base() / f"{I.instance_name(instance)}.failure"


def read_state(instance: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((I.run_dir(instance) / STATE_FILE).read_text())
        return data
    except (OSError, ValueError):
        return {}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_instance_process(pid: int | None, instance: str) -> bool:
    """True if `pid` is alive and is one of this instance's llmos processes."""
    if not pid or pid == os.getpid():
        return False
    cmd = _cmdline(pid)
    if not cmd:
        return False
    environ = ""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        pass
    return (f"--instance {instance}" in cmd or f"LLMOS_INSTANCE={instance}\0" in environ) and (
        "microkernel.kernel" in cmd or "servers." in cmd or "tools.supervisor" in cmd or "llmos" in cmd)


def supervisor_alive(instance: str) -> bool:
    pid = read_state(instance).get("supervisor_pid")
    return isinstance(pid, int) and is_instance_process(pid, instance)


def kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def clean_instance(instance: str, *, include_self: bool = False) -> bool:
    """Kill the instance's leftover processes, remove its arena, socket and run dir.
    Returns True when something was there. Never touches another instance."""
    found = False
    state = read_state(instance)
    pids = [p.get("pid") for p in state.get("processes", [])]
    if not include_self:
        pids.append(state.get("supervisor_pid"))
    leftovers = [pid for pid in pids if isinstance(pid, int) and is_instance_process(pid, instance)]
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
