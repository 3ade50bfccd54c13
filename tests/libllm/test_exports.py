"""libllm's public names are a promise: this fails when they drift."""

from __future__ import annotations

import subprocess
import sys
import types

from llmos import libllm

PUBLIC = [
    "Cancelled", "Closed", "Completion", "DeadlineExceeded", "InvalidRequest", "KernelUnavailable",
    "LlmosError", "Overloaded", "PeerGone", "ProtocolError", "QuotaExceeded", "RemoteError", "Request",
    "ServerGone", "Session", "SharedTensor", "Timeout", "Timings", "Unsupported", "Usage", "WouldBlock", "connect",
    "instances",
]


def test_all_is_the_curated_list() -> None:
    assert sorted(libllm.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert hasattr(libllm, name), name


def test_no_other_public_names() -> None:
    extra = {n for n in dir(libllm)
             if not n.startswith("_") and not isinstance(getattr(libllm, n), types.ModuleType) and n != "annotations"}
    assert extra == set(PUBLIC)


def test_the_pure_modules_load_without_the_session() -> None:
    """Servers import libllm.protocol (and the other pure modules); that must not load the
    client, its connection and failover."""
    code = ("import sys, libllm.protocol, libllm.sampling, libllm.blockhash; "
            "print(sorted(m for m in sys.modules if m in ('llmos.libllm.client', 'llmos.libllm.aio', 'llmos.libllm.request')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    assert libllm.connect is libllm.client.connect  # and the session is there when asked for


def test_errors_say_whose_fault() -> None:
    assert issubclass(libllm.ServerGone, libllm.PeerGone)
    assert issubclass(libllm.DeadlineExceeded, libllm.Timeout)
    for cls in (libllm.InvalidRequest, libllm.QuotaExceeded, libllm.Cancelled, libllm.Overloaded,
                libllm.Unsupported):
        assert issubclass(cls, libllm.RemoteError)
