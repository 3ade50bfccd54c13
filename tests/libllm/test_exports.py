"""libllm's public names are a promise: this fails when they drift."""

from __future__ import annotations

import types

import libllm

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
    extra = {n for n, v in vars(libllm).items()
             if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"}
    assert extra == set(PUBLIC)


def test_errors_say_whose_fault() -> None:
    assert issubclass(libllm.ServerGone, libllm.PeerGone)
    assert issubclass(libllm.DeadlineExceeded, libllm.Timeout)
    for cls in (libllm.InvalidRequest, libllm.QuotaExceeded, libllm.Cancelled, libllm.Overloaded,
                libllm.Unsupported):
        assert issubclass(cls, libllm.RemoteError)
