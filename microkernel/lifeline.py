"""Tie a process to the one that started it: when that one dies (even by kill -9) the
kernel delivers SIGTERM, so nothing is left running. Servers and the kernel use it with
their supervisor; benchmark workers with the benchmark."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
ENV = "LLMOS_SUPERVISOR_PID"


def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Get `sig` when process `parent_pid`, this one's parent, dies. SIGKILL for a process
    whose SIGTERM handler (inherited through fork) would not end it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before we asked
        os.kill(os.getpid(), sig)


def exit_with_supervisor() -> None:
    """If started by a supervisor ($LLMOS_SUPERVISOR_PID), get SIGTERM when it dies."""
    expected = os.environ.get(ENV)
    if expected:
        exit_with_parent(int(expected))
