"""Tie a server or kernel process to its supervisor: when the supervisor dies (even by
kill -9) the kernel delivers SIGTERM to its children, so nothing is left running."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
ENV = "LLMOS_SUPERVISOR_PID"


def exit_with_supervisor() -> None:
    """If started by a supervisor ($LLMOS_SUPERVISOR_PID), get SIGTERM when it dies."""
    expected = os.environ.get(ENV)
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(expected):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
