from __future__ import annotations

import pytest

from llmos.microkernel import errors as E


@pytest.mark.parametrize("code", [c for c in E.ErrorCode if c != E.ErrorCode.OK])
def test_every_code_round_trips_through_its_exception(code: E.ErrorCode) -> None:
    exc = E.error_from_status(int(code), "details")
    assert isinstance(exc, E.LlmosError)
    assert E.status_from_error(exc) == code
    assert "details" in str(exc)


def test_remote_errors_share_one_base() -> None:
    for cls in (E.InvalidRequest, E.QuotaExceeded, E.Cancelled, E.Overloaded, E.Unsupported):
        assert issubclass(cls, E.RemoteError)
        assert isinstance(E.error_from_status(int(cls.code)), cls)


def test_unknown_status_is_still_an_error() -> None:
    exc = E.error_from_status(9999, "odd")
    assert type(exc) is E.RemoteError
    assert "9999" in str(exc)


def test_ok_is_not_an_error() -> None:
    with pytest.raises(ValueError):
        E.error_from_status(0)


def test_unmapped_exception_is_internal() -> None:
    assert E.status_from_error(RuntimeError("x")) == E.ErrorCode.INTERNAL
