"""How every payload travels: msgpack through msgspec, validated against its Struct."""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.msgpack.Encoder()


def pack(obj: Any) -> bytes:
    return _encoder.encode(obj)


def unpack(data: bytes | memoryview, cls: type[Any]) -> Any:
    """Decode and validate; msgspec raises ValidationError/DecodeError on bad input."""
    return msgspec.msgpack.decode(data, type=cls)
