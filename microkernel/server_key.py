"""The key that lets a process register a reserved server name.

The supervisor makes one key per instance and hands it to the processes it starts on their
stdin (a pipe, read once at start), never in the environment or on the command line, which
any process of the same uid can read in /proc. The kernel gets the key the same way, with
the names it reserves (`--reserved`: the configured servers' names and the built-in ones);
a HELLO that registers a reserved name without the key is refused and logged, so no other
process can squat `gateway` (which the scheduler trusts to name tenants) or a server's name
while its restart is pending. Names nobody reserved stay free for anyone's own servers.
A process that starts a supervisor can hand it the key instead (lifecycle.start(key=...)):
a cluster's node actor does, to register `cluster`, the other name trusted with tenants.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
from functools import cache
from typing import IO, Any

ENV = "LLMOS_SERVER_KEY_ON_STDIN"  # set by the supervisor: the key is the first line of stdin
# Names the built-in servers use; reserved in every supervised instance, configured or not.
BUILTIN_NAMES = ("memory", "scheduler", "runner.*", "gateway", "cluster")
# The peers the scheduler lets name a request's tenant: the HTTP gateway (from its API keys)
# and a cluster node's actor (for the cluster's front door, libllm.cluster).
TENANT_NAMERS = frozenset({"gateway", "cluster"})


@cache
def server_key() -> str:
    """This process's key ("" when no supervisor handed one)."""
    if os.environ.get(ENV) != "1" or sys.stdin is None:
        return ""
    try:
        return sys.stdin.readline().strip()
    except (OSError, ValueError):  # stdin closed or not text
        return ""


def is_reserved(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def hand_key(stdin: IO[Any], key: str) -> None:
    """Give the key to a process started with ENV=1, on its stdin: a pipe it reads once (a few
    bytes: never blocks). One that died at once is left to say why itself."""
    line = f"{key}\n"
    with contextlib.suppress(BrokenPipeError):
        stdin.write(line if hasattr(stdin, "encoding") else line.encode())  # a text pipe, or a binary one
    with contextlib.suppress(BrokenPipeError):
        stdin.close()
