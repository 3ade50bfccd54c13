"""Where an instance lives: its name, its run dir (socket, logs, pid files), its arena name.

Imported by the kernel, servers, libllm and tools. The run dir is checked with lstat
(ours, mode 0700, not a symlink) before anything in it is trusted.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from llmos.microkernel.errors import KernelUnavailable

DEFAULT_INSTANCE = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOCKET_NAME = "kernel.sock"


def instance_name(name: str | None = None) -> str:
    """The instance to use: `name`, else $LLMOS_INSTANCE, else "default"; validated."""
    chosen = name or os.environ.get("LLMOS_INSTANCE") or DEFAULT_INSTANCE
    if not _NAME.match(chosen):
        raise ValueError(
            f"invalid instance name {chosen!r}: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return chosen


def runtime_base() -> Path:
    """$LLMOS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/llmos, else /tmp/llmos-<uid>."""
    if os.environ.get("LLMOS_RUNTIME_DIR"):
        return Path(os.environ["LLMOS_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "llmos"
    return Path(f"/tmp/llmos-{os.getuid()}")


def run_dir(instance: str) -> Path:
    return runtime_base() / instance_name(instance)


def log_dir(instance: str) -> Path:
    """The instance's logs, beside its run dir: kept after `llmos down` (`down --purge`
    removes them), so the evidence of a crash outlives the instance."""
    return runtime_base() / f"{instance_name(instance)}.logs"


def make_log_dir(instance: str) -> Path:
    path = log_dir(instance)
    path.mkdir(mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path


def socket_path(instance: str) -> Path:
    return run_dir(instance) / SOCKET_NAME


def arena_name(instance: str) -> str:
    return f"llmos.{instance_name(instance)}"


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is a symlink, not ours, or open to others."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; 0700 expected")


def make_run_dir(instance: str) -> Path:
    """Create (or check) the base and the instance's run dir, both 0700 and ours."""
    base = runtime_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(base)
    path = run_dir(instance)
    path.mkdir(mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path


def existing_socket(instance: str) -> Path:
    """The kernel's socket for `instance`, or KernelUnavailable saying how to start one."""
    path = socket_path(instance)
    if not path.exists():
        raise KernelUnavailable(
            f"no llmos kernel runs for instance {instance!r} (no {path}); start one with "
            f"`llmos up --instance {instance}`"
        )
    return path
